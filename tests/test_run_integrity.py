"""Run integrity: a workdir holds one experiment, evaluation loads what was trained, no step is lost or logged
twice, bad inputs fail early and clearly. Micro models (tests/test_train.py) keep compiles short."""
import json
import os
import signal
import subprocess
import time

import pytest

from medcg import fileio
from medcg.eval import __main__ as eval_main
from medcg.train import checkpoint as ckpt_lib
from medcg.train import provenance
from medcg.train import trainer
from test_train import env, micro_config, start_and_wait_for_steps, train_cmd, write_config_file


def _train(c, wd, **kw):
  c.mesh.num_devices = 1
  return trainer.train(c, str(wd), **kw)


def _rows(path):
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# A workdir holds one experiment.
def test_resume_with_another_config_is_refused_before_any_write(synth_shards, tmp_path):
  wd = tmp_path / "run"
  _train(micro_config(synth_shards, steps=2, log_batches=False), wd)
  before = {name: (wd / name).read_bytes() for name in ("config.json", "run.json", "metrics.jsonl")}
  other = micro_config(synth_shards, steps=2, log_batches=False, lr=2e-3)
  other.data.mixture = [(5, "train", 24)]
  with pytest.raises(provenance.ProvenanceError) as e:
    _train(other, wd)
  message = str(e.value)
  assert "holds another experiment" in message and "--overwrite" in message
  assert "train.lr: 0.001 -> 0.002" in message, message
  assert "data.mixture:" in message and "mesh.num_devices" not in message  # only what differs
  assert {name: (wd / name).read_bytes() for name in before} == before     # nothing written


def test_allowed_changes_resume_and_the_run_record_keeps_every_attempt(synth_shards, tmp_path):
  wd = tmp_path / "run"
  _train(micro_config(synth_shards, steps=2, log_batches=False), wd)
  result = _train(micro_config(synth_shards, steps=3, log_batches=False), wd)  # extend the run
  assert result.step == 3 and len(result.losses) == 1
  record = json.loads((wd / "run.json").read_text())
  assert [a["resumed_from_step"] for a in record["attempts"]] == [None, 2]
  assert record["attempts"][1]["config_changes"] == [{"key": "train.steps", "old": 2, "new": 3}]
  assert all(a["git_commit"] and a["host_count"] == 1 for a in record["attempts"])
  assert json.loads((wd / "config.json").read_text())["train"]["steps"] == 3
  assert [r["step"] for r in _rows(wd / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3]


def test_overwrite_is_needed_and_deletes_the_old_run_whole(synth_shards, tmp_path):
  cfg_b = write_config_file(tmp_path / "b.py", synth_shards, {"train.steps": 2, "mesh.num_devices": 1,
                                                               "train.lr": 5e-4})
  wd = tmp_path / "run"
  _train(micro_config(synth_shards, steps=2), wd)
  r = subprocess.run(train_cmd(cfg_b, str(wd)), env=env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "holds another experiment" in r.stderr and "train.lr" in r.stderr and "--overwrite" in r.stderr
  assert ckpt_lib.latest_step(str(wd / "checkpoints")) == 2  # the old run is intact
  r = subprocess.run(train_cmd(cfg_b, str(wd), "--overwrite"), env=env(), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((wd / "config.json").read_text())["train"]["lr"] == 5e-4
  assert len(json.loads((wd / "run.json").read_text())["attempts"]) == 1  # the old history went with it
  assert not [p for p in tmp_path.iterdir() if ".deleting-" in p.name]


def test_a_half_deleted_workdir_is_refused(synth_shards, tmp_path):
  wd = tmp_path / "run"
  _train(micro_config(synth_shards, steps=1, log_batches=False), wd)
  (wd / "config.json").unlink()  # what an interrupted --overwrite on an object store leaves
  with pytest.raises(provenance.ProvenanceError, match="no config.json"):
    _train(micro_config(synth_shards, steps=1, log_batches=False), wd)


def test_provenance_diff_and_allow_list():
  old = {"train": {"lr": 1e-3, "steps": 4}, "data": {"mixture": [[5, "train", 24]]}, "eval": {"mode": "likelihood"}}
  new = {"train": {"lr": 1e-3, "steps": 8}, "data": {"mixture": [(5, "train", 12)]}, "eval": {"mode": "generate"}}
  changes = provenance.diff(old, new)
  assert [k for k, _, _ in changes] == ["data.mixture", "eval.mode", "train.steps"]
  assert [k for k, _, _ in changes if not provenance.resumable(k)] == ["data.mixture"]
  assert not provenance.resumable("train.lr") and not provenance.resumable("train.stepsize")


# ----------------------------------------------------------------------------------------------------------
# Evaluation loads exactly what was trained.
def _eval_like_the_trainer(wd, out):
  results, _ = eval_main.run(str(wd), out=str(out))
  return results


def _same_results(a, b):
  for key in ("overall", "per_subset", "checkpoint", "checkpoint_fingerprint", "config_fingerprint", "step"):
    assert a[key] == b[key], key


@pytest.fixture(scope="module")
def scratch_run(synth_shards, tmp_path_factory):
  wd = tmp_path_factory.mktemp("scratch") / "run"
  _train(micro_config(synth_shards, steps=3, log_batches=False, lr=3e-3), wd)
  return wd


def test_eval_equals_the_trainers_evaluation_for_a_scratch_run(scratch_run, tmp_path):
  trained = json.loads((scratch_run / "results.json").read_text())
  _same_results(_eval_like_the_trainer(scratch_run, tmp_path / "eval"), trained)
  assert (tmp_path / "eval" / "samples.jsonl").read_text() == \
      (scratch_run / "eval" / "step_3" / "samples.jsonl").read_text()


def test_eval_equals_the_trainer_for_init_from_runs_trained_or_not(synth_shards, scratch_run, tmp_path):
  # An untrained arm started from another run's params: the trainer evaluates those params, so must medcg.eval.
  untrained = micro_config(synth_shards, steps=0, log_batches=False, init_from=str(scratch_run))
  untrained.data.mixture = []
  _train(untrained, tmp_path / "untrained")
  from_init = json.loads((tmp_path / "untrained" / "results.json").read_text())
  assert from_init["checkpoint"]["source"] == f"init_from:{scratch_run}"
  _same_results(_eval_like_the_trainer(tmp_path / "untrained", tmp_path / "e1"), from_init)
  # ... and they are the scratch run's step-3 params, not the seeded init.
  assert (tmp_path / "e1" / "samples.jsonl").read_text() == \
      (scratch_run / "eval" / "step_3" / "samples.jsonl").read_text()

  trained = micro_config(synth_shards, steps=2, log_batches=False, init_from=str(scratch_run))
  _train(trained, tmp_path / "trained")
  _same_results(_eval_like_the_trainer(tmp_path / "trained", tmp_path / "e2"),
                json.loads((tmp_path / "trained" / "results.json").read_text()))


def test_eval_of_an_untrained_scratch_arm_and_of_a_trained_run_without_checkpoint(synth_shards, tmp_path):
  baseline = micro_config(synth_shards, steps=0, log_batches=False)
  baseline.data.mixture = []
  _train(baseline, tmp_path / "baseline")
  _same_results(_eval_like_the_trainer(tmp_path / "baseline", tmp_path / "e"),
                json.loads((tmp_path / "baseline" / "results.json").read_text()))

  crashed = tmp_path / "crashed"  # a trained arm that died before its first checkpoint
  fileio.makedirs(crashed)
  (crashed / "config.json").write_text(micro_config(synth_shards, steps=5).to_json_best_effort())
  with pytest.raises(trainer.NotAWorkdirError, match=f"{crashed}: a trained run .* no checkpoint"):
    trainer.load_model_from_workdir(str(crashed))


def test_init_from_with_other_shapes_fails_before_compiling(synth_shards, scratch_run, tmp_path, monkeypatch):
  c = micro_config(synth_shards, steps=2, log_batches=False, init_from=str(scratch_run))
  c.model.llm.update(dict(hidden_size=96, num_heads=6))
  def no_compile(*a, **k):
    raise AssertionError("initial params were built: the shape check came too late")
  monkeypatch.setattr(trainer, "initial_params", no_compile)
  t0 = time.perf_counter()
  with pytest.raises(ckpt_lib.ParamMismatchError) as e:
    _train(c, tmp_path / "wide")
  assert "parameter llm/embed/embedding" in str(e.value) and ", 64)" in str(e.value) and ", 96)" in str(e.value)
  assert str(scratch_run) in str(e.value)
  print(f"shape check failed after {time.perf_counter() - t0:.1f} s")


# ----------------------------------------------------------------------------------------------------------
# No lost steps, none logged twice.
def _tb_steps(logdir, tag="train/loss"):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return [e.step for e in acc.Scalars(tag)]


def test_restart_after_a_killed_attempt_without_checkpoint_logs_each_step_once(synth_shards, tmp_path):
  cfg = write_config_file(tmp_path / "cfg.py", synth_shards, {"train.steps": 6, "mesh.num_devices": 1})
  wd = tmp_path / "run"
  proc = start_and_wait_for_steps(cfg, wd, 2)
  batches = wd / "batches.jsonl"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert ckpt_lib.latest_step(str(wd / "checkpoints")) is None
  subprocess.run(train_cmd(cfg, str(wd)), env=env(), check=True, capture_output=True, timeout=600)
  steps = [r["step"] for r in _rows(wd / "metrics.jsonl") if "train/loss" in r]
  assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 6
  assert [r["step"] for r in _rows(batches)] == [1, 2, 3, 4, 5, 6]
  assert _tb_steps(wd / "tb") == steps  # TensorBoard drops the killed attempt's events (purge at step 1)


def test_periodic_checkpoints_by_time(synth_shards, tmp_path):
  c = micro_config(synth_shards, steps=3, log_batches=False)
  c.checkpoint.every_minutes = 1e-9  # due at every step boundary
  c.checkpoint.keep = 5
  _train(c, tmp_path / "run")
  assert ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [1, 2, 3]


def test_release_configs_checkpoint_at_least_every_30_minutes():
  from configs import cg_table3
  c = cg_table3.get_config("row=15,arm=related,data=medmat,model=llava-1.5-7b")
  assert 0 < c.checkpoint.every_minutes <= 30
