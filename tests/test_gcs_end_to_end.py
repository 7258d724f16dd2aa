"""The whole run on gs:// paths, against a fake GCS on loopback (tests/conftest.py `gcs_root`): convert ->
train, SIGKILL, resume (bitwise the same losses as a run never killed) -> medcg.eval -> sweep --collect."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from experiments import sweep
from medcg import fileio
from medcg.data.__main__ import main as data_main
from test_train import env, train_cmd

SWEEP_ARG = "seed=0"
TESTS = os.path.dirname(os.path.abspath(__file__))


def _config_file(path, shards: str) -> str:
  src = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {TESTS!r})
      from test_train import micro_config
      def get_config(arg=None):
        c = micro_config({shards!r}, steps=6)
        c.mesh.num_devices = 1
        c.checkpoint.every = 1
        return c
      def get_sweep(arg=None):
        return [{SWEEP_ARG!r}]
  """)
  path.write_text(src)
  return str(path)


def _committed_steps(ckpt_dir):
  """Steps orbax has committed on an object store (commit_success.txt), read while the trainer deletes old ones."""
  try:
    names = [p.name for p in fileio.path(ckpt_dir).iterdir()]
  except FileNotFoundError:
    return []
  return [int(n) for n in names if n.isdigit() and fileio.exists(fileio.join(ckpt_dir, n, "commit_success.txt"))]


def _losses(workdir):
  rows = [json.loads(x) for x in fileio.read_text(fileio.join(workdir, "batches.jsonl")).splitlines() if x]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), steps  # each step once
  return {r["step"]: r["loss"] for r in rows}


def test_convert_train_resume_eval_collect_on_gcs(gcs_root, tmp_path):
  from medcg.data import synth
  synth.write_synthmat(tmp_path / "raw", image_size=32, per_subset=24, test_per_subset=12, seed=0,
                       subsets=[3, 5, 28], progress=False)
  shards = f"{gcs_root}/shards"
  assert data_main(["convert", "--src", str(tmp_path / "raw"), "--out", shards, "--image-size", "32",
                    "--staging", str(tmp_path / "staging"), "--no-progress"]) in (0, None)
  cfg = _config_file(tmp_path / "cfg.py", shards)
  root = f"{gcs_root}/runs"

  straight = f"{gcs_root}/straight"
  r = subprocess.run(train_cmd(cfg, straight), env=env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  killed = sweep.workdir_for(root, cfg, SWEEP_ARG)
  assert killed.startswith("gs://")
  proc = subprocess.Popen(train_cmd(cfg, killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while max(_committed_steps(fileio.join(killed, "checkpoints")), default=0) < 3:
    assert proc.poll() is None and time.time() < deadline, "the run never reached step 3"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not fileio.exists(fileio.join(killed, "results.json"))
  r = subprocess.run(train_cmd(cfg, killed), env=env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _losses(killed) == _losses(straight)  # bitwise: floats compared exactly
  record = fileio.read_json(fileio.join(killed, "run.json"))
  assert len(record["attempts"]) == 2 and record["attempts"][1]["resumed_from_step"] >= 3
  assert list(fileio.path(killed).joinpath("tb").iterdir())  # TensorBoard events on the store

  out = f"{gcs_root}/eval-cli"
  r = subprocess.run([sys.executable, "-m", "medcg.eval", f"--workdir={killed}", f"--out={out}"], env=env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  by_cli = fileio.read_json(fileio.join(out, "results.json"))
  by_trainer = fileio.read_json(fileio.join(killed, "results.json"))
  for key in ("overall", "per_subset", "checkpoint_fingerprint", "config_fingerprint"):
    assert by_cli[key] == by_trainer[key], key
  assert fileio.exists(fileio.join(out, "report.md"))

  table_out = f"{gcs_root}/tables/t"
  rc = sweep.main(["--config", cfg, "--root", root, "--collect", "--out", table_out])
  assert rc == 0
  table = fileio.read_json(table_out + ".json")
  assert table["runs"][SWEEP_ARG]["overall"] == by_trainer["overall"]
