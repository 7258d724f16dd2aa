"""--launcher local: the runs as subprocesses of this machine, `--parallel` at once; each run's output in its
workdir's sweep.log (or, on a gs:// root, a local file copied to the workdir when the run ends)."""
from __future__ import annotations

import argparse
import concurrent.futures
import shlex
import subprocess
import threading
import time
from typing import Any

from experiments.launchers import base

NAME = "local"
HELP = "run here, --parallel at once"
DATA_IS_LOCAL = True


def add_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("--launcher local")
  g.add_argument("--log_dir", default=base.DEFAULT_LOG_DIR,
                 help="gs:// root: where each run's sweep.log is written before it is copied to the workdir")


def check(a: argparse.Namespace) -> None:
  del a  # any root: the runs start here


def waits(a: argparse.Namespace) -> bool:
  del a
  return True


def dry_run(runs: list[dict[str, Any]], a: argparse.Namespace) -> None:
  del a
  for r in runs:
    print(("# done: " if r["done"] else "") + shlex.join(r["cmd"]))


def launch(runs: list[dict[str, Any]], a: argparse.Namespace) -> int:
  failed = [rc for _, rc in run(runs, a.parallel, a.log_dir) if rc]
  return 1 if failed else 0


def run(runs: list[dict[str, Any]], parallel: int, log_dir: str | None = None, *,
        stop_on_failure: bool = False, announce_skips: bool = True) -> list[tuple[str, int]]:
  """Runs the unfinished runs here, `parallel` at once; returns (arg, exit code) per run started.

  Reports on stderr as it goes: a skip line per finished run (unless `announce_skips` is False), the summary,
  a start line and a done or fail line per run, the tally. `stop_on_failure`: no run starts after one has
  failed (those running go on to their end).
  """
  progress = base.Progress(runs, announce_skips=announce_skips)
  stop = threading.Event()

  def one(r):
    if stop.is_set():
      return None
    log_path = base.local_log(r["workdir"], log_dir)
    with base.appended_log(log_path, r["workdir"]) as log:
      i = progress.start(r, log_path)
      t = time.monotonic()
      try:
        proc = subprocess.run(r["cmd"], cwd=base.REPO, stdout=log, stderr=subprocess.STDOUT)
      except OSError as e:  # the command could not start (no such interpreter): said, then raised as before
        progress.say(f"[fail {i}/{len(progress.todo)}] {r['arg']}: could not start ({e})")
        raise
    if proc.returncode and stop_on_failure:
      stop.set()
    progress.end(i, r, proc.returncode, time.monotonic() - t, log_path)
    return r["arg"], proc.returncode

  progress.begin()
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
    done = [x for x in pool.map(one, progress.todo) if x is not None]
  progress.finish()
  return done
