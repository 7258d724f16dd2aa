"""--launcher slurm through submitit's local executor: real jobs (a controller process per job, one process per
task) running real tiny trainings. The SLURM path without SLURM: the same TrainJob, JobEnvironment, requeue.

Three runs to completion and collected; one run as a 2-task job whose processes join jax.distributed on loopback
and match the single-process losses; a job killed outright and resumed by launching again; a job of one and of
two tasks preempted (USR2, as SLURM signals before the limit) that checkpoints, requeues itself and finishes.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import CPU_COLLECTIVE_FLAGS
from experiments import sweep
from test_train import env as train_env
from test_train import run_log
from test_train import train_cmd
from test_train import write_config_file

# Not importorskip: importing submitit configures logging (see slurm._submitit); the launcher imports it itself.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit is not installed")
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def sweep_config(path, shards: str, args: list[str], overrides: dict) -> str:
  """A sweep config over the trainer tests' micro model: get_sweep() -> `args` (seed=N), get_config(arg)."""
  path.write_text(textwrap.dedent(f"""
      import os
      import sys
      sys.path.insert(0, {TESTS!r})
      from test_train import micro_config
      def get_sweep():
        return {args!r}
      def get_config(arg=None):
        c = micro_config({shards!r})
        c.seed = int(dict(kv.split("=") for kv in (arg or "seed=0").split(","))["seed"])
        for k, v in {overrides!r}.items():
          node = c
          *parents, leaf = k.split(".")
          for p in parents:
            node = node[p]
          node[leaf] = v
        # A relaunch may shorten the run (the trainer resumes a changed config and says what changed).
        c.train.steps = int(os.environ.get("MEDCG_TEST_STEPS", c.train.steps))
        return c
  """))
  return str(path)


def slurm_argv(config: str, root, *extra: str) -> list[str]:
  return ["--config", config, "--launcher", "slurm", "--submitit_cluster", "local", "--root", str(root),
          "--time", "15", "--poll_s", "0.5", "--python", sys.executable, *extra]


@pytest.fixture
def job_env(monkeypatch):
  """What the jobs inherit (the local executor copies this process's environment): CPU, the repo importable."""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + TESTS)
  return monkeypatch


def test_three_runs_as_jobs_to_completion_then_collected(synth_shards, tmp_path, job_env, capsys):
  job_env.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {CPU_COLLECTIVE_FLAGS}")
  args = ["seed=0", "seed=1", "seed=2"]
  config = sweep_config(tmp_path / "cfg.py", synth_shards, args, {"train.steps": 2, "train.log_batches": False})
  root = tmp_path / "runs"
  assert sweep.main(slurm_argv(config, root)) == 0
  captured = capsys.readouterr()
  err = captured.err
  assert "3 runs: 0 finished already, 3 to submit\n" in err
  for arg in args:
    wd = sweep.workdir_for(str(root), config, arg)
    assert re.search(rf"\[submitted [123]/3\] {arg} -> {re.escape(wd)}: job \d+ \(log: {re.escape(wd)}/sweep.log\)",
                     err)
    assert re.search(rf"\[done [123]/3\] {arg} in .*: accuracy \d+\.\d % \(n=\d+\)", err)
    assert json.load(open(os.path.join(wd, "results.json")))["overall"]["n"] > 0
    log = open(os.path.join(wd, "sweep.log")).read()
    assert log.startswith("[slurm job ") and "finished at step 2" in log
    job = json.load(open(os.path.join(wd, "slurm_job.json")))
    assert job["cluster"] == "local" and os.path.exists(job["stdout"])  # submitit's own log, under --submitit_dir
  assert "sweep: 3 finished, 0 failed, 0 skipped" in err
  assert sorted(json.loads(captured.out)["runs"]) == args  # collected at the end (this config has no collect())
  # Launched again: every run is skipped, nothing is submitted.
  assert sweep.main(slurm_argv(config, root)) == 0
  err = capsys.readouterr().err
  assert "3 runs: 3 finished already, 0 to submit" in err and "[submitted" not in err


def test_a_two_task_job_joins_jax_distributed_and_matches_one_process(synth_shards, tmp_path, job_env, capsys):
  cfg_file = write_config_file(tmp_path / "one.py", synth_shards, {"train.steps": 3})
  one = tmp_path / "one"
  subprocess.run(train_cmd(cfg_file, str(one)), env=train_env(8), check=True, capture_output=True, timeout=600)
  # The same run as one job of two tasks with 4 devices each: TrainJob gives each task the coordinator, the
  # process count and its rank from submitit's JobEnvironment.
  job_env.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {CPU_COLLECTIVE_FLAGS}")
  config = sweep_config(tmp_path / "cfg.py", synth_shards, ["seed=0"], {"train.steps": 3})
  root = tmp_path / "runs"
  assert sweep.main(slurm_argv(config, root, "--ntasks_per_node", "2")) == 0, capsys.readouterr().err
  wd = sweep.workdir_for(str(root), config, "seed=0")
  log0, log1 = open(os.path.join(wd, "sweep.log")).read(), open(os.path.join(wd, "sweep.task1.log")).read()
  assert re.match(r"\[slurm job \d+ task 0/2 on .*\] .* --coordinator_address=127\.0\.0\.1:\d+ --num_processes=2 "
                  r"--process_id=0\n", log0)
  assert "--process_id=1" in log1.splitlines()[0]
  a, b = run_log(one, "loss"), run_log(wd, "loss")  # process 0 logs the global loss of every step
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], atol=1e-5)


def _wait_for(predicate, timeout: float, what: str):
  t = time.monotonic()
  while time.monotonic() - t < timeout:
    value = predicate()
    if value:
      return value
    time.sleep(0.2)
  raise AssertionError(f"timed out waiting for {what}")


def _checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def test_a_killed_job_resumes_from_its_checkpoint_when_launched_again(synth_shards, tmp_path, job_env):
  job_env.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {CPU_COLLECTIVE_FLAGS}")
  config = sweep_config(tmp_path / "cfg.py", synth_shards, ["seed=0"], {"train.steps": 1000, "checkpoint.every": 2})
  root = tmp_path / "runs"
  wd = sweep.workdir_for(str(root), config, "seed=0")
  # The sweep in a session of its own: killing the session kills the job with it (controller, task, trainer),
  # as scancel or a node failure would.
  cmd = [sys.executable, "-m", "experiments.sweep", *slurm_argv(config, root)]
  proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    _wait_for(lambda: len(_checkpoint_steps(wd)) >= 2, 300, "two checkpoints")
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
  killed_at = max(_checkpoint_steps(wd))
  assert killed_at >= 4 and not os.path.exists(os.path.join(wd, "results.json"))
  # Launched again (two more steps to train): the run resumes from the checkpoint and finishes.
  job_env.setenv("MEDCG_TEST_STEPS", str(killed_at + 2))
  assert sweep.main(slurm_argv(config, root)) == 0
  log = open(os.path.join(wd, "sweep.log")).read()
  assert log.count("[slurm job ") == 2
  assert f"resumed from step {killed_at} of {killed_at + 2}" in log, log[-3000:]
  assert f"finished at step {killed_at + 2}" in log
  assert os.path.exists(os.path.join(wd, "results.json"))


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_preempted_job_checkpoints_requeues_itself_and_finishes(synth_shards, tmp_path, job_env, capsys, tasks):
  """USR2 is what SLURM sends every task --signal_delay_s before a time limit (and on preemption, as submitit
  asks). With two tasks, both trainers must stop at the same step (a save is collective) and resume together."""
  job_env.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {CPU_COLLECTIVE_FLAGS}")
  config = sweep_config(tmp_path / "cfg.py", synth_shards, ["seed=0"], {"train.steps": 40, "checkpoint.every": 2})
  root = tmp_path / "runs"
  wd = sweep.workdir_for(str(root), config, "seed=0")
  logs = [os.path.join(wd, "sweep.log")] + [os.path.join(wd, f"sweep.task{k}.log") for k in range(1, tasks)]
  sent = {}

  def pid(log):
    return os.path.exists(log) and re.search(r"pid (\d+)\]", open(log).read())

  def preempt():
    pids = [int(_wait_for(lambda: pid(log), 300, f"{log}'s first line").group(1)) for log in logs]
    _wait_for(lambda: _checkpoint_steps(wd), 300, "a checkpoint")
    sent["steps"] = _checkpoint_steps(wd)
    for p in pids:
      os.kill(p, signal.SIGUSR2)  # each task forwards SIGTERM to its medcg.train

  import threading
  thread = threading.Thread(target=preempt, daemon=True)
  thread.start()
  assert sweep.main(slurm_argv(config, root, "--ntasks_per_node", str(tasks))) == 0
  thread.join(timeout=5)
  assert sent, "the job ended before it could be preempted"
  log = open(logs[0]).read()
  assert log.count("[slurm job ") == 2, log[-3000:]  # the requeued attempt appends to the same log
  first, second = log.split("[slurm job ")[1:]
  assert "SIGTERM: checkpointing at the next step boundary" in first
  step = int(re.search(r"resumed from step (\d+) of 40", second).group(1))
  assert step >= max(sent["steps"]) and "finished at step 40" in second
  for other in logs[1:]:
    assert open(other).read().count("[slurm job ") == 2  # every task was started again
  assert "[done 1/1] seed=0" in capsys.readouterr().err
