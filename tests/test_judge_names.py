"""Naming answer files: NAME=PATH, the records' model id, the folder; two files with one name are an error."""
import json
import os
import subprocess
import sys

import pytest

from medcg.errors import ConfigError, UserError
from medcg.judge import data, launch
from test_judge_local import FIXTURES, REPO, _config, _judge, _results


def _eval_run(root, run, source="answers_a.jsonl", **extra):
  """A medcg evaluation output runs/<run>/eval/step_444/samples.jsonl (no model id) from a fixture's answers."""
  folder = root / run / "eval" / "step_444"
  folder.mkdir(parents=True)
  with open(os.path.join(FIXTURES, source)) as f:
    rows = [json.loads(line) for line in f]
  (folder / "samples.jsonl").write_text("".join(
      json.dumps({"sample_id": r["sample_id"], "output": r["answer"], "answer": "gt", **extra}) + "\n"
      for r in rows))
  return str(folder / "samples.jsonl")


def test_answer_specs_split_names_from_paths():
  specs = launch.answer_specs("a=x.jsonl, runs/lr=1e-4/s.jsonl,gs://b/k=v/s.jsonl,./k=v/s.jsonl,y.jsonl", "k")
  assert specs == [("a", "x.jsonl"), (None, "runs/lr=1e-4/s.jsonl"), (None, "gs://b/k=v/s.jsonl"),
                   (None, "./k=v/s.jsonl"), (None, "y.jsonl")]
  for bad in ("=x.jsonl", "a=", " = "):
    with pytest.raises(ConfigError, match=r"config k: entry .* must be PATH or NAME=PATH"):
      launch.answer_specs(bad, "k")


def test_name_precedence_in_read_answers(tmp_path):
  plain = _eval_run(tmp_path, "a")
  assert data.read_answers(plain).name == "step_444"                       # the folder of samples.jsonl
  assert data.read_answers(plain).name_from == "folder"
  assert data.read_answers(plain, "run_a").name == "run_a"                 # NAME=PATH first
  gen = _eval_run(tmp_path, "b", gen_model_id="llava-13b")
  f = data.read_answers(gen)
  assert (f.name, f.name_from) == ("llava-13b", "records' 'gen_model_id' field")
  assert {a.model for a in f.answers.values()} == {"llava-13b"}
  named = _eval_run(tmp_path, "c", name="mine-v2")
  assert data.read_answers(named).name == "mine-v2"
  assert data.read_answers(named, "explicit").name == "explicit"           # NAME= beats the records' id
  # Records that disagree: an error saying how to name the file; NAME= reads it as one model.
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text('{"sample_id": "1", "answer": "a", "name": "x"}\n{"sample_id": "2", "answer": "b", "name": "y"}\n')
  with pytest.raises(data.JudgeDataError, match=r"several models \['x', 'y'\].*NAME=PATH"):
    data.read_answers(str(mixed))
  assert data.read_answers(str(mixed), "xy").name == "xy"


def test_two_runs_at_one_step_named_with_name_equals_path(tmp_path):
  a, b = _eval_run(tmp_path, "a", "answers_a.jsonl"), _eval_run(tmp_path, "b", "answers_b.jsonl")
  cfg = _config(tmp_path / "judge")
  cfg.answers.reference = "ref=" + os.path.join(FIXTURES, "answers_ref.jsonl")
  cfg.answers.candidates = f"run_a={a},run_b={b}"  # both folders are step_444
  launch.run_config(cfg, judge=_judge())  # rank_judge ranks by the "[cand-a #0]" tags in the answer texts
  results = _results(tmp_path / "judge")
  by_model = {m["model"]: m for m in results["leaderboard"]}
  assert (by_model["run_a"]["win"], by_model["run_b"]["lose"]) == (7, 7)
  assert results["reference"] == "ref"
  assert results["models"]["run_a"] == {"answers": a, "name_from": "NAME=PATH", "n_answers": 7,
                                         "decoding": [{}]}
  assert results["models"]["ref"]["name_from"] == "NAME=PATH"


def test_records_model_id_names_the_file(tmp_path):
  a = _eval_run(tmp_path, "a", "answers_a.jsonl", gen_model_id="cand-a")
  b = _eval_run(tmp_path, "b", "answers_b.jsonl", gen_model_id="cand-b")
  cfg = _config(tmp_path / "judge")
  cfg.answers.candidates = f"{a},{b}"
  launch.run_config(cfg, judge=_judge())
  models = _results(tmp_path / "judge")["models"]
  assert sorted(models) == ["cand-a", "cand-b", "ref"]
  assert models["cand-b"]["name_from"] == "records' 'gen_model_id' field"


def test_two_files_with_one_name_are_an_error_naming_both(tmp_path):
  a, b = _eval_run(tmp_path, "a"), _eval_run(tmp_path, "b")
  cfg = _config(tmp_path / "judge")
  cfg.answers.candidates = f"{a},{b}"
  with pytest.raises(launch.AnswerNameClash) as e:
    launch.run_config(cfg, judge=_judge())
  msg = str(e.value)
  assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)
  assert f"answer files {a} (folder) and {b} (folder) both have the model name 'step_444'" in msg
  assert "NAME=PATH" in msg and f"run_a={a},run_b={b}" in msg
  # An explicit name can clash with another file's model id; the reference counts too.
  cfg.answers.candidates = f"ref={a}"
  with pytest.raises(launch.AnswerNameClash, match=r"answers_ref.jsonl \(records' 'model_id' field\) and "
                                                   r".*samples.jsonl \(NAME=PATH\) both have the model name 'ref'"):
    launch.run_config(cfg, judge=_judge())
  assert not (tmp_path / "judge" / "results.json").exists()


def test_a_missing_named_path_says_how_it_was_read(tmp_path):
  cfg = _config(tmp_path / "judge")
  cfg.answers.candidates = "lr=1e-4/samples.jsonl"
  with pytest.raises(data.JudgeDataError, match=r"1e-4/samples.jsonl: file not found .*read as NAME=PATH, "
                                                r"name 'lr'.*write ./lr=1e-4/samples.jsonl"):
    launch.run_config(cfg, judge=_judge())
  assert issubclass(data.JudgeDataError, UserError)  # the CLI prints it as one line


def test_cli_prints_the_clash_as_one_line(tmp_path):
  a, b = _eval_run(tmp_path, "a"), _eval_run(tmp_path, "b")
  cmd = [sys.executable, "-m", "medcg.judge", "--config", os.path.join(REPO, "configs", "judge.py") + ":judge=local",
         f"--config.workdir={tmp_path / 'judge'}", f"--config.data.path={FIXTURES}/questions.json",
         f"--config.data.criteria_path={FIXTURES}/criteria.json",
         f"--config.answers.reference={FIXTURES}/answers_ref.jsonl", f"--config.answers.candidates={a},{b}"]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
  (line,) = [l for l in done.stderr.splitlines() if l.startswith("medcg.judge: error: ")]
  assert a in line and b in line and "'step_444'" in line and "NAME=PATH" in line
