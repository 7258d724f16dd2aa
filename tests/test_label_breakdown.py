"""experiments.label_breakdown: per-label accuracy read back from the runner's samples.jsonl."""
import json
import os

import pytest

from experiments import label_breakdown
from experiments import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(i, options, answer, correct):
  prompt = "\nWhat is it?\n" + "\n".join(f"{l}: {o}" for l, o in zip("ABCD", options)) + "\nAnswer:"
  return {"sample_id": f"s{i}", "prompt": prompt, "answer": answer, "correct": correct, "output": "x"}


def _write(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))


def test_breakdown_per_true_label(tmp_path, capsys):
  config = os.path.join(REPO, "configs", "demo.py")
  arg = sweep.sweep_args(config)[-1]                     # arm=related,seed=0
  workdir = sweep.workdir_for(str(tmp_path), config, arg)
  # Option order varies per sample: the label comes from the answer letter, not the position.
  rows = [_sample(0, ["Normal", "COVID-19"], "B", True), _sample(1, ["COVID-19", "Normal"], "A", False),
          _sample(2, ["COVID-19", "Normal"], "B", True), _sample(3, ["Normal", "COVID-19"], "A", True)]
  _write(os.path.join(workdir, "eval", "step_10", "samples.jsonl"), [rows[0]])        # an earlier evaluation
  _write(os.path.join(workdir, "eval", "step_444", "samples.jsonl"), rows)
  out = tmp_path / "tab"
  assert label_breakdown.main(["--config", config, "--root", str(tmp_path), "--out", str(out)]) == 0
  table = json.loads((tmp_path / "tab.json").read_text())[arg]
  assert table["COVID-19"] == {"n": 2, "correct": 1, "accuracy": 0.5}
  assert table["Normal"] == {"n": 2, "correct": 2, "accuracy": 1.0}
  assert "| COVID-19 | 2 | 50.0 |" in capsys.readouterr().out


def test_bad_lines_name_the_file_and_line(tmp_path):
  path = tmp_path / "samples.jsonl"
  path.write_text(json.dumps(_sample(0, ["a", "b"], "A", True)) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"samples.jsonl:2: not JSON"):
    label_breakdown.breakdown(str(path))
  path.write_text(json.dumps(_sample(0, ["a", "b"], "C", True)) + "\n")
  with pytest.raises(ValueError, match="'s0'.*'C'"):
    label_breakdown.breakdown(str(path))


def test_no_runs_is_an_error(tmp_path):
  assert label_breakdown.main(["--config", os.path.join(REPO, "configs", "demo.py"), "--root", str(tmp_path)]) == 1


def test_breakdown_on_a_gs_root(gcs_root):
  from medcg import fileio
  config = os.path.join(REPO, "configs", "demo.py")
  arg = sweep.sweep_args(config)[-1]
  workdir = sweep.workdir_for(gcs_root, config, arg)
  rows = [_sample(0, ["Normal", "COVID-19"], "B", True), _sample(1, ["COVID-19", "Normal"], "B", False)]
  fileio.atomic_write_text(f"{workdir}/eval/step_9/samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  assert label_breakdown.main(["--config", config, "--root", gcs_root, "--out", f"{gcs_root}/tab"]) == 0
  table = fileio.read_json(f"{gcs_root}/tab.json")[arg]
  assert table["COVID-19"]["n"] == 1 and table["Normal"] == {"n": 1, "correct": 0, "accuracy": 0.0}
