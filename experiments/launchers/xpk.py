"""--launcher xpk: one GKE workload per run through xpk (`xpk workload create`), which queues it with Kueue and
restarts it on failure or preemption (--max_restarts); the restarted run resumes from its gs:// checkpoint.

    python -m experiments.sweep --config configs/scaling.py --launcher xpk --cluster my-gke \\
        --tpu_type v5p-16 --zone us-east5-a --root gs://BUCKET/runs --docker_image gcr.io/P/medcg:latest

Each workload runs `MEDCG_DISTRIBUTED=1 python -m medcg.train ...` on every host of its slice (jax.distributed
reads GKE's TPU environment). With --docker_image the image has the requirements installed; otherwise xpk builds
one from --base_docker_image and this checkout (--script_dir) and the command installs the requirements first.
Workload names are medcg-<config>-<run>, cut to xpk's 40 characters with a hash of the run, so a run keeps its
name across launches (xpk refuses a second workload of that name while the first exists). --dry_run prints
the commands; without it they are run and the launcher returns once the workloads are submitted.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import shutil
import subprocess
from typing import Any

from experiments.launchers import base
from experiments.launchers import tpu_vm
from medcg.errors import UserError

NAME = "xpk"
HELP = "GKE through xpk: one workload per run"
DATA_IS_LOCAL = False  # a pod's local paths are its own (xpk itself refuses a second workload of one name)
INSTALL = "pip install xpk"
MAX_NAME = 40  # xpk's limit on a workload name


def add_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("--launcher xpk (also --zone, --project, --tpu_type)")
  g.add_argument("--cluster", default="", help="the GKE cluster xpk created")
  g.add_argument("--num_slices", type=int, default=1, help="TPU slices per run")
  g.add_argument("--docker_image", default="", help="an image with this checkout and its requirements installed")
  g.add_argument("--base_docker_image", default="python:3.11",
                 help="without --docker_image: xpk builds an image from this and --script_dir")
  g.add_argument("--script_dir", default=base.REPO, help="without --docker_image: the checkout xpk copies in")
  g.add_argument("--max_restarts", type=int, default=3, help="restarts of a failed or preempted workload")


def check(a: argparse.Namespace) -> None:
  missing = [f for f, v in (("--cluster", a.cluster), ("--tpu_type", a.tpu_type), ("--zone", a.zone)) if not v]
  if missing:
    raise UserError(f"--launcher xpk needs {', '.join(missing)}")
  if a.num_slices < 1:
    raise UserError(f"--num_slices {a.num_slices}: must be 1 or more")
  base.check_root(a.root, "xpk", gcs_only=True)


def waits(a: argparse.Namespace) -> bool:
  del a
  return False


def workload_name(config_path: str, arg: str) -> str:
  """medcg-<config>-<run> in xpk's alphabet (lowercase, digits, '-'), at most 40 characters with a hash of the
  run's arg at the end: stable across launches, distinct across runs."""
  readable = re.sub(r"[^a-z0-9]+", "-", f"medcg-{base.config_stem(config_path)}-{arg}".lower()).strip("-")
  digest = hashlib.sha1(f"{config_path.split(':', 1)[0]}:{arg}".encode()).hexdigest()[:8]
  return f"{readable[:MAX_NAME - len(digest) - 1].rstrip('-')}-{digest}"


def workload_command(r: dict[str, Any], a: argparse.Namespace) -> list[str]:
  train = shlex.join(["python", *r["cmd"][1:]])
  if a.docker_image:
    image = [f"--docker-image={a.docker_image}"]
    command = f"MEDCG_DISTRIBUTED=1 {train}"
  else:
    image = [f"--base-docker-image={a.base_docker_image}", f"--script-dir={a.script_dir}"]
    command = (f"pip install --quiet -r requirements.txt {shlex.quote(tpu_vm.jax_tpu_requirement())} && "
               f"MEDCG_DISTRIBUTED=1 {train}")
  return ["xpk", "workload", "create", f"--cluster={a.cluster}", f"--workload={workload_name(a.config, r['arg'])}",
          f"--tpu-type={a.tpu_type}", f"--num-slices={a.num_slices}", f"--zone={a.zone}",
          *([f"--project={a.project}"] if a.project else []), *image, f"--max-restarts={a.max_restarts}",
          f"--command={command}"]


def dry_run(runs: list[dict[str, Any]], a: argparse.Namespace) -> None:
  for r in runs:
    print(("# done: " if r["done"] else "") + shlex.join(workload_command(r, a)))


def launch(runs: list[dict[str, Any]], a: argparse.Namespace) -> int:
  if shutil.which("xpk") is None:
    raise UserError(f"--launcher xpk runs xpk, which is not on this machine's PATH: {INSTALL} "
                    "(or print the commands with --dry_run)")
  progress = base.Progress(runs, verb="submitted")
  progress.begin()
  for r in progress.todo:
    cmd = workload_command(r, a)
    i = progress.start(r, note=f"workload {workload_name(a.config, r['arg'])}")
    rc = subprocess.run(cmd).returncode
    if rc:
      progress.end(i, r, rc, 0.0, why=f"xpk exited with code {rc}")
  failed = len(progress.failed)
  progress.say(f"submitted {len(progress.todo) - failed} workload(s), {failed} failed; follow with: xpk workload list "
               f"--cluster={a.cluster} --zone={a.zone}; collect when they have ended: python -m experiments.sweep "
               f"--config {a.config} --root {a.root} --collect")
  return 1 if failed else 0
