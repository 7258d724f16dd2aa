"""MLLM-Bench protocol pieces: vote parsing, the combination rule, metrics, Elo, prompts, input files."""
import itertools
import json
import os

import numpy as np
import pytest

from medcg.judge import data, elo, prompts, protocol

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "judge")
A1, A2, U1, U2 = prompts.LABELS


# --- vote parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,label", [
    ("Answer1", A1), ("answer2", A2), ("  ANSWER1 \r", A1),
    ("Answer 2 is more detailed and matches the image.\nAnswer2", A2),
    ("Unable to decide: Situation One", U1), ("unable to decide: situation two\n", U2),
    ("Answer1.", None), ("**Answer1**", None), ("Answer3", None), ("The better one is Answer1", None),
    ("", None), ("Answer1\nAnswer2", A2),             # two different labels: the last line wins
    ("Answer2\nanswer2", A2),                          # the same label twice is still one vote
])
def test_parse_vote_is_whole_line(text, label):
  assert protocol.parse_vote(text) == label  # the default policy, last_line (tests/test_judge_labels.py)


# --- the two-order combination rule ---------------------------------------------------------------

def test_side_vote_maps_answer_slots_per_order():
  # Order 1 shows the opponent (reference) first, order 2 the model first.
  assert protocol.side_vote(A1, 1) == protocol.OPPONENT
  assert protocol.side_vote(A2, 1) == protocol.MODEL
  assert protocol.side_vote(A1, 2) == protocol.MODEL
  assert protocol.side_vote(A2, 2) == protocol.OPPONENT
  assert protocol.side_vote(U1, 2) == protocol.UNABLE_ONE
  assert protocol.shown_models(1, "m", "ref") == ("ref", "m")
  with pytest.raises(ValueError):
    protocol.side_vote(A1, 3)


@pytest.mark.parametrize("label1,label2,verdict", [
    (A2, A1, protocol.WIN),            # model picked in both orders
    (A1, A2, protocol.LOSE),           # opponent picked in both orders
    (A1, A1, protocol.TIE),            # same slot twice = opposite models: position flip
    (A2, A2, protocol.TIE),
    (A2, U1, protocol.WIN),            # a win plus "unable" wins
    (U2, A1, protocol.WIN),
    (A1, U2, protocol.LOSE),
    (U1, A2, protocol.LOSE),
    (U1, U1, protocol.UNABLE_ONE),
    (U2, U2, protocol.UNABLE_TWO),
    (U1, U2, protocol.UNABLE_MIXED),
])
def test_combination_rule(label1, label2, verdict):
  assert protocol.combine(protocol.side_vote(label1, 1), protocol.side_vote(label2, 2)) == verdict


def test_combination_is_symmetric_under_swapping_roles():
  mirror = {protocol.WIN: protocol.LOSE, protocol.LOSE: protocol.WIN}
  flip = {protocol.MODEL: protocol.OPPONENT, protocol.OPPONENT: protocol.MODEL}
  for l1, l2 in itertools.product(prompts.LABELS, repeat=2):
    v1, v2 = protocol.side_vote(l1, 1), protocol.side_vote(l2, 2)
    got = protocol.combine(v1, v2)
    swapped = protocol.combine(flip.get(v1, v1), flip.get(v2, v2))
    assert swapped == mirror.get(got, got)
    assert protocol.combine(v2, v1) == got  # which order came first does not matter


def _rec(verdict, level="L1", cap="C1", votes=None, model="m", opponent="ref"):
  votes = votes or ({protocol.WIN: (protocol.MODEL,) * 2, protocol.LOSE: (protocol.OPPONENT,) * 2}.get(
      verdict, (protocol.MODEL, protocol.OPPONENT)))
  return {"model": model, "opponent": opponent, "level": level, "capability": cap, "votes": list(votes),
          "verdict": verdict}


def test_aggregate_counts_rates_and_groups():
  recs = [_rec("win"), _rec("win", level="L2"), _rec("lose", cap="C2"), _rec("tie"),
          _rec("unable_one", votes=("unable_one", "unable_one")),
          _rec("unable", votes=("unable_one", "unable_two")),
          _rec(None, votes=(protocol.MODEL, None))]
  (m,) = protocol.aggregate(recs)
  assert (m["win"], m["tie"], m["lose"]) == (2, 3, 1)
  assert m["counts"] == {"win": 2, "lose": 1, "tie": 1, "unable_one": 1, "unable_two": 0, "unable": 1}
  assert (m["n_samples"], m["n_judged"], m["n_incomplete"]) == (7, 6, 1)
  assert m["win_rate"] == pytest.approx(2 / 6)
  # Consistent: win, win, lose (same side twice) and unable_one twice; not the tie or the mixed unable.
  assert m["position_consistency"] == pytest.approx(4 / 6)
  assert m["by_level"]["L2"] == {"win": 1, "tie": 0, "lose": 0, "n": 1, "win_rate": 1.0}
  assert m["by_level"]["L1"] == {"win": 1, "tie": 3, "lose": 1, "n": 5, "win_rate": 0.2}
  assert m["by_capability"]["C2"] == {"win": 0, "tie": 0, "lose": 1, "n": 1, "win_rate": 0.0}


# --- Elo ----------------------------------------------------------------------------------------

def test_online_elo_update():
  r = elo.online_elo([("a", "b", 1.0)], ["a", "b"])
  assert r == {"a": 1002.0, "b": 998.0}  # K=4, expected score 0.5 at equal ratings
  r = elo.online_elo([("a", "b", 0.5), ("b", "a", 0.5)], ["a", "b"])
  assert r["a"] == pytest.approx(1000.0) and r["b"] == pytest.approx(1000.0)


def test_bootstrap_elo_ranks_and_is_seeded():
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  battles = [("strong", "ref", 1.0)] * 30 + [("weak", "ref", 0.0)] * 30 + [("strong", "weak", 0.5)] * 5
  table = elo.bootstrap_elo(battles, rounds=50, seed=seed)
  assert list(table) == ["strong", "ref", "weak"], f"seed {seed}"
  assert all(t["lo"] <= t["elo"] <= t["hi"] for t in table.values())
  assert table == elo.bootstrap_elo(battles, rounds=50, seed=seed)
  assert elo.bootstrap_elo([], rounds=5) == {}


def test_bootstrap_elo_rounds_equal_online_elo_on_their_resample():
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  models = ["a", "b", "c"]
  battles = [(str(x), str(y), float(s)) for x, y, s in zip(
      rng.choice(models, 40), rng.choice(models, 40), rng.choice([0.0, 0.5, 1.0], 40)) if x != y]
  table = elo.bootstrap_elo(battles, rounds=3, seed=seed)
  idx = np.random.default_rng(seed).integers(0, len(battles), size=(3, len(battles)))
  per_round = [elo.online_elo([battles[i] for i in row], sorted(table)) for row in idx]
  for m in table:
    assert table[m]["elo"] == pytest.approx(float(np.median([r[m] for r in per_round])), abs=1e-9), f"seed {seed}"


def test_battles_one_per_judged_sample():
  recs = [_rec("win"), _rec("tie"), _rec("unable_two"), _rec(None)]
  assert elo.battles_from_records(recs) == [("m", "ref", 1.0), ("m", "ref", 0.5), ("m", "ref", 0.5)]


# --- prompts ------------------------------------------------------------------------------------

def test_prompt_structure_and_version():
  system = prompts.system_prompt()
  for label in prompts.LABELS:
    assert f"\n{label}\n" in system
  item = prompts.item_prompt("Q?", "close-ended", "first", "second", "1. be right")
  assert item.index("~~~Question\nQ?") < item.index("~~~Answer1\nfirst") < item.index("~~~Answer2\nsecond")
  assert item.rstrip().endswith("1. be right")
  assert "Criteria" not in prompts.item_prompt("Q?", "open-ended", "a", "b", None)
  assert prompts.TEMPLATE_VERSION.startswith("medcg-pairwise-v1-")


# --- input files --------------------------------------------------------------------------------

def test_load_mllm_bench_fixture_normalises_labels():
  samples = data.load_mllm_bench(os.path.join(FIXTURES, "questions.json"),
                                 os.path.join(FIXTURES, "criteria.json"))
  assert [s.id for s in samples] == [str(i) for i in range(7)]
  assert {s.level for s in samples} == {"Perception/Remembering", "Understanding", "Analyzing", "Creating"}
  assert samples[1].capability == "OCR" and samples[3].capability == "Attribute Comparison"
  assert samples[0].criteria == "1. Names the main object of picture 0.\n2. Does not invent details."
  assert os.path.isfile(samples[0].image_path)
  assert samples[6].question_type == "compound"


def _write(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)
  return str(path)


def test_mllm_bench_bad_inputs_name_file_and_record(tmp_path):
  q = {"id": 0, "image_path": "x.png", "question": "q", "meta": {"level": "L", "capability": "C",
                                                                  "question type": "open-ended"}}
  path = _write(tmp_path / "q.json", [q, q])
  with pytest.raises(data.JudgeDataError, match=r"q.json: record 1: duplicate sample id '0'"):
    data.load_mllm_bench(path)
  bad = dict(q, meta={"level": "L", "capability": "C"})
  path = _write(tmp_path / "q2.json", [bad])
  with pytest.raises(data.JudgeDataError, match=r"q2.json: record 0 \(id 0\): missing meta field 'question type'"):
    data.load_mllm_bench(path)
  path = _write(tmp_path / "q3.json", [q])
  crit = _write(tmp_path / "c.json", {"0": "x", "9": "y"})
  with pytest.raises(data.JudgeDataError, match=r"c.json: criteria for ids not in"):
    data.load_mllm_bench(path, crit)
  (tmp_path / "broken.json").write_text("[{")
  with pytest.raises(data.JudgeDataError, match="broken.json: not valid JSON"):
    data.load_mllm_bench(str(tmp_path / "broken.json"))
  # A sample without criteria loads (the run lists it as skipped when criteria are required).
  assert data.load_mllm_bench(path)[0].criteria is None


def test_load_answers_formats_and_errors(tmp_path):
  model, answers = data.load_answers(os.path.join(FIXTURES, "answers_a.jsonl"))
  assert model == "cand-a" and len(answers) == 7 and answers["3"].decoding["greedy"] is True
  # MLLM-Bench answer list (unique_idx / gen_model_id / gen_kwargs).
  path = _write(tmp_path / "anchor.json", [{"unique_idx": 4, "gen_model_id": "llava", "answer": "x",
                                            "gen_kwargs": {"temperature": 0.8}}])
  model, answers = data.load_answers(path)
  assert model == "llava" and answers["4"].text == "x" and answers["4"].model == "llava"
  dup = tmp_path / "dup.jsonl"
  dup.write_text('{"sample_id": "1", "answer": "a"}\n\n{"sample_id": "1", "answer": "b"}\n')
  with pytest.raises(data.JudgeDataError, match=r"dup.jsonl: line 3: duplicate sample id '1'"):
    data.load_answers(str(dup))
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text('{"sample_id": "1", "answer": "a", "model_id": "x"}\n'
                   '{"sample_id": "2", "answer": "a", "model_id": "y"}\n')
  with pytest.raises(data.JudgeDataError, match="several models"):
    data.load_answers(str(mixed))
  # medcg's evaluation samples.jsonl: the model's text is `output` (`answer` is the ground truth).
  run = tmp_path / "eval-run-7"
  run.mkdir()
  (run / "samples.jsonl").write_text('{"sample_id": "s1", "output": "It is B.", "answer": "B"}\n')
  model, answers = data.load_answers(str(run / "samples.jsonl"))
  assert model == "eval-run-7" and answers["s1"].text == "It is B."
  noanswer = tmp_path / "na.jsonl"
  noanswer.write_text('{"sample_id": "1", "text": "a"}\n')
  with pytest.raises(data.JudgeDataError, match=r"na.jsonl: line 1: needs a sample id"):
    data.load_answers(str(noanswer))


def test_load_medmat_freeform_schema_a(tmp_path):
  folder = tmp_path / "Aggregated_Subsets"
  folder.mkdir()
  good = {"id": 1, "caption": "Hemorrhage", "image": "med-mat/head/035.png",
          "Question": "Is there a hemorrhage?", "Answer": "Hemorrhage",
          "Question-choice": "Is there a hemorrhage?\nA: Normal\nB: Hemorrhage\nAnswer with the option's "
                             "letter from the given choices directly.",
          "Answer-choice": "B", "data-no": "7"}
  bad = dict(good, id=2, **{"Answer-choice": "D"})
  samples, skips = data.load_medmat_freeform(_write(folder / "Subset--05-train.json", [good, bad]))
  (s,) = samples
  assert s.id == "Subset--05-train-000001" and s.question == "Is there a hemorrhage?"
  assert "Hemorrhage" in s.criteria and s.level == "CT-Brain" and s.question_type == "close-ended"
  assert s.image_path == str(tmp_path / "med-mat/head/035.png")
  (skip,) = skips
  assert "record 1" in skip.sample_id or "[1]" in skip.sample_id
  assert "Answer-choice" in skip.reason


def test_load_image_errors_name_the_path(tmp_path):
  img = data.load_image(os.path.join(FIXTURES, "images", "0.png"))
  assert img.mime == "image/png" and len(img.sha256) == 64
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG not really")
  with pytest.raises(OSError, match="bad.png"):
    data.load_image(str(bad))
  with pytest.raises(OSError, match="missing.png"):
    data.load_image(str(tmp_path / "missing.png"))
