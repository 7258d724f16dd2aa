"""The sweep's remote launchers without their clusters: the exact sbatch script submitit writes (through a fake
sbatch), the exact tpu-vm and xpk commands, the tpu-vm sequence run against a fake gcloud, and the bad inputs
each refuses in one line. tests/test_slurm_jobs.py runs real jobs through submitit's local executor."""
import json
import os
import re
import shlex
import stat
import sys
import textwrap

import pytest

from experiments import sweep
from experiments.launchers import base
from experiments.launchers import slurm
from experiments.launchers import xpk
from medcg import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _config(tmp_path, args: list[str]) -> str:
  path = tmp_path / "cfg.py"
  path.write_text(f"def get_sweep():\n  return {args!r}\n")
  return str(path)


def _executable(path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
  """sbatch (keeps each script it is given, answers a job id), srun, sacct (answers sacct.txt) on PATH."""
  bin_dir, state = tmp_path / "slurm-bin", tmp_path / "slurm-state"
  bin_dir.mkdir()
  state.mkdir()
  _executable(bin_dir / "sbatch", '#!/bin/sh\nn=$(ls "$FAKE_SLURM" | grep -c "^script")\n'
              'cp "$1" "$FAKE_SLURM/script$n.sh"\necho "Submitted batch job $((4242 + n))"\n')
  _executable(bin_dir / "srun", "#!/bin/sh\nexit 0\n")
  _executable(bin_dir / "sacct", '#!/bin/sh\ncat "$FAKE_SLURM/sacct.txt"\n')
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_SLURM", str(state))
  monkeypatch.setattr(base, "NODE_LOCAL", ())  # tmp_path stands in for the cluster's shared filesystem
  monkeypatch.setattr(sweep, "check_data", lambda *a, **k: None)
  return state


TWO_NODES = ["--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--account", "lab", "--qos", "high",
             "--cpus_per_task", "96", "--mem_gb", "1500", "--time", "1-12:00:00", "--constraint", "h100",
             "--sbatch", "exclusive", "--sbatch", "#SBATCH --mail-type=END", "--setup", "module load cuda/12.4",
             "--array_parallelism", "1", "--python", PY]


def expected_script(folder: str, tasks_per_node: int) -> str:
  return textwrap.dedent(f"""\
      #!/bin/bash

      # Parameters
      #SBATCH --account=lab
      #SBATCH --array=0-1%1
      #SBATCH --chdir={REPO}
      #SBATCH --constraint=h100
      #SBATCH --cpus-per-task=96
      #SBATCH --error={folder}/%A_%a_0_log.err
      #SBATCH --exclusive
      #SBATCH --gpus-per-node=8
      #SBATCH --job-name=medcg-cfg
      #SBATCH --mail-type=END
      #SBATCH --mem=1500GB
      #SBATCH --nodes=2
      #SBATCH --ntasks-per-node={tasks_per_node}
      #SBATCH --open-mode=append
      #SBATCH --output={folder}/%A_%a_0_log.out
      #SBATCH --partition=gpu
      #SBATCH --qos=high
      #SBATCH --requeue
      #SBATCH --signal=USR2@120
      #SBATCH --time=2160

      # setup
      module load cuda/12.4

      # command
      export SUBMITIT_EXECUTOR=slurm
      srun --unbuffered --output {folder}/%A_%a_%t_log.out --error {folder}/%A_%a_%t_log.err --kill-on-bad-exit=1 \
{shlex.quote(PY)} -u -m submitit.core._submit {folder}
      """)


def test_the_sbatch_script_for_two_nodes_of_eight_gpus(fake_slurm, tmp_path, capsys):
  config = _config(tmp_path, ["arm=a", "arm=b", "arm=c"])
  root = tmp_path / "shared" / "runs"
  done = sweep.workdir_for(str(root), config, "arm=a")
  os.makedirs(done)
  open(os.path.join(done, "results.json"), "w").write("{}")
  argv = ["--config", config, "--launcher", "slurm", "--root", str(root), *TWO_NODES]
  folder = f"{root}/cfg/submitit"
  # --dry_run prints the script (submitit's own text) and what each array task runs; nothing is submitted.
  assert sweep.main(argv + ["--dry_run"]) == 0
  out = capsys.readouterr().out
  assert out == expected_script(folder, 1) + "".join(
      f"# done: arm=a ({done})\n" if i < 0 else
      f"# array task {i}: arm={x} -> {PY} -m medcg.train --config={config}:arm={x} "
      f"--workdir={sweep.workdir_for(str(root), config, 'arm=' + x)}\n" for i, x in ((-1, "a"), (0, "b"), (1, "c")))
  assert not os.listdir(fake_slurm)
  # Submitted: submitit writes the same script and hands it to sbatch; every run records its array job id.
  assert sweep.main(argv) == 0
  assert (fake_slurm / "script0.sh").read_text() == expected_script(folder, 1)
  for i, x in enumerate("bc"):
    job = json.load(open(os.path.join(sweep.workdir_for(str(root), config, "arm=" + x), "slurm_job.json")))
    assert job["job_id"] == f"4242_{i}" and job["folder"] == folder
    assert os.path.exists(f"{folder}/4242_{i}_submitted.pkl")  # the pickled TrainJob the array task loads
  err = capsys.readouterr().err.splitlines()
  assert err[:3] == [f"[skip] arm=a: finished ({done})", "3 runs: 1 finished already, 2 to submit",
                     f"[submitted 1/2] arm=b -> {sweep.workdir_for(str(root), config, 'arm=b')}: job 4242_0 "
                     f"(log: {sweep.workdir_for(str(root), config, 'arm=b')}/sweep.log)"]
  assert err[-2] == f"submitted 2 jobs (array 4242, at most 1 at once); follow with: squeue -j 4242; submitit's files: " \
                    f"{folder}"
  # One task per GPU: 8 tasks per node, each given its own GPU by TrainJob.
  assert sweep.main(argv + ["--task_per_gpu", "--dry_run"]) == 0
  assert capsys.readouterr().out.startswith(expected_script(folder, 8))


def test_runs_whose_jobs_are_still_queued_or_running_are_not_submitted_again(fake_slurm, tmp_path, capsys):
  config = _config(tmp_path, ["arm=a", "arm=b"])
  root = tmp_path / "runs"
  argv = ["--config", config, "--launcher", "slurm", "--root", str(root), "--python", PY]
  assert sweep.main(argv) == 0
  (fake_slurm / "sacct.txt").write_text("JobID|State|NodeList\n4242_0|RUNNING|node7\n4242_1|FAILED|node8\n")
  capsys.readouterr()
  assert sweep.main(argv) == 0  # arm=b's job failed: submitted again (a new array, 4243); arm=a's runs on
  err = capsys.readouterr().err.splitlines()
  assert err[0] == f"[skip] arm=a: job 4242_0 is RUNNING ({sweep.workdir_for(str(root), config, 'arm=a')})"
  assert err[1] == "2 runs: 0 finished already, 1 queued or running, 1 to submit"
  assert err[2].startswith("[submitted 1/1] arm=b -> ") and ": job 4243 " in err[2]


def test_a_job_sees_its_rank_coordinator_and_gpu(monkeypatch):
  class Env:  # submitit's JobEnvironment on task 5 of a 2-node job with 8 tasks per node
    cluster, raw_job_id, hostnames, num_tasks, num_nodes, global_rank, local_rank = "slurm", "123456", \
        ["gpu-a01", "gpu-a02"], 16, 2, 13, 5
  job = slurm.TrainJob("arm=a", "/shared/w", [PY, "-m", "medcg.train", "--config=c.py:arm=a", "--workdir=/shared/w"],
                       "/shared/logs")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")  # what SLURM gives every task of the node
  cmd, env = job.command(Env())
  port = 62016  # jax's SLURM detection: job id % 2**12 + 61440
  assert cmd[-3:] == [f"--coordinator_address=gpu-a01:{port}", "--num_processes=16", "--process_id=13"]
  assert env["CUDA_VISIBLE_DEVICES"] == "5"
  assert job.log_path(0) == "/shared/w/sweep.log" and job.log_path(13) == "/shared/w/sweep.task13.log"


@pytest.mark.parametrize("text, minutes", [("90", 90), ("30:30", 31), ("2:00:00", 120), ("1-0", 1440),
                                           ("1-12:30", 2190), ("2-00:00:30", 2881)])
def test_slurm_time_formats(text, minutes):
  assert slurm.time_minutes(text) == minutes


def _error(capsys, argv) -> str:
  assert sweep.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("experiments.sweep: error: ") and "Traceback" not in err, err
  return err


def test_slurm_refuses_what_sbatch_would(fake_slurm, tmp_path, capsys, monkeypatch):
  config = _config(tmp_path, ["arm=a"])
  argv = ["--config", config, "--launcher", "slurm", "--root", str(tmp_path / "runs")]
  assert "--gpus_per_node 16: more than the 8 GPUs a node has (--max_gpus)" in _error(
      capsys, argv + ["--gpus_per_node", "16"])
  assert sweep.main(argv + ["--gpus_per_node", "16", "--max_gpus", "16", "--dry_run"]) == 0
  capsys.readouterr()
  assert ("--time 25h: not a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
          in _error(capsys, argv + ["--time", "25h"]))
  assert "--time 0: the time limit must be above zero" in _error(capsys, argv + ["--time", "0"])
  assert "--sbatch 'time=10': time is set by the launcher; use --time" in _error(capsys, argv + ["--sbatch", "time=10"])
  assert "--task_per_gpu needs --gpus_per_node" in _error(capsys, argv + ["--task_per_gpu"])
  assert "--ntasks_per_node 3 does not divide --gpus_per_node 8" in _error(
      capsys, argv + ["--gpus_per_node", "8", "--ntasks_per_node", "3"])
  assert "--nodes 2: submitit's local executor runs on this one node" in _error(
      capsys, argv + ["--submitit_cluster", "local", "--nodes", "2"])
  assert "give --submitit_dir /shared/..." in _error(
      capsys, ["--config", config, "--launcher", "slurm", "--root", "gs://bucket/runs"])
  # Without SLURM on this machine: the way to submit, or to try it here.
  monkeypatch.setenv("PATH", "/nonexistent")
  assert "no sbatch / srun on this machine's PATH; submit from a SLURM login node" in _error(capsys, argv)


def test_remote_launchers_refuse_a_root_their_machines_cannot_see(tmp_path, capsys, monkeypatch):
  config = _config(tmp_path, ["arm=a"])
  monkeypatch.chdir(tmp_path)
  err = _error(capsys, ["--config", config, "--launcher", "slurm", "--root", "runs", "--dry_run"])
  assert (f"--root runs: a relative path, which a slurm node resolves against its own working directory; give the "
          f"absolute path on a filesystem the nodes share (here: {tmp_path}/runs) or gs://BUCKET/...") in err
  err = _error(capsys, ["--config", config, "--launcher", "slurm", "--root", "/tmp/x/runs", "--dry_run"])
  assert "--root /tmp/x/runs: under /tmp, which is each node's own disk" in err
  for launcher in (["--launcher", "tpu-vm", "--tpu_type", "v5litepod-16"], ["--launcher", "xpk", "--cluster", "c",
                                                                            "--tpu_type", "v5p-16"]):
    err = _error(capsys, ["--config", config, *launcher, "--zone", "z", "--root", str(tmp_path / "runs")])
    assert "runs on machines that do not share this one's disk" in err and "use --root gs://BUCKET/..." in err


def test_slurm_without_submitit_says_how_to_install_it(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
  err = _error(capsys, ["--config", _config(tmp_path, ["arm=a"]), "--launcher", "slurm", "--root", "/shared/r"])
  assert "--launcher slurm needs submitit, which is not installed here: pip install 'submitit>=1.5'" in err


# ------------------------------------------------------------------------------------------------------------
# TPU VMs and GKE.
# ------------------------------------------------------------------------------------------------------------
TPU = ["--launcher", "tpu-vm", "--tpu_type", "v5litepod-16", "--zone", "us-west4-a", "--project", "lab-proj",
       "--repo_url", "https://github.com/lab/medcg.git", "--repo_ref", "0123abc"]
INSTALL = ("'--command=(test -d ~/medcg/.git || git clone --quiet https://github.com/lab/medcg.git ~/medcg) && "
           "cd ~/medcg && git fetch --quiet origin && git checkout --quiet 0123abc && python3 -m venv .venv && "
           ".venv/bin/pip install --quiet -r requirements.txt '\"'\"'jax[tpu]>=0.10.2,<0.13'\"'\"''")


def _qr(verb: str, name: str, *extra: str) -> str:
  return " ".join(["gcloud compute tpus queued-resources", verb, name, "--zone=us-west4-a --project=lab-proj", *extra])


def _ssh(name: str, remote: str) -> str:
  return f"gcloud compute tpus tpu-vm ssh {name} --zone=us-west4-a --project=lab-proj --worker=all {remote}"


def _train(config: str, root: str, arg: str) -> str:
  wd = f"{root}/cfg/{sweep.run_name(arg)}"
  return (f"'--command=cd ~/medcg && MEDCG_DISTRIBUTED=1 .venv/bin/python -m medcg.train --config={config}:{arg} "
          f"--workdir={wd}'")


def test_tpu_vm_commands_one_queued_pod_for_the_sweep(gcs_root, tmp_path, capsys):
  config = _config(tmp_path, ["arm=a", "arm=b", "arm=c"])
  fileio.atomic_write_json(f"{gcs_root}/cfg/arm=a/results.json", {})
  assert sweep.main(["--config", config, "--root", gcs_root, *TPU, "--provisioning", "spot", "--dry_run"]) == 0
  wait = ("until s=$(gcloud compute tpus queued-resources describe medcg-cfg --zone=us-west4-a --project=lab-proj "
          "'--format=value(state.state)') && [ \"$s\" = ACTIVE ]; do case $s in FAILED|SUSPENDED) echo \"queued "
          "resource medcg-cfg: $s\" >&2; exit 1;; esac; sleep 30; done")
  assert capsys.readouterr().out.splitlines() == [
      f"# 2 runs of {config} on one pod (v5litepod-16, queued resources), each deleted after its runs",
      "# done: " + _ssh("medcg-cfg", _train(config, gcs_root, "arm=a")),
      "gcloud compute tpus queued-resources create medcg-cfg --node-id=medcg-cfg --zone=us-west4-a "
      "--project=lab-proj --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
      wait,
      _ssh("medcg-cfg", INSTALL),
      _ssh("medcg-cfg", _train(config, gcs_root, "arm=b")),
      _ssh("medcg-cfg", _train(config, gcs_root, "arm=c")),
      _qr("delete", "medcg-cfg", "--force --quiet")]


def test_tpu_vm_commands_one_pod_per_run(gcs_root, tmp_path, capsys):
  config = _config(tmp_path, ["arm=a", "arm=b"])
  assert sweep.main(["--config", config, "--root", gcs_root, *TPU, "--pod_per_run", "--tpu", "t3", "--keep_tpu",
                     "--dry_run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  names = [re.search(r"create (\S+)", line).group(1) for line in lines if " create " in line]
  assert names == ["t3-" + __import__("hashlib").sha1(a.encode()).hexdigest()[:6] for a in ("arm=a", "arm=b")]
  assert lines[0] == f"# 2 runs of {config} on one pod per run (v5litepod-16, queued resources)"
  verbs = [re.search(r"queued-resources (\w+)|tpu-vm (ssh)", line).group(1, 2) for line in lines[1:]]
  assert [v or w for v, w in verbs] == ["create", "describe", "ssh", "ssh"] * 2  # create, wait, install, run; kept
  assert lines[4] == _ssh(names[0], _train(config, gcs_root, "arm=a"))


def test_xpk_commands(gcs_root, tmp_path, capsys):
  config = _config(tmp_path, ["row=15,arm=baseline_plus,seed=2", "arm=b"])
  argv = ["--config", config, "--root", gcs_root, "--launcher", "xpk", "--cluster", "gke-1", "--tpu_type", "v5p-16",
          "--zone", "us-east5-a", "--num_slices", "2"]
  assert sweep.main(argv + ["--docker_image", "gcr.io/lab/medcg:1", "--dry_run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  name = xpk.workload_name(config, "row=15,arm=baseline_plus,seed=2")
  digest = __import__("hashlib").sha1(f"{config}:row=15,arm=baseline_plus,seed=2".encode()).hexdigest()[:8]
  assert name == f"medcg-cfg-row-15-arm-baseline-p-{digest}" and len(name) == 40
  assert lines[0] == (f"xpk workload create --cluster=gke-1 --workload={name} --tpu-type=v5p-16 --num-slices=2 "
                      f"--zone=us-east5-a --docker-image=gcr.io/lab/medcg:1 --max-restarts=3 '--command=MEDCG_DISTRIBUTED=1 "
                      f"python -m medcg.train --config={config}:row=15,arm=baseline_plus,seed=2 "
                      f"--workdir={gcs_root}/cfg/row=15__arm=baseline_plus__seed=2'")
  assert sweep.main(argv + ["--dry_run"]) == 0  # no image: xpk builds one from the checkout; the command installs
  line = capsys.readouterr().out.splitlines()[1]
  assert (f"--base-docker-image=python:3.11 --script-dir={REPO} --max-restarts=3 '--command=pip install --quiet -r "
          "requirements.txt '\"'\"'jax[tpu]>=0.10.2,<0.13'\"'\"' && MEDCG_DISTRIBUTED=1 python -m medcg.train ") in line
  assert xpk.workload_name(config, "arm=b") != xpk.workload_name(config, "arm=c")


FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if args[2:4] == ["queued-resources", "describe"]:
  states = os.environ["FAKE_QR_STATES"].split(",")
  n = sum(1 for line in open(os.environ["FAKE_GCLOUD_LOG"]) if '"describe"' in line)
  print(states[min(n, len(states)) - 1])
elif args[2:4] == ["tpu-vm", "ssh"]:
  command = next(a for a in args if a.startswith("--command="))[len("--command="):]
  if "git clone" not in command:  # a run: on the fake worker, whose checkout is FAKE_WORKER
    sys.exit(subprocess.run(["bash", "-c", command.replace("~/medcg", os.environ["FAKE_WORKER"])]).returncode)
"""
FAKE_TRAIN = """import sys
from medcg import fileio
args = dict(a[2:].split("=", 1) for a in sys.argv[3:])
print("training", args["config"])
if args["config"].endswith("arm=c"):
  print("ValueError: bad shards")
  sys.exit(3)
fileio.atomic_write_json(args["workdir"] + "/results.json", {"overall": {"n": 60, "correct": 57, "accuracy": 0.95}})
"""


def test_tpu_vm_runs_the_sequence_and_deletes_the_pod_after_a_failure(gcs_root, tmp_path, capfd, monkeypatch):
  bin_dir, worker = tmp_path / "bin", tmp_path / "worker"
  (worker / ".venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", FAKE_GCLOUD)
  (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
  _executable(worker / ".venv" / "bin" / "python", f"#!/bin/sh\nexec {PY} {tmp_path / 'fake_train.py'} \"$@\"\n")
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(tmp_path / "gcloud.jsonl"))
  monkeypatch.setenv("FAKE_QR_STATES", "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
  monkeypatch.setenv("FAKE_WORKER", str(worker))
  monkeypatch.setenv("PYTHONPATH", REPO)
  monkeypatch.setattr(sweep, "check_data", lambda *a, **k: None)
  config = _config(tmp_path, ["arm=a", "arm=b", "arm=c", "arm=d"])
  fileio.atomic_write_json(f"{gcs_root}/cfg/arm=a/results.json", {})
  assert sweep.main(["--config", config, "--root", gcs_root, *TPU, "--poll_s", "0"]) == 3
  calls = [json.loads(line) for line in open(tmp_path / "gcloud.jsonl")]
  assert [c[2:4] + c[4:5] for c in calls] == [
      ["queued-resources", "create", "medcg-cfg"], *[["queued-resources", "describe", "medcg-cfg"]] * 3,
      *[["tpu-vm", "ssh", "medcg-cfg"]] * 3, ["queued-resources", "delete", "medcg-cfg"]]
  assert "git clone" in calls[4][-1] and "arm=b" in calls[5][-1] and "arm=c" in calls[6][-1]
  captured = capfd.readouterr()  # fd level: the runs' output comes to this terminal
  err = [line for line in captured.err.splitlines() if not line.startswith(("Could not", "_request"))]
  wd = f"{gcs_root}/cfg"
  assert err[:6] == [f"[skip] arm=a: finished ({wd}/arm=a)", "4 runs: 1 finished already, 3 to run",
                     "queued resource medcg-cfg: WAITING_FOR_RESOURCES", "queued resource medcg-cfg: PROVISIONING",
                     "queued resource medcg-cfg: ACTIVE", f"[start 1/3] arm=b -> {wd}/arm=b: on medcg-cfg"]
  assert re.fullmatch(r"\[done 1/3\] arm=b in .* s: accuracy 95\.0 % \(n=60\)", err[6]), err[6]
  assert err[7] == f"[start 2/3] arm=c -> {wd}/arm=c: on medcg-cfg"
  assert re.fullmatch(r"\[fail 2/3\] arm=c: exit code 3 after .* s", err[8]), err[8]
  assert err[9] == "sweep: 1 finished, 1 failed, 1 skipped, 1 not started (failed: arm=c)"
  assert "ValueError: bad shards" in captured.out
  assert not fileio.exists(f"{wd}/arm=d/results.json")


def test_tpu_vm_and_xpk_say_what_to_install(gcs_root, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("PATH", "/nonexistent")
  monkeypatch.setattr(sweep, "check_data", lambda *a, **k: None)
  config = _config(tmp_path, ["arm=a"])
  assert "runs gcloud, which is not on this machine's PATH: install the Google Cloud CLI" in _error(
      capsys, ["--config", config, "--root", gcs_root, *TPU])
  assert "runs xpk, which is not on this machine's PATH: pip install xpk" in _error(
      capsys, ["--config", config, "--root", gcs_root, "--launcher", "xpk", "--cluster", "c", "--tpu_type", "v5p-8",
               "--zone", "z"])
  assert "--tpu_type v7x-8: no default runtime for v7x; give --runtime_version" in _error(
      capsys, ["--config", config, "--root", gcs_root, "--launcher", "tpu-vm", "--tpu_type", "v7x-8", "--zone", "z"])
  assert "--launcher tpu-vm needs --zone" in _error(capsys, ["--config", config, "--root", gcs_root, "--launcher",
                                                             "tpu-vm", "--tpu", "x"])


def test_help_has_a_section_per_launcher_and_shows_only_real_defaults(capsys):
  with pytest.raises(SystemExit):
    sweep.main(["--help"])
  out = capsys.readouterr().out
  for section in ("--launcher local", "--launcher slurm (through submitit)", "--launcher tpu-vm",
                  "--launcher xpk", "Google Cloud (--launcher tpu-vm, xpk)"):
    assert f"\n{section}" in out, section
  assert "(default: )" not in out and "(default: [])" not in out  # empty defaults say nothing
  assert "GPUs per node (default: 0)" in out  # a zero is a default worth showing


def test_tpu_vm_needs_a_checkout_the_workers_can_clone(gcs_root, tmp_path, capsys, monkeypatch):
  from experiments.launchers import tpu_vm
  monkeypatch.setattr(tpu_vm, "_git", lambda *args: "")  # no remote, no commit
  err = _error(capsys, ["--config", _config(tmp_path, ["arm=a"]), "--root", gcs_root, "--launcher", "tpu-vm",
                        "--tpu_type", "v5litepod-16", "--zone", "z", "--dry_run"])
  assert "the workers clone this checkout, but it has no git remote 'origin' or commit; give --repo_url" in err
