"""experiments.sweep on gs:// roots: pod commands, the shared-workdir rule, collect, logs, the data check first."""
import contextlib
import os
import sys

from experiments import sweep
from experiments.launchers import local as local_launcher
from medcg import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ("arm=baseline,seed=0", "arm=baseline_plus,seed=0", "arm=related,seed=0")


def _fake_results(acc: float) -> dict:
  return {"overall": {"n": 60, "correct": round(60 * acc), "accuracy": acc},
          "per_subset": {"03": {"n": 60, "correct": round(60 * acc), "accuracy": acc}}}


def _main(argv):
  with contextlib.chdir(REPO):  # config paths are the repository's, as on a pod's workers
    return sweep.main(argv)


def test_pod_commands_on_a_gs_root(_fake_gcs_server, capsys):
  argv = ["--config", "configs/demo.py", "--launcher", "print", "--tpu", "NAME", "--zone", "Z", "--root", "gs://b/r",
          "--repo-dir", "/home/me/medcg"]
  assert _main(argv) == 0
  assert capsys.readouterr().out.splitlines() == [
      "gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all '--command=cd /home/me/medcg && MEDCG_DISTRIBUTED=1 "
      f".venv/bin/python -m medcg.train --config=configs/demo.py:{arg} "
      f"--workdir=gs://b/r/demo/{arg.replace(',', '__')}'" for arg in ARGS]


def test_a_local_root_is_refused_for_pods(tmp_path, capsys):
  for launcher in (["--launcher", "print", "--tpu", "NAME", "--zone", "Z"],
                   ["--launcher", "pod", "--tpu", "NAME", "--zone", "Z"]):
    assert _main(["--config", "configs/demo.py", "--root", str(tmp_path / "runs"), *launcher]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--launcher tpu-vm runs on machines that do not share this one's disk" in err
    assert "use --root gs://BUCKET/..." in err
  # Without a TPU the printed commands are local ones, with the root made absolute.
  with contextlib.chdir(tmp_path):
    assert sweep.main(["--config", os.path.join(REPO, "configs", "demo.py"), "--root", "runs"]) == 0
  assert f"--workdir={tmp_path}/runs/demo/arm=related__seed=0" in capsys.readouterr().out


def test_collect_on_a_gs_root(gcs_root, capsys):
  config = os.path.join(REPO, "configs", "demo.py")
  assert sweep.main(["--config", config, "--root", gcs_root, "--collect"]) == 1  # nothing finished yet
  # (`in`: the fake store's server may log to stderr too)
  assert f"0 of 3 runs found under {gcs_root}/demo\n" in capsys.readouterr().err
  for arg, acc in (("arm=baseline,seed=0", 0.5), ("arm=related,seed=0", 0.9)):
    fileio.atomic_write_json(fileio.join(sweep.workdir_for(gcs_root, config, arg), "results.json"),
                             _fake_results(acc))
  out = f"{gcs_root}/tables/demo"
  assert sweep.main(["--config", config, "--root", gcs_root, "--collect", "--out", out]) == 0
  captured = capsys.readouterr()
  assert f"2 of 3 runs found under {gcs_root}/demo\n" in captured.err and "90.0" in captured.out
  assert "90.0" in fileio.read_text(out + ".md")
  assert sorted(fileio.read_json(out + ".json")["runs"]) == ["arm=baseline,seed=0", "arm=related,seed=0"]


def test_run_logs_are_written_locally_and_copied_to_a_gs_workdir(gcs_root, tmp_path):
  workdir = f"{gcs_root}/demo/arm=related__seed=0"
  run = {"arg": "arm=related,seed=0", "workdir": workdir, "done": False,
         "cmd": [sys.executable, "-c", "print('attempt')"]}
  assert local_launcher.run([run], 1, log_dir=str(tmp_path / "logs")) == [("arm=related,seed=0", 0)]
  local = tmp_path / "logs" / "demo" / "arm=related__seed=0" / "sweep.log"
  assert local.read_text() == "attempt\n" == fileio.read_text(f"{workdir}/sweep.log")
  # Another machine (no local log yet) keeps the earlier attempts, as an appended local log would.
  assert local_launcher.run([run], 1, log_dir=str(tmp_path / "other")) == [("arm=related,seed=0", 0)]
  assert fileio.read_text(f"{workdir}/sweep.log") == "attempt\nattempt\n"


def test_the_data_is_checked_before_any_run(tmp_path, capsys):
  config = "configs/demo.py:shards=" + str(tmp_path / "no_shards")
  assert _main(["--config", config, "--launcher", "local", "--root", str(tmp_path / "runs")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"experiments.sweep: error: data not ready for 3 of 3 runs: {tmp_path}/no_shards: no such directory")
  assert "python -m medcg.data synth" in err and "Traceback" not in err
  assert not (tmp_path / "runs").exists()
