"""--launcher tpu-vm: runs on Cloud TPU VMs, every worker of a pod running the same command.

    python -m experiments.sweep --config configs/scaling.py --launcher tpu-vm --tpu_type v5litepod-16 \\
        --zone us-west4-a --root gs://BUCKET/runs            # one pod for the sweep, its runs in sequence
    ... --pod_per_run --parallel 4                          # one pod per run, four at once
    ... --tpu my-pod                                        # a TPU VM that exists already (no create / delete)

With --tpu_type, each pod is a queued resource (`gcloud compute tpus queued-resources create`, so the request
waits in Google's queue for capacity, --spot or --reserved if asked), waited for until ACTIVE, given this
checkout's commit and a venv (`--worker=all`: clone, checkout, `pip install -r requirements.txt jax[tpu]`),
then each run is `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd DIR && MEDCG_DISTRIBUTED=1
.venv/bin/python -m medcg.train ..."` (jax.distributed reads the pod's topology), and the pod is deleted at the
end (--keep_tpu keeps it). A pod's runs stop at the first failure. The workdirs are on gs://, which every
worker and this machine see; a spot pod that is reclaimed mid-run is resumed by launching the sweep again.
--dry_run prints the whole sequence as a shell script.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from typing import Any

from experiments.launchers import base
from medcg.errors import UserError

NAME = "tpu-vm"
HELP = "Cloud TPU VMs: queued-resource pods (--tpu_type) or an existing one (--tpu)"
DATA_IS_LOCAL = False  # a worker's local paths are its own: only gs:// data is checked from here
# The default runtime (the TPU VM image) of each TPU generation, as Google's TPU docs give them.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
DEAD_STATES = ("FAILED", "SUSPENDED")  # a queued resource in these will never become ACTIVE
GCLOUD_INSTALL = "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"


def add_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("--launcher tpu-vm (also --zone, --project, --tpu_type)")
  g.add_argument("--tpu", default="", help="the TPU VM's name: an existing one, or (with --tpu_type) the queued "
                 "resource to create (default: medcg-<config name>)")
  g.add_argument("--runtime_version", default="", help="the TPU VM image (default: the TPU generation's, e.g. "
                 f"{RUNTIMES['v5litepod']} for v5litepod)")
  g.add_argument("--pod_per_run", action="store_true",
                 help="one queued resource per run (NAME-<run hash>), --parallel at once; default: one for the sweep")
  g.add_argument("--provisioning", choices=("on-demand", "spot", "reserved"), default="on-demand",
                 help="the queued resource's capacity")
  g.add_argument("--keep_tpu", action="store_true", help="do not delete the pods this launcher created")
  g.add_argument("--install", action="store_true", help="an existing --tpu: install the checkout on it first "
                 "(always done on a pod this launcher creates)")
  g.add_argument("--repo_dir", default="~/medcg", help="the checkout on the workers")
  g.add_argument("--repo_url", default="", help="what the workers clone (default: this checkout's origin)")
  g.add_argument("--repo_ref", default="", help="the commit the workers check out (default: this checkout's HEAD)")


def check(a: argparse.Namespace) -> None:
  if not a.zone:
    raise UserError("--launcher tpu-vm needs --zone")
  if not (a.tpu or a.tpu_type):
    raise UserError("--launcher tpu-vm needs --tpu_type (create pods) or --tpu (an existing TPU VM)")
  if a.pod_per_run and not a.tpu_type:
    raise UserError("--pod_per_run creates pods: give --tpu_type")
  if a.tpu and a.tpu_type and not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a.tpu):
    raise UserError(f"--tpu {a.tpu}: a TPU name is lowercase letters, digits and hyphens, starting with a letter")
  if a.tpu_type:
    runtime_version(a)
  base.check_root(a.root, "tpu-vm", gcs_only=True)
  if a.tpu_type or a.install:
    install_command("check", a)  # the checkout the workers clone: refused now, not once a pod is paid for


def runtime_version(a: argparse.Namespace) -> str:
  if a.runtime_version:
    return a.runtime_version
  family = a.tpu_type.split("-")[0]
  if family not in RUNTIMES:
    raise UserError(f"--tpu_type {a.tpu_type}: no default runtime for {family}; give --runtime_version "
                    f"(known: {', '.join(f'{k}: {v}' for k, v in RUNTIMES.items())})")
  return RUNTIMES[family]


def waits(a: argparse.Namespace) -> bool:
  del a
  return True


# ------------------------------------------------------------------------------------------------------------
# The gcloud commands.
# ------------------------------------------------------------------------------------------------------------
def _where(a: argparse.Namespace) -> list[str]:
  return [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def pod_name(a: argparse.Namespace, arg: str | None = None) -> str:
  """--tpu, else medcg-<config>; with --pod_per_run, a run's own: NAME-<6 hex of its arg> (stable across launches)."""
  name = a.tpu or "medcg-" + re.sub(r"[^a-z0-9]+", "-", base.config_stem(a.config).lower()).strip("-")
  if arg is not None:
    name = f"{name[:56]}-{hashlib.sha1(arg.encode()).hexdigest()[:6]}"
  return name


def create_command(name: str, a: argparse.Namespace) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", name, f"--node-id={name}", *_where(a),
         f"--accelerator-type={a.tpu_type}", f"--runtime-version={runtime_version(a)}"]
  if a.provisioning != "on-demand":
    cmd.append(f"--{a.provisioning}")
  return cmd


def state_command(name: str, a: argparse.Namespace) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", name, *_where(a), "--format=value(state.state)"]


def delete_command(name: str, a: argparse.Namespace) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", name, *_where(a), "--force", "--quiet"]


def _repo_dir_shell(repo_dir: str) -> str:
  # "~/x" must reach the worker's shell unquoted, or it will not expand to the home directory.
  return "~/" + shlex.quote(repo_dir[2:]) if repo_dir.startswith("~/") else shlex.quote(repo_dir)


def ssh_command(name: str, a: argparse.Namespace, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *_where(a), "--worker=all", f"--command={remote}"]


def pod_command(name: str, a: argparse.Namespace, cmd: list[str]) -> list[str]:
  """medcg.train on every worker of the pod, from the checkout's venv."""
  cmd = [".venv/bin/python", *cmd[1:]]
  return ssh_command(name, a, f"cd {_repo_dir_shell(a.repo_dir)} && MEDCG_DISTRIBUTED=1 {shlex.join(cmd)}")


def jax_tpu_requirement() -> str:
  """requirements.txt's jax range with the tpu extra (which brings the matching libtpu)."""
  with open(os.path.join(base.REPO, "requirements.txt")) as f:
    for line in f:
      m = re.match(r"\s*jax\[[a-z0-9,]+\](\S*)", line)
      if m:
        return f"jax[tpu]{m.group(1)}"
  return "jax[tpu]"


def _git(*args: str) -> str:
  try:
    return subprocess.run(["git", "-C", base.REPO, *args], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def install_command(name: str, a: argparse.Namespace) -> list[str]:
  """On every worker: this checkout's commit in --repo_dir and a venv with the requirements and jax[tpu]."""
  url = a.repo_url or _git("remote", "get-url", "origin")
  ref = a.repo_ref or _git("rev-parse", "HEAD")
  if not url or not ref:
    raise UserError("--launcher tpu-vm: the workers clone this checkout, but it has no git remote 'origin' or "
                    "commit; give --repo_url and --repo_ref")
  d = _repo_dir_shell(a.repo_dir)
  remote = (f"(test -d {d}/.git || git clone --quiet {shlex.quote(url)} {d}) && cd {d} && git fetch --quiet origin "
            f"&& git checkout --quiet {shlex.quote(ref)} && python3 -m venv .venv && .venv/bin/pip install --quiet "
            f"-r requirements.txt {shlex.quote(jax_tpu_requirement())}")
  return ssh_command(name, a, remote)


def wait_script(name: str, a: argparse.Namespace) -> str:
  """A shell loop that returns once the queued resource is ACTIVE (and fails if it will never be)."""
  return (f"until s=$({shlex.join(state_command(name, a))}) && [ \"$s\" = ACTIVE ]; do case $s in "
          f"{'|'.join(DEAD_STATES)}) echo \"queued resource {name}: $s\" >&2; exit 1;; esac; sleep {a.poll_s:g}; done")


def plan_pods(runs: list[dict[str, Any]], a: argparse.Namespace) -> list[tuple[str, list[dict[str, Any]]]]:
  """(pod name, its unfinished runs in order): one pod for the sweep, or one per run."""
  todo = [r for r in runs if not r["done"]]
  if a.pod_per_run:
    return [(pod_name(a, r["arg"]), [r]) for r in todo]
  return [(pod_name(a), todo)] if todo else []


def pod_steps(name: str, pod_runs: list[dict[str, Any]], a: argparse.Namespace) -> list[tuple[str, Any]]:
  """A pod's sequence, which --dry_run prints and launch runs: ("create", cmd), ("wait", None) and ("install",
  cmd) for a pod this launcher creates (install also with --install), ("run", run) per run, ("delete", cmd)."""
  create = bool(a.tpu_type)
  steps: list[tuple[str, Any]] = [("create", create_command(name, a)), ("wait", None)] if create else []
  if create or a.install:
    steps.append(("install", install_command(name, a)))
  steps += [("run", r) for r in pod_runs]
  if create and not a.keep_tpu:
    steps.append(("delete", delete_command(name, a)))
  return steps


def dry_run(runs: list[dict[str, Any]], a: argparse.Namespace) -> None:
  if not (a.tpu_type or a.install):  # runs on an existing pod: every run's command, in the sweep's order
    for r in runs:
      print(("# done: " if r["done"] else "") + shlex.join(pod_command(pod_name(a), a, r["cmd"])))
    return
  if a.tpu_type:
    n = sum(1 for r in runs if not r["done"])
    pods = "one pod per run" if a.pod_per_run else "one pod"
    print(f"# {n} runs of {a.config} on {pods} ({a.tpu_type}, queued resources)"
          + ("" if a.keep_tpu else ", each deleted after its runs"))
  for r in runs:
    if r["done"]:
      print("# done: " + shlex.join(pod_command(pod_name(a, r["arg"] if a.pod_per_run else None), a, r["cmd"])))
  for name, pod_runs in plan_pods(runs, a):
    for step, what in pod_steps(name, pod_runs, a):
      print(wait_script(name, a) if step == "wait" else
            shlex.join(pod_command(name, a, what["cmd"]) if step == "run" else what))


# ------------------------------------------------------------------------------------------------------------
# Running them.
# ------------------------------------------------------------------------------------------------------------
def _wait_active(name: str, a: argparse.Namespace, progress: base.Progress) -> None:
  last = ""
  while True:
    proc = subprocess.run(state_command(name, a), capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"queued resource {name}: gcloud describe failed: {proc.stderr.strip()[-300:]}")
    state = proc.stdout.strip()
    if state != last:
      progress.say(f"queued resource {name}: {state}")
      last = state
    if state == "ACTIVE":
      return
    if state in DEAD_STATES:
      raise RuntimeError(f"queued resource {name} is {state}; see gcloud compute tpus queued-resources describe "
                         f"{name} --zone={a.zone}")
    time.sleep(a.poll_s)


def _on_pod(name: str, pod_runs: list[dict[str, Any]], a: argparse.Namespace, progress: base.Progress) -> int:
  """pod_steps in order, the runs until one fails, the delete step always; the first failure's exit code."""
  steps = pod_steps(name, pod_runs, a)
  delete = [cmd for step, cmd in steps if step == "delete"]
  try:
    for step, what in steps:
      if step == "delete":
        continue
      if step == "wait":
        _wait_active(name, a, progress)
      elif step == "run":
        i = progress.start(what, note=f"on {name}")
        cmd = pod_command(name, a, what["cmd"])
        print(shlex.join(cmd), flush=True)
        t = time.monotonic()
        rc = subprocess.run(cmd).returncode
        progress.end(i, what, rc, time.monotonic() - t)
        if rc:
          return rc
      else:
        print(shlex.join(what), flush=True)
        rc = subprocess.run(what).returncode
        if rc:
          progress.say(f"[fail] {name}: the {step} step exited with code {rc}; its runs did not start")
          return rc
    return 0
  except RuntimeError as e:
    progress.say(f"[fail] {e}")
    return 1
  finally:
    for cmd in delete:
      print(shlex.join(cmd), flush=True)
      if subprocess.run(cmd).returncode:
        progress.say(f"queued resource {name} was NOT deleted: delete it yourself ({shlex.join(cmd)})")


def launch(runs: list[dict[str, Any]], a: argparse.Namespace) -> int:
  """The pods' runs; their output comes to this terminal (commands on stdout, progress lines on stderr)."""
  if shutil.which("gcloud") is None:
    raise UserError(f"--launcher tpu-vm runs gcloud, which is not on this machine's PATH: {GCLOUD_INSTALL}, or "
                    "print the commands with --dry_run")
  progress = base.Progress(runs)
  progress.begin()
  pods = plan_pods(runs, a)
  with concurrent.futures.ThreadPoolExecutor(max_workers=a.parallel if a.pod_per_run else 1) as pool:
    codes = list(pool.map(lambda pod: _on_pod(*pod, a, progress), pods))
  progress.finish()
  return next((rc for rc in codes if rc), 0)
