"""--launcher slurm: one SLURM job per run through submitit (the sweep as one array job, `--array_parallelism`
at once), each job's tasks joined by jax.distributed, preempted and timed-out jobs requeued and resumed.

    python -m experiments.sweep --config configs/cg_table3.py --launcher slurm --root /shared/runs/t3 \\
        --partition gpu --gpus_per_node 8 --cpus_per_task 64 --mem_gb 480 --time 24:00:00 --array_parallelism 16

What a job runs (`TrainJob`, on every task): `medcg.train` for its run as a subprocess, given the coordinator
(the job's first node), the process count and this task's rank from submitit's `JobEnvironment`, so one code
path serves SLURM and submitit's local executor (`--submitit_cluster local`, which the tests use). Its output
goes to WORKDIR/sweep.log (task 0; task k: sweep.task<k>.log); submitit's own files (the sbatch script, the
pickled job, its stdout and stderr) are under `--submitit_dir`.

Preemption and time limits: SLURM sends USR2 `--signal_delay_s` before the limit (submitit's `--signal`). The
job forwards SIGTERM to medcg.train, which checkpoints at its next step boundary and exits; submitit then
calls `TrainJob.checkpoint` and requeues the job (`scontrol requeue`), and the requeued job resumes from the
checkpoint. A job killed outright (scancel, node failure) is resumed by launching the sweep again: finished
runs are skipped, queued or running ones too (their job id is in WORKDIR/slurm_job.json), the rest resume.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from typing import Any

from experiments.launchers import base
from medcg import errors
from medcg import fileio
from medcg.errors import UserError

NAME = "slurm"
HELP = "submit one SLURM job per run (an array job) through submitit"
DATA_IS_LOCAL = True  # a login node sees the cluster's shared filesystem: local data paths are checked from here
JOB_FILE = "slurm_job.json"
INSTALL = "pip install 'submitit>=1.5'"
LOG_ENV = "SUBMITIT_LOG_LEVEL"
# sacct states of a job that will still run (or is running): launching the sweep again must not submit it twice.
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT")
# The sbatch options the launcher sets, with the flag that sets each (None: set by the launcher itself);
# --sbatch may add any other option.
MANAGED = {"partition": "--partition", "time": "--time", "nodes": "--nodes", "qos": "--qos", "account": "--account",
           "constraint": "--constraint", "job-name": "--job_name", "mem": "--mem_gb",
           "ntasks-per-node": "--ntasks_per_node", "gpus-per-node": "--gpus_per_node",
           "cpus-per-task": "--cpus_per_task", "signal": "--signal_delay_s", "array": "--array_parallelism",
           "output": None, "error": None, "open-mode": None, "chdir": None}
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def add_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("--launcher slurm (through submitit)")
  g.add_argument("--partition", default="", help="sbatch --partition (default: the cluster's)")
  g.add_argument("--account", default="", help="sbatch --account")
  g.add_argument("--qos", default="", help="sbatch --qos")
  g.add_argument("--nodes", type=errors.positive_int, default=1, help="nodes per run")
  g.add_argument("--gpus_per_node", type=int, default=0, help="GPUs per node")
  g.add_argument("--max_gpus", type=errors.positive_int, default=8,
                 help="the most GPUs a node of the partition has: a larger --gpus_per_node is refused here")
  g.add_argument("--ntasks_per_node", type=errors.positive_int, default=1,
                 help="processes per node (1: one process sees all the node's GPUs)")
  g.add_argument("--task_per_gpu", action="store_true",
                 help="one process per GPU (--ntasks_per_node = --gpus_per_node; each process sees its own GPU)")
  g.add_argument("--cpus_per_task", type=errors.positive_int, default=None, help="CPUs per task")
  g.add_argument("--mem_gb", type=float, default=None, help="sbatch --mem, in GB per node")
  g.add_argument("--time", default="4:00:00", help=f"sbatch --time ({TIME_FORMATS})")
  g.add_argument("--constraint", default="", help="sbatch --constraint (node features, e.g. a100)")
  g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                 help="another sbatch option, e.g. --sbatch exclusive --sbatch mail-type=END (repeatable)")
  g.add_argument("--setup", action="append", default=[], metavar="LINE",
                 help="a shell line the job script runs before srun, e.g. 'module load cuda' (repeatable)")
  g.add_argument("--array_parallelism", type=errors.positive_int, default=None,
                 help="the most runs of the array at once (default: all)")
  g.add_argument("--job_name", default="", help="default: medcg-<config name>")
  g.add_argument("--signal_delay_s", type=errors.positive_int, default=120,
                 help="USR2 this long before the time limit: the run checkpoints and is requeued")
  g.add_argument("--max_requeues", type=int, default=3, help="requeues after a time-out (preemptions do not count)")
  g.add_argument("--submitit_dir", default="",
                 help="submitit's job files, on a filesystem the nodes share (default: ROOT/<config>/submitit)")
  g.add_argument("--submitit_cluster", choices=("slurm", "local"), default="slurm",
                 help="local: submitit's local executor runs the jobs here (one node), the SLURM path without SLURM")
  g.add_argument("--wait", action="store_true",
                 help="stay until every job has ended, report each, then collect (always with --submitit_cluster local)")


# ------------------------------------------------------------------------------------------------------------
# Flags -> submitit's parameters, checked before anything is submitted.
# ------------------------------------------------------------------------------------------------------------
def time_minutes(text: str) -> int:
  """SLURM's --time formats -> whole minutes (seconds round up)."""
  m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
  if not m:
    raise UserError(f"--time {text}: not a SLURM time limit ({TIME_FORMATS})")
  days, a, b, c = m.groups()
  a, b, c = int(a), int(b or 0), int(c or 0)
  if days is not None:  # D-HH[:MM[:SS]]
    seconds = int(days) * 86400 + a * 3600 + b * 60 + c
  elif c or m.group(4) is not None:  # HH:MM:SS
    seconds = a * 3600 + b * 60 + c
  else:  # MM or MM:SS
    seconds = a * 60 + b
  if seconds <= 0:
    raise UserError(f"--time {text}: the time limit must be above zero")
  return -(-seconds // 60)


def sbatch_options(options: list[str]) -> dict[str, Any]:
  """--sbatch values ('--exclusive', 'mail-type=END', '#SBATCH --gres=gpu:8') -> submitit's additional_parameters."""
  out: dict[str, Any] = {}
  for text in options:
    body = text.strip().removeprefix("#SBATCH").strip().lstrip("-")
    key, eq, value = body.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
      raise UserError(f"--sbatch {text!r}: not an sbatch option (write it as name or name=value, e.g. mail-type=END)")
    if key in MANAGED:
      raise UserError(f"--sbatch {text!r}: {key} is set by the launcher" + (f"; use {MANAGED[key]}" if MANAGED[key]
                                                                           else ""))
    out[key] = value if eq else True
  return out


def tasks_per_node(a: argparse.Namespace) -> int:
  return a.gpus_per_node if a.task_per_gpu else a.ntasks_per_node


def check(a: argparse.Namespace) -> None:
  local = a.submitit_cluster == "local"
  _submitit()
  if a.gpus_per_node < 0:
    raise UserError(f"--gpus_per_node {a.gpus_per_node}: must be 0 or more")
  if a.gpus_per_node > a.max_gpus:
    raise UserError(f"--gpus_per_node {a.gpus_per_node}: more than the {a.max_gpus} GPUs a node has (--max_gpus); "
                    "SLURM would leave the job pending forever or reject it")
  if a.task_per_gpu and not a.gpus_per_node:
    raise UserError("--task_per_gpu needs --gpus_per_node")
  if a.task_per_gpu and a.ntasks_per_node != 1:
    raise UserError("--task_per_gpu sets --ntasks_per_node itself: give one of the two")
  if a.gpus_per_node and tasks_per_node(a) > 1 and a.gpus_per_node % tasks_per_node(a):
    raise UserError(f"--ntasks_per_node {tasks_per_node(a)} does not divide --gpus_per_node {a.gpus_per_node}")
  if a.mem_gb is not None and a.mem_gb <= 0:
    raise UserError(f"--mem_gb {a.mem_gb}: must be above zero")
  if local and a.nodes > 1:
    raise UserError(f"--nodes {a.nodes}: submitit's local executor runs on this one node")
  time_minutes(a.time)
  sbatch_options(a.sbatch)
  base.check_root(a.root, NAME, gcs_only=False, node_local_ok=local)
  if fileio.is_remote(a.root) and not a.submitit_dir:
    raise UserError(f"--root {a.root}: submitit's job files need a directory on a filesystem the nodes share: "
                    "give --submitit_dir /shared/...")
  if a.submitit_dir:
    if fileio.is_remote(a.submitit_dir):
      raise UserError(f"--submitit_dir {a.submitit_dir}: must be a filesystem path the nodes share (not an object "
                      "store: SLURM writes the job logs there)")
    base.check_root(a.submitit_dir, NAME, gcs_only=False, node_local_ok=local)
  if not local and not a.dry_run and not (shutil.which("sbatch") and shutil.which("srun")):
    raise UserError("--launcher slurm: no sbatch / srun on this machine's PATH; submit from a SLURM login node "
                    "(--dry_run prints the job script; --submitit_cluster local runs the jobs here)")


def _submitit():
  # submitit configures logging when imported (logging.config.dictConfig), which closes every handler this
  # process has, absl's with its stream among them. Here it is imported without that; the jobs, which do not
  # inherit the variable, log as submitit does.
  old = os.environ.get(LOG_ENV)
  os.environ[LOG_ENV] = "NOCONFIG"
  try:
    import submitit
  except ImportError:
    raise UserError(f"--launcher slurm needs submitit, which is not installed here: {INSTALL}") from None
  finally:
    if old is None:
      del os.environ[LOG_ENV]
    else:
      os.environ[LOG_ENV] = old
  return submitit


def waits(a: argparse.Namespace) -> bool:
  return a.wait or a.submitit_cluster == "local"


def submitit_folder(a: argparse.Namespace, config_path: str) -> str:
  if a.submitit_dir:
    return os.path.abspath(a.submitit_dir)
  return os.path.join(os.path.abspath(a.root), base.config_stem(config_path), "submitit")


def job_name(a: argparse.Namespace) -> str:
  return a.job_name or "medcg-" + base.config_stem(a.config)


def slurm_parameters(a: argparse.Namespace, n_runs: int) -> dict[str, Any]:
  """SlurmExecutor.update_parameters' arguments (submitit's names for the sbatch options)."""
  params: dict[str, Any] = {
      "job_name": job_name(a), "time": time_minutes(a.time), "nodes": a.nodes, "ntasks_per_node": tasks_per_node(a),
      "signal_delay_s": a.signal_delay_s, "array_parallelism": a.array_parallelism or max(n_runs, 1),
      "wckey": None,  # submitit's default "submitit" is refused where wckeys are enforced
      # A failed task must end the job: the others would wait on it in a collective until the time limit.
      "srun_args": ["--kill-on-bad-exit=1"],
      "additional_parameters": {"requeue": True, "chdir": base.REPO, **sbatch_options(a.sbatch)},
  }
  for key, value in (("partition", a.partition), ("account", a.account), ("qos", a.qos),
                     ("constraint", a.constraint), ("cpus_per_task", a.cpus_per_task),
                     ("gpus_per_node", a.gpus_per_node or None), ("setup", a.setup or None)):
    if value:
      params[key] = value
  if a.mem_gb is not None:
    from submitit.slurm import slurm as submitit_slurm  # submitit's own GB -> sbatch --mem text
    params["mem"] = submitit_slurm._convert_mem(a.mem_gb)
  return params


def executor(a: argparse.Namespace, folder: str, n_runs: int):
  submitit = _submitit()
  python = shlex.quote(a.python)
  if a.submitit_cluster == "local":
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=a.max_requeues, python=python)
    ex.update_parameters(timeout_min=time_minutes(a.time), tasks_per_node=tasks_per_node(a),
                         gpus_per_node=a.gpus_per_node, signal_delay_s=a.signal_delay_s)
    return ex
  ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=a.max_requeues, python=python)
  ex.update_parameters(**slurm_parameters(a, n_runs))
  return ex


def job_script(a: argparse.Namespace, folder: str, n_runs: int) -> str:
  """The sbatch script submitit writes for the sweep's array job (for --dry_run; needs no SLURM here)."""
  _submitit()
  from submitit.slurm import slurm as submitit_slurm
  command = " ".join([shlex.quote(a.python), "-u -m submitit.core._submit", shlex.quote(folder)])
  return submitit_slurm._make_sbatch_string(command=command, folder=folder, map_count=n_runs if n_runs > 1 else None,
                                            **slurm_parameters(a, n_runs))


# ------------------------------------------------------------------------------------------------------------
# What each job runs.
# ------------------------------------------------------------------------------------------------------------
class RunFailed(RuntimeError):
  pass


def coordinator_address(env) -> str:
  """The job's first node, on a port derived from the job id (as jax's own SLURM detection picks it), so every
  task computes the same address without talking to the others."""
  digits = re.sub(r"\D", "", str(env.raw_job_id)) or "0"
  host = "127.0.0.1" if env.cluster == "local" else env.hostnames[0]
  return f"{host}:{int(digits) % 4096 + 61440}"


class TrainJob:
  """One run's medcg.train on one task of its job (submitit calls it on every task). Picklable: it holds the
  run's command and paths only."""

  def __init__(self, arg: str, workdir: str, cmd: list[str], log_dir: str):
    self.arg, self.workdir, self.cmd, self.log_dir = arg, workdir, list(cmd), log_dir

  def log_path(self, rank: int) -> str:
    path = base.local_log(self.workdir, self.log_dir)
    return path if rank == 0 else path[:-len(".log")] + f".task{rank}.log"

  def command(self, env) -> tuple[list[str], dict[str, str]]:
    """The task's medcg.train argv and environment: multi-process flags when the job has several tasks, and
    one GPU per process when a node runs one task per GPU."""
    cmd, child_env = list(self.cmd), dict(os.environ)
    if env.num_tasks > 1:
      cmd += [f"--coordinator_address={coordinator_address(env)}", f"--num_processes={env.num_tasks}",
              f"--process_id={env.global_rank}"]
      per_node = env.num_tasks // max(env.num_nodes, 1)
      visible = [d for d in child_env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
      if per_node > 1 and len(visible) >= per_node:  # SLURM gave the node's GPUs to every task: take ours
        child_env["CUDA_VISIBLE_DEVICES"] = visible[env.local_rank]
    return cmd, child_env

  def __call__(self) -> dict[str, Any]:
    import submitit
    env = submitit.JobEnvironment()
    cmd, child_env = self.command(env)
    log_path = self.log_path(env.global_rank)
    usr = env._usr_sig()
    requeue = signal.getsignal(usr)  # submitit's: checkpoint() and requeue on task 0
    stopped: list[int] = []
    t = time.monotonic()
    with base.appended_log(log_path, self.workdir) as log:
      log.write(f"[slurm job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}, "
                f"pid {os.getpid()}] {shlex.join(cmd)}\n".encode())
      log.flush()
      # medcg.train starts with USR2 ignored (where SLURM signals every process of the step it must not die
      # of it); this task forwards it as SIGTERM, which the trainer checkpoints on.
      signal.signal(usr, signal.SIG_IGN)
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=base.REPO)

      def forward(signum, frame):
        del frame
        stopped.append(signum)
        if proc.poll() is None:
          proc.send_signal(signal.SIGTERM)

      signal.signal(usr, forward)
      rc = proc.wait()
    finished = base.is_done(self.workdir)
    if stopped and not finished and callable(requeue):
      requeue(stopped[0], None)  # task 0: checkpoint() and requeue, then exit; other tasks: returns
    if rc:
      raise RunFailed(f"medcg.train exited with code {rc} after {time.monotonic() - t:.0f} s; log: {log_path}; "
                      f"last log line: {base.last_log_line(log_path)}")
    if env.global_rank == 0 and not finished:
      raise RunFailed(f"medcg.train stopped before the end of training (SIGTERM: scancel or preemption?); "
                      f"launch the sweep again to resume; log: {log_path}")
    return {"arg": self.arg, "workdir": self.workdir, "seconds": time.monotonic() - t}

  def checkpoint(self) -> Any:
    """submitit's hook on preemption / time-out: medcg.train has checkpointed and exited; the requeued job runs
    the same command, which resumes from the workdir's latest checkpoint."""
    import submitit
    return submitit.helpers.DelayedSubmission(TrainJob(self.arg, self.workdir, self.cmd, self.log_dir))


# ------------------------------------------------------------------------------------------------------------
# The launcher.
# ------------------------------------------------------------------------------------------------------------
def mark_active(runs: list[dict[str, Any]], a: argparse.Namespace) -> None:
  """Runs whose job from an earlier launch is still queued or running are skipped (on SLURM: sacct's state)."""
  if a.submitit_cluster != "slurm" or a.dry_run:
    return
  submitit = _submitit()
  for r in runs:
    path = fileio.join(r["workdir"], JOB_FILE)
    if r["done"] or not fileio.exists(path):
      continue
    info = fileio.read_json(path)
    state = submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"]).state
    if state.split(" ")[0] in ACTIVE_STATES:
      r["done"], r["skip_reason"] = True, f"job {info['job_id']} is {state}"


def dry_run(runs: list[dict[str, Any]], a: argparse.Namespace) -> None:
  todo = [r for r in runs if not r["done"]]
  folder = submitit_folder(a, a.config)
  if todo:  # the script first: its #!/bin/bash line must stay the first line
    print(job_script(a, folder, len(todo)), end="")
  for r in runs:
    if r["done"]:
      print(f"# done: {r['arg']} ({r['workdir']})")
  for i, r in enumerate(todo):
    print(f"# {'array task ' + str(i) if len(todo) > 1 else 'the job'}: {r['arg']} -> {shlex.join(r['cmd'])}")


def launch(runs: list[dict[str, Any]], a: argparse.Namespace) -> int:
  progress = base.Progress(runs, verb="submitted")
  progress.begin()
  todo = progress.todo
  if not todo:
    progress.finish()
    return 0
  folder = submitit_folder(a, a.config)
  log_dir = os.path.join(folder, "logs")
  ex = executor(a, folder, len(todo))
  with contextlib.chdir(base.REPO):  # jobs start where they were submitted from: configs/ paths resolve the same
    with ex.batch():
      jobs = [ex.submit(TrainJob(r["arg"], r["workdir"], r["cmd"], log_dir)) for r in todo]
  started = {}
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  for r, job in zip(todo, jobs):
    fileio.atomic_write_json(fileio.join(r["workdir"], JOB_FILE), {
        "job_id": job.job_id, "folder": folder, "cluster": a.submitit_cluster, "submitted": now,
        "stdout": str(job.paths.stdout), "command": r["cmd"]})
    started[job.job_id] = (progress.start(r, base.local_log(r["workdir"], log_dir), note=f"job {job.job_id}"),
                           time.monotonic())
  if not waits(a):
    first = jobs[0].job_id.split("_")[0]
    progress.say(f"submitted {len(jobs)} job{'s' * (len(jobs) != 1)} ({'array ' + first if len(jobs) > 1 else first}"
                 f"{f', at most {a.array_parallelism} at once' if a.array_parallelism else ''}); "
                 f"follow with: squeue -j {first}; submitit's files: {folder}",
                 f"collect when they have ended: python -m experiments.sweep --config {a.config} --root {a.root} "
                 "--collect")
    return 0
  return _wait(progress, todo, jobs, started, log_dir, a.poll_s)


def _wait(progress: base.Progress, todo, jobs, started, log_dir: str, poll_s: float) -> int:
  pending = list(zip(todo, jobs))
  while pending:
    still = []
    for r, job in pending:
      if not job.done():
        still.append((r, job))
        continue
      i, t = started[job.job_id]
      error = job.exception()
      log_path = base.local_log(r["workdir"], log_dir)
      if error is None and base.is_done(r["workdir"]):
        progress.end(i, r, 0, time.monotonic() - t)
      else:
        why = f"job {job.job_id} {job.state.lower()}"
        reason = str(error).strip().splitlines()[-1] if error else ""
        progress.end(i, r, 1, time.monotonic() - t, log_path, why=why + (f" ({reason[:200]})" if reason else ""))
    pending = still
    if pending:
      time.sleep(poll_s)
  progress.finish()
  return 1 if progress.failed else 0
