"""Label policies: how a reply with several label lines is read, what the run reports, and the cache replay."""
import json
import os
import re

import pytest
from judge_fixtures import fixture_config

from medcg.errors import ConfigError
from medcg.judge import cache as cache_lib
from medcg.judge import launch, prompts, protocol, runner
from medcg.judge.clients import LocalJudge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "data", "judge")
A1, A2, U1, U2 = prompts.LABELS


@pytest.mark.parametrize("text,last_line,strict", [
    ("Answer1", A1, A1),                                                      # a single label
    ("Answer2\nThe second answer names the object in the image.", A2, A2),   # label, then explanation
    ("The first answer misreads the text.\nAnswer2", A2, A2),                # explanation, label last
    ("Answer1\nOn reflection the second is better.\nAnswer2", A2, None),     # two different labels
    ("unable to decide: situation one\nAnswer1", A1, None),
    ("Answer2\nreasons\nAnswer2", A2, A2),                                    # the same label twice
    ("**Answer1**", None, None), ("Answer1.", None, None),                    # not label lines (MLLM-Bench)
    ("**Answer1**\nAnswer2", A2, A2), ("Answer1.\nAnswer2", A2, A2),          # ... so they do not conflict
    ("  ANSWER1 \r\n", A1, A1), ("\tUnable To Decide: Situation Two  ", U2, U2),  # whitespace and case
    ("  answer2\nAnswer1  ", A1, None),
    ("", None, None), ("\n\n", None, None), ("The better one is Answer1", None, None),
])
def test_parse_vote_policies(text, last_line, strict):
  assert protocol.parse_vote(text, "last_line") == last_line
  assert protocol.parse_vote(text, "strict") == strict
  assert protocol.parse_vote(text) == last_line  # the default


def test_label_lines_keep_reply_order():
  assert protocol.label_lines("Answer2\nwhy\n answer1 \nAnswer1.\nAnswer2") == [A2, A1, A2]
  assert protocol.label_lines("no vote") == []


@pytest.mark.parametrize("bad", ["first", "LAST_LINE", "", None])
def test_an_unknown_policy_is_a_value_error_naming_the_choices(bad):
  with pytest.raises(ValueError, match=r"label_policy must be one of 'last_line', 'strict', got"):
    protocol.parse_vote("Answer1", bad)
  with pytest.raises(ConfigError, match=r"label_policy must be one of"):
    runner.run_judging([], {"ref": {}}, "ref", judge=None, cache=None, label_policy=bad)


def _config(workdir, **protocol_keys):
  c = fixture_config(workdir, "judge=local")
  for k, v in protocol_keys.items():
    c.protocol[k] = v
  return c


# Replies per sample id (the same in both orders); every other sample gets REASONED_A1.
CONFLICTING = "Answer1\nOn reflection the second answer is better.\nAnswer2"
REPEATED = "Answer2\nIt names the object.\nAnswer2"
REASONED_A1 = "The first answer is right.\nAnswer1"
_SAMPLE_RE = re.compile(r"~~~Answer1\n\[\S+ #(\d+)\]")


class LabelJudge:
  """generate_fn with scripted replies by sample id; records the sample ids it was asked about."""

  def __init__(self, replies=None):
    self.replies = {"0": CONFLICTING, "1": REPEATED} if replies is None else replies
    self.asked = []

  def __call__(self, prompt_texts, images):
    out = []
    for text in prompt_texts:
      sid = _SAMPLE_RE.search(text).group(1)
      self.asked.append(sid)
      out.append(self.replies.get(sid, REASONED_A1))
    return out


def _judge(fn):
  return LocalJudge(fn, identity="local:label-judge", decoding={"greedy": True}, batch_size=4)


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _records(workdir):
  with open(os.path.join(workdir, "judgements.jsonl")) as f:
    return {r["sample_id"]: r for r in map(json.loads, f)}


def test_summary_counts_multi_label_replies_under_last_line(tmp_path):
  launch.run_config(_config(tmp_path), judge=_judge(LabelJudge()))
  stats = _results(tmp_path)["stats"]
  # Samples 0 and 1, both orders: four replies with several label lines, two of them conflicting.
  assert (stats["label_policy"], stats["multi_label_replies"], stats["conflicting_label_replies"]) == (
      "last_line", 4, 2)
  assert stats["unparsed"] == 0
  recs = _records(tmp_path)
  assert [o["label"] for o in recs["0"]["orders"]] == [A2, A2]  # Answer2 both orders: a position flip
  assert recs["0"]["verdict"] == protocol.TIE
  assert recs["0"]["orders"][0]["label_lines"] == [A1, A2]
  assert recs["2"]["orders"][0]["label_lines"] == [A1]
  board = (tmp_path / "leaderboard.md").read_text()
  assert "Label policy `last_line`: 4 replies had several label lines, 2 of them with different labels." in board


def test_strict_policy_end_to_end_and_cached_replies_are_reread(tmp_path):
  # A last_line run caches every reply, the conflicting ones included.
  first = LabelJudge()
  launch.run_config(_config(tmp_path), judge=_judge(first))
  assert len(first.asked) == 14
  with cache_lib.JudgeCache(str(tmp_path / "judge_cache.sqlite")) as c:
    assert len(c) == 14

  # strict re-reads the cached raw text instead of replaying the stored label: the two conflicting replies
  # no longer parse, so they are asked again (and still conflict); nothing else is sent.
  strict = LabelJudge()
  launch.run_config(_config(tmp_path, label_policy="strict"), judge=_judge(strict))
  assert sorted(strict.asked) == ["0", "0"]
  results = _results(tmp_path)
  stats = results["stats"]
  assert (stats["label_policy"], stats["multi_label_replies"], stats["conflicting_label_replies"]) == (
      "strict", 4, 2)
  assert (stats["unparsed"], stats["replies"]) == (2, 14)
  assert [r["sample_id"] for r in results["incomplete"]] == ["0"]
  recs = _records(tmp_path)
  assert recs["0"]["verdict"] is None and recs["1"]["verdict"] is not None
  errors = [o["error"] for o in recs["0"]["orders"]]
  assert all(e.startswith("unparsed: label lines disagree (Answer1, Answer2)") and "'strict'" in e for e in errors)
  (m,) = results["leaderboard"]
  assert (m["n_judged"], m["n_incomplete"]) == (6, 1)

  # The run's argument overrides the config; back on last_line everything replays from the cache.
  again = LabelJudge()
  launch.run_config(_config(tmp_path, label_policy="strict"), judge=_judge(again), label_policy="last_line")
  assert again.asked == []
  assert _results(tmp_path)["stats"]["unparsed"] == 0 and _records(tmp_path)["0"]["verdict"] == protocol.TIE


def test_policies_agree_without_conflicts(tmp_path):
  # Aggregation is untouched by the policy when no reply has conflicting label lines.
  replies = {"1": REPEATED, "3": "Answer2"}
  launch.run_config(_config(tmp_path / "a"), judge=_judge(LabelJudge(replies)))
  launch.run_config(_config(tmp_path / "b", label_policy="strict"), judge=_judge(LabelJudge(replies)))
  a, b = _results(tmp_path / "a"), _results(tmp_path / "b")
  assert a["leaderboard"] == b["leaderboard"] and a["elo"] == b["elo"]
  assert a["stats"]["multi_label_replies"] == b["stats"]["multi_label_replies"] == 2


def test_a_bad_policy_fails_before_anything_runs(tmp_path):
  fn = LabelJudge()
  with pytest.raises(ValueError, match=r"config protocol.label_policy must be one of 'last_line', 'strict', "
                                       r"got 'last'"):
    launch.run_config(_config(tmp_path, label_policy="last"), judge=_judge(fn))
  with pytest.raises(ValueError, match=r"--label_policy must be one of 'last_line', 'strict', got 'Strict'"):
    launch.run_config(_config(tmp_path), judge=_judge(fn), label_policy="Strict")
  assert fn.asked == [] and not (tmp_path / "results.json").exists()


# --- the unparsed-rate warning -------------------------------------------------------------------

GARBAGE = "I think the first one is good but also the second one. " * 6  # 336 characters, no label line


def test_a_judge_that_mostly_fails_to_vote_is_warned_about(tmp_path, caplog):
  # Samples 0-5 get garbage in both orders: 12 of 14 replies unparsed; sample 6 votes.
  replies = {str(i): GARBAGE if i % 2 else f"garbage {i}" for i in range(6)}
  with caplog.at_level("WARNING"):
    launch.run_config(_config(tmp_path), judge=_judge(LabelJudge(replies)))
  results = _results(tmp_path)
  (warning,) = results["warnings"]
  assert ("judge local:label-judge left 12 of 14 replies unparsed (85.7 %, above protocol.max_unparsed_rate=0.2)"
          in warning)
  # The first three unparsed replies in plan order (samples 0, 0, 1), quoted on one line, long ones cut at 200.
  assert 'First unparsed replies: "garbage 0"; "garbage 0"; "' + GARBAGE[:200] + '..."' in warning
  assert results["stats"]["unparsed_examples"] == ["garbage 0", "garbage 0", GARBAGE[:200] + "..."]
  assert results["stats"]["max_unparsed_rate"] == 0.2
  board = (tmp_path / "leaderboard.md").read_text()
  assert board.index("**Warning:** " + warning) < board.index("| rank |")
  logged = [r.getMessage() for r in caplog.records if "max_unparsed_rate" in r.getMessage()]
  assert logged == [warning]  # once, at the end
  assert caplog.records[-1].getMessage() == warning


def test_a_well_behaved_judge_and_the_threshold_itself_do_not_warn(tmp_path, caplog):
  with caplog.at_level("WARNING"):
    launch.run_config(_config(tmp_path / "good"), judge=_judge(LabelJudge()))
  assert _results(tmp_path / "good")["warnings"] == []
  assert "**Warning:**" not in (tmp_path / "good" / "leaderboard.md").read_text()
  assert not any("max_unparsed_rate" in r.getMessage() for r in caplog.records)
  # Sample 0 unparsed in both orders: 2 of 14. A threshold of exactly that rate does not warn, just below does.
  one_bad = {"0": "no idea"}
  launch.run_config(_config(tmp_path / "at", max_unparsed_rate=2 / 14), judge=_judge(LabelJudge(one_bad)))
  assert _results(tmp_path / "at")["warnings"] == []
  launch.run_config(_config(tmp_path / "below", max_unparsed_rate=0.14), judge=_judge(LabelJudge(one_bad)))
  (warning,) = _results(tmp_path / "below")["warnings"]
  assert "2 of 14 replies unparsed (14.3 %, above protocol.max_unparsed_rate=0.14)" in warning
  assert '"no idea"' in warning


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_a_bad_max_unparsed_rate_is_a_config_error(tmp_path, bad):
  fn = LabelJudge()
  with pytest.raises(ConfigError, match=r"config protocol.max_unparsed_rate must be a number from 0 to 1, got"):
    launch.run_config(_config(tmp_path, max_unparsed_rate=bad), judge=_judge(fn))
  assert fn.asked == [] and not (tmp_path / "results.json").exists()
  for wrong in ("0.2", True, None):  # config files are typed; a direct runner call is not
    with pytest.raises(ConfigError, match="max_unparsed_rate must be a number"):
      runner.check_max_unparsed_rate(wrong)
