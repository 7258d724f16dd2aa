"""A local judge end to end (a deterministic generate_fn), bad inputs, and all-pairs Elo."""
import json
import os
import shutil

import numpy as np
import pytest
from judge_fixtures import fixture_config

from medcg.judge import launch, prompts
from medcg.judge.clients import LocalJudge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "data", "judge")
RANK = {"cand-a": 3, "ref": 2, "cand-b": 1}  # the fake judge's preference


def rank_judge(prompt_texts, images):
  """Prefers the answer of the higher-ranked model (after a line of reasoning)."""
  out = []
  for text, image in zip(prompt_texts, images):
    assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
    assert text.startswith(prompts.system_prompt())
    first = text.split("~~~Answer1\n[", 1)[1].split(" ", 1)[0]
    second = text.split("~~~Answer2\n[", 1)[1].split(" ", 1)[0]
    out.append("Reasoning about both.\n" + (prompts.ANSWER1 if RANK[first] > RANK[second] else prompts.ANSWER2))
  return out


def _config(workdir, fixtures=FIXTURES, candidates=("answers_a.jsonl",), **kw):
  c = fixture_config(workdir, "judge=local", fixtures=fixtures, candidates=candidates, elo_rounds=30)
  for k, v in kw.items():
    section, key = k.split("__")
    c[section][key] = v
  return c


def _judge():
  return LocalJudge(rank_judge, identity="local:rank-judge", decoding={"greedy": True}, batch_size=3)


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_local_judge_end_to_end(tmp_path):
  paths = launch.run_config(_config(tmp_path, candidates=("answers_a.jsonl", "answers_b.jsonl")),
                            judge=_judge())
  results = _results(tmp_path)
  by_model = {m["model"]: m for m in results["leaderboard"]}
  assert (by_model["cand-a"]["win"], by_model["cand-a"]["lose"]) == (7, 0)
  assert (by_model["cand-b"]["win"], by_model["cand-b"]["lose"]) == (0, 7)
  assert by_model["cand-a"]["position_consistency"] == 1.0
  assert list(results["elo"])[0] == "cand-a" and list(results["elo"])[-1] == "cand-b"
  assert results["judge"] == {"identity": "local:rank-judge", "decoding": {"greedy": True}}
  assert results["reference"] == "ref"
  assert results["models"]["cand-b"]["decoding"] == [{"greedy": True, "max_new_tokens": 32}]
  assert results["models"]["cand-b"]["n_answers"] == 7
  assert results["config"]["judge"]["kind"] == "local"
  assert results["run"]["git_commit"] and results["run"]["packages"]["numpy"] != "not installed"
  with open(paths["judgements.jsonl"]) as f:
    recs = [json.loads(line) for line in f]
  assert len(recs) == 14 and all(r["orders"][0]["raw"].startswith("Reasoning") for r in recs)
  board = open(paths["leaderboard.md"]).read()
  assert board.index("| 1 | cand-a |") < board.index("| 2 | cand-b |")
  assert "## Win / tie / lose per level" in board and "Perception/Remembering" in board


def test_all_pairs(tmp_path):
  launch.run_config(_config(tmp_path, candidates=("answers_a.jsonl", "answers_b.jsonl"),
                            protocol__pairing="all"), judge=_judge())
  results = _results(tmp_path)
  pairs = {(m["model"], m["opponent"]): m["win"] for m in results["leaderboard"]}
  assert pairs == {("cand-a", "ref"): 7, ("cand-b", "ref"): 0, ("cand-b", "cand-a"): 0}
  assert list(results["elo"]) == ["cand-a", "ref", "cand-b"]


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
  data_dir = tmp_path / "data"
  shutil.copytree(FIXTURES, data_dir)
  (data_dir / "images" / "4.png").write_bytes(b"not an image")       # unreadable image
  crit = json.loads((data_dir / "criteria.json").read_text())
  del crit["5"]                                                        # criteria missing
  (data_dir / "criteria.json").write_text(json.dumps(crit))
  questions = json.loads((data_dir / "questions.json").read_text())
  questions[6]["meta"]["question type"] = "https://example.org/x.jpg"  # as in MLLM-Bench's release
  (data_dir / "questions.json").write_text(json.dumps(questions))
  lines = (data_dir / "answers_a.jsonl").read_text().splitlines()
  extra = json.dumps({"sample_id": "99", "model_id": "cand-a", "answer": "stray"})
  (data_dir / "answers_a.jsonl").write_text("\n".join(lines[:2] + lines[3:] + [extra]) + "\n")  # no answer for 2
  launch.run_config(_config(tmp_path / "run", fixtures=data_dir), judge=_judge())
  results = _results(tmp_path / "run")
  reasons = {(s["sample_id"], s["model"]): s["reason"] for s in results["skipped"]}
  assert "cannot read image" in reasons[("4", None)] and "4.png" in reasons[("4", None)]
  assert "no criteria" in reasons[("5", None)]
  assert "no answer from cand-a" in reasons[("2", "cand-a")]
  assert "not in the question set" in reasons[("99", "cand-a")]
  assert "question type 'https://example.org/x.jpg'" in reasons[("6", None)]
  assert len(reasons) == 5
  (m,) = results["leaderboard"]
  assert m["n_judged"] == 3  # 7 samples minus the four skipped ones
  board = (tmp_path / "run" / "leaderboard.md").read_text()
  assert "## Skipped (5)" in board and "no criteria" in board


def test_judging_without_criteria_when_allowed(tmp_path):
  seen = []

  def fn(texts, images):
    seen.extend(texts)
    return [prompts.ANSWER2] * len(texts)
  cfg = _config(tmp_path, data__criteria_path="", data__require_criteria=False)
  launch.run_config(cfg, judge=LocalJudge(fn, "local:x", {}, batch_size=4))
  assert len(seen) == 14 and not any("Criteria for this item" in t for t in seen)
  assert _results(tmp_path)["skipped"] == []


def test_duplicate_models_and_missing_reference_are_errors(tmp_path):
  cfg = _config(tmp_path, candidates=("answers_a.jsonl", "answers_a.jsonl"))
  with pytest.raises(launch.AnswerNameClash, match="answers_a.jsonl is listed twice, so both entries have the "
                                                   "model name 'cand-a'; give each its own name with NAME=PATH"):
    launch.run_config(cfg, judge=_judge())
  cfg = _config(tmp_path, candidates=())
  with pytest.raises(ValueError, match="answers.candidates is empty"):
    launch.run_config(cfg, judge=_judge())


def test_local_judge_rejects_wrong_output_count():
  from medcg.judge.clients import JudgeRequest
  from medcg.judge.data import load_image
  judge = LocalJudge(lambda p, i: ["Answer1"], "local:x", {}, batch_size=2)
  img = load_image(os.path.join(FIXTURES, "images", "0.png"))
  with pytest.raises(ValueError, match="returned 1 texts for 2 prompts"):
    list(judge.run([JudgeRequest("s", "u", img)] * 2))



def _tiny_llava_checkpoint(path):
  """A random tiny LlavaForConditionalGeneration (safetensors) plus a byte-level tokenizer.json."""
  import tokenizers
  import torch
  import transformers
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  vocab = {ch: i for i, ch in enumerate(alphabet)}
  vocab.update({"<s>": 256, "</s>": 257, "<image>": 258, "<pad>": 259})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(["<s>", "</s>", "<image>", "<pad>"])
  os.makedirs(path)
  tok.save(os.path.join(path, "tokenizer.json"))
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
          num_attention_heads=2, projection_dim=8),
      text_config=transformers.LlamaConfig(
          vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=2, bos_token_id=256, eos_token_id=257, pad_token_id=259,
          max_position_embeddings=4096),
      image_token_index=258, vision_feature_layer=-2, vision_feature_select_strategy="default",
      projector_hidden_act="gelu")
  transformers.LlavaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
  return path


def test_local_medcg_vlm_judge_end_to_end(tmp_path):
  """judge.kind=local: a tiny LLaVA checkpoint, loaded as a medcg VLM, judges via the config path."""
  from medcg.judge import local, protocol
  ckpt = _tiny_llava_checkpoint(str(tmp_path / "tiny-llava"))
  cfg = _config(tmp_path / "run", judge__checkpoint=ckpt, judge__max_new_tokens=6, judge__dtype="float32",
                judge__chat_template="plain")
  judge = local.medcg_judge(cfg.judge)
  assert judge.identity.startswith("medcg:tiny-llava@") and judge.decoding["greedy"] is True
  # Greedy with a fixed seed: the same prompt gives the same text whatever else is in the batch.
  img = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
  texts = judge.generate_fn(["compare these", "x" * 90], [img, img[::-1]])
  assert texts == judge.generate_fn(["compare these", "x" * 90], [img, img[::-1]])
  assert texts[0] == judge.generate_fn(["compare these"], [img])[0]

  launch.run_config(cfg)  # builds the same judge from the config
  results = _results(tmp_path / "run")
  assert results["judge"]["identity"] == judge.identity
  assert results["stats"]["calls"] == 14 and results["stats"]["sent"] == 14
  with open(tmp_path / "run" / "judgements.jsonl") as f:
    raws = [o["raw"] for r in map(json.loads, f) for o in r["orders"]]
  assert all(isinstance(t, str) for t in raws)
  # A random model rarely writes a label line; whatever it wrote went through the strict parser.
  assert results["stats"]["unparsed"] == sum(protocol.parse_vote(t) is None for t in raws)
  # ... and a judge that mostly does not vote is warned about, with what it said.
  rate = results["stats"]["parse_failure_rate"]
  assert len(results["warnings"]) == (rate > 0.2) and all("First unparsed replies" in w for w in results["warnings"])

  # Other weights are another judge: the identity (a cache-key field) changes.
  model = judge.generate_fn.model
  model.projector.linear_1.kernel[...] = model.projector.linear_1.kernel[...] + 1.0
  changed = local.vlm_judge(model, judge.generate_fn.tokenizer, image_size=16, template="plain",
                            max_new_tokens=6, name="tiny-llava")
  assert changed.identity != judge.identity


def test_medmat_freeform_samples_through_the_config(tmp_path):
  root = tmp_path / "release"
  (root / "Aggregated_Subsets").mkdir(parents=True)
  (root / "med-mat" / "head").mkdir(parents=True)
  records, answers = [], {"ref": [], "cand-a": []}
  for i in range(1, 4):
    shutil.copy(os.path.join(FIXTURES, "images", f"{i}.png"), root / "med-mat" / "head" / f"{i}.png")
    label = ["Normal", "Hemorrhage"][i % 2]
    records.append({"id": i, "caption": label, "image": f"med-mat/head/{i}.png", "Question": "Any bleed?",
                    "Answer": label, "Question-choice": "Any bleed?\nA: Normal\nB: Hemorrhage\nAnswer with the "
                    "option's letter from the given choices directly.", "Answer-choice": "AB"[i % 2],
                    "data-no": "7"})
    for model in answers:
      answers[model].append({"sample_id": f"Subset--05-train-{i:06d}", "model_id": model,
                             "answer": f"[{model} #{i}] {label}"})
  (root / "Aggregated_Subsets" / "Subset--05-train.json").write_text(json.dumps(records))
  for model, rows in answers.items():
    (tmp_path / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = _config(tmp_path / "run", data__format="medmat", data__criteria_path="",
                data__path=str(root / "Aggregated_Subsets" / "Subset--05-train.json"), data__limit=2)
  cfg.answers.reference = str(tmp_path / "ref.jsonl")
  cfg.answers.candidates = str(tmp_path / "cand-a.jsonl")
  prompts_seen = []

  def fn(texts, images):
    prompts_seen.extend(texts)
    return rank_judge(texts, images)
  launch.run_config(cfg, judge=LocalJudge(fn, "local:rank", {}, batch_size=4))
  results = _results(tmp_path / "run")
  (m,) = results["leaderboard"]
  assert (m["win"], m["n_judged"]) == (2, 2)  # data.limit=2 of the 3 samples
  assert list(m["by_level"]) == ["CT-Brain"] and list(m["by_capability"]) == ["CT-Brain-State"]
  assert "The correct finding for this image is: Hemorrhage." in prompts_seen[0]
  # The third sample is outside data.limit, so its answers are listed as not in the question set.
  assert {s["sample_id"] for s in results["skipped"]} == {"Subset--05-train-000003"}


def test_local_judge_from_a_medcg_training_run(synth_shards, tmp_path):
  """judge.checkpoint may name a medcg.train workdir: its trained params, tokenizer and template."""
  from medcg.judge import local
  from medcg.train import trainer
  from test_train import micro_config
  c = micro_config(synth_shards, steps=1)
  c.mesh.num_devices = 1
  c.data.eval_mixture = []
  trainer.train(c, str(tmp_path / "run"))
  cfg = _config(tmp_path / "judged", judge__checkpoint=str(tmp_path / "run"), judge__max_new_tokens=4,
                judge__chat_template="plain")
  judge = local.medcg_judge(cfg.judge)
  assert judge.identity.startswith("medcg:run@")
  img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
  texts = judge.generate_fn(["which answer is better?"], [img])
  assert len(texts) == 1 and isinstance(texts[0], str)
