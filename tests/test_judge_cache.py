"""The judgement cache: content-addressed keys, WAL + threads, only parsed replies, resume after a crash."""
import json
import os
import sqlite3
import threading

import pytest
from judge_fixtures import fixture_config

from medcg.judge import cache as cache_lib
from medcg.judge import launch, prompts
from medcg.judge.clients import LocalJudge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "data", "judge")

_BASE = dict(sample_id="3", question="q", question_type="open-ended", image_sha256="ab", answer1="x",
             answer2="y", criteria="c", order=1, template="v1", judge="http:h:443/|m",
             decoding={"temperature": 0.0, "max_tokens": 8})


def test_cache_key_depends_on_every_field():
  base = cache_lib.cache_key(**_BASE)
  assert base == cache_lib.cache_key(**dict(reversed(list(_BASE.items()))))  # field order is irrelevant
  changes = dict(sample_id="4", question="q2", question_type="close-ended", image_sha256="cd",
                 answer1="x2", answer2="y2", criteria="c2", order=2, template="v2", judge="http:h:443/|m2",
                 decoding={"temperature": 0.5, "max_tokens": 8})
  keys = {cache_lib.cache_key(**dict(_BASE, **{k: v})) for k, v in changes.items()}
  assert len(keys) == len(changes) and base not in keys
  # Swapping the answers is a different call.
  assert cache_lib.cache_key(**dict(_BASE, answer1="y", answer2="x")) != base


def test_cache_roundtrip_wal_and_refuses_unparsed(tmp_path):
  path = str(tmp_path / "sub" / "c.sqlite")
  with cache_lib.JudgeCache(path) as c:
    assert c.get("k") is None
    c.put("k", "reasoning\nAnswer1", "Answer1")
    with pytest.raises(ValueError, match="only parsed"):
      c.put("k2", "garbage", "")
  with cache_lib.JudgeCache(path) as c:  # persisted across connections
    assert c.get("k") == ("reasoning\nAnswer1", "Answer1") and len(c) == 1
  db = sqlite3.connect(path)
  assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  db.close()


def test_cache_is_safe_from_threads(tmp_path):
  errors = []
  with cache_lib.JudgeCache(str(tmp_path / "c.sqlite")) as c:
    def work(t):
      try:
        for i in range(50):
          c.put(f"{t}-{i}", f"raw {t} {i}", "Answer2")
          assert c.get(f"{t}-{i}") == (f"raw {t} {i}", "Answer2")
      except Exception as e:  # collected: an assert inside a thread would be lost
        errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
      th.start()
    for th in threads:
      th.join()
    assert not errors and len(c) == 300


def _config(workdir):
  return fixture_config(workdir, "judge=local")


class CountingJudge:
  """generate_fn that answers Answer2 (after a line of reasoning) and can crash after N prompts."""

  def __init__(self, crash_after=None, reply="The second answer is better.\nAnswer2"):
    self.prompts, self.crash_after, self.reply = [], crash_after, reply

  def __call__(self, prompts_, images):
    if self.crash_after is not None and len(self.prompts) + len(prompts_) > self.crash_after:
      raise RuntimeError("injected crash")
    self.prompts += prompts_
    return [self.reply] * len(prompts_)


def _judge(fn, identity="local:test-judge@1"):
  return LocalJudge(fn, identity=identity, decoding={"greedy": True, "max_new_tokens": 8}, batch_size=2)


def test_crashed_run_resumes_without_repeating_cached_calls(tmp_path):
  crashing = CountingJudge(crash_after=6)
  with pytest.raises(RuntimeError, match="injected crash"):
    launch.run_config(_config(tmp_path), judge=_judge(crashing))
  assert len(crashing.prompts) == 6 and not (tmp_path / "results.json").exists()
  resumed = CountingJudge()
  launch.run_config(_config(tmp_path), judge=_judge(resumed))
  assert len(resumed.prompts) == 14 - 6
  assert not set(resumed.prompts) & set(crashing.prompts)  # nothing judged twice
  assert (tmp_path / "results.json").exists()


def test_identity_template_and_no_cache_force_fresh_calls(tmp_path, monkeypatch):
  first = CountingJudge()
  launch.run_config(_config(tmp_path), judge=_judge(first))
  again = CountingJudge()
  launch.run_config(_config(tmp_path), judge=_judge(again))
  assert (len(first.prompts), len(again.prompts)) == (14, 0)
  other = CountingJudge()
  launch.run_config(_config(tmp_path), judge=_judge(other, identity="local:other-judge@2"))
  assert len(other.prompts) == 14
  monkeypatch.setattr(prompts, "TEMPLATE_VERSION", "medcg-pairwise-v2-test")
  new_template = CountingJudge()
  launch.run_config(_config(tmp_path), judge=_judge(new_template))
  assert len(new_template.prompts) == 14
  forced = CountingJudge()
  launch.run_config(_config(tmp_path), judge=_judge(forced), read_cache=False)
  assert len(forced.prompts) == 14


def test_unparsed_replies_are_not_cached(tmp_path):
  vague = CountingJudge(reply="Both have merits. Answer2 maybe.")
  launch.run_config(_config(tmp_path), judge=_judge(vague))
  with cache_lib.JudgeCache(str(tmp_path / "judge_cache.sqlite")) as c:
    assert len(c) == 0
  retry = CountingJudge()
  launch.run_config(_config(tmp_path), judge=_judge(retry))
  assert len(retry.prompts) == 14


def test_identical_calls_are_sent_once(tmp_path):
  # A second model with the same answers as cand-a asks exactly the same questions of the judge.
  twin = tmp_path / "twin.jsonl"
  with open(os.path.join(FIXTURES, "answers_a.jsonl")) as f:
    twin.write_text(f.read().replace('"cand-a"', '"cand-a-twin"'))
  cfg = _config(tmp_path / "run")
  cfg.answers.candidates = f"{cfg.answers.candidates},{twin}"
  fn = CountingJudge()
  launch.run_config(cfg, judge=_judge(fn))
  assert len(fn.prompts) == 14
  with open(tmp_path / "run" / "results.json") as f:
    board = {m["model"]: m["win"] for m in json.load(f)["leaderboard"]}
  assert board["cand-a"] == board["cand-a-twin"] and set(board) == {"cand-a", "cand-a-twin"}


def test_a_gcs_cache_path_is_one_clear_error(tmp_path, gcs_root):
  cfg = _config(tmp_path)
  cfg.cache.path = f"{gcs_root}/judge_cache.sqlite"
  with pytest.raises(cache_lib.JudgeCacheError, match=r"config cache.path='gs://.*SQLite needs a local path"):
    launch.run_config(cfg, judge=_judge(CountingJudge()))
  cfg = _config(gcs_root)  # a gs:// workdir: the default cache would be there too
  with pytest.raises(cache_lib.JudgeCacheError, match=r"config cache.path is empty.*SQLite needs a local path"):
    launch.run_config(cfg, judge=_judge(CountingJudge()))
  assert not (tmp_path / "results.json").exists()


def test_outputs_and_answers_on_gcs(tmp_path, gcs_root):
  from medcg import fileio
  cfg = _config(f"{gcs_root}/judge")
  cfg.cache.path = str(tmp_path / "judge_cache.sqlite")  # the cache stays local
  cfg.answers.candidates = f"{gcs_root}/answers/answers_a.jsonl"
  fileio.copy_file(os.path.join(FIXTURES, "answers_a.jsonl"), cfg.answers.candidates)
  fn = CountingJudge()
  paths = launch.run_config(cfg, judge=_judge(fn))
  assert paths["results.json"] == f"{gcs_root}/judge/results.json" and len(fn.prompts) == 14
  results = fileio.read_json(paths["results.json"])
  assert [m["model"] for m in results["leaderboard"]] == ["cand-a"]
  assert "# Judge leaderboard" in fileio.read_text(paths["leaderboard.md"])
  assert len(fileio.read_text(paths["judgements.jsonl"]).splitlines()) == 7
  again = CountingJudge()  # the local cache replays every judgement
  launch.run_config(cfg, judge=_judge(again))
  assert len(again.prompts) == 0
