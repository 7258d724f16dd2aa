"""What every launcher shares: a run's files, the progress lines, the checks on a sweep root.

A run is a dict: `arg` (its sweep arg string), `workdir`, `cmd` (the medcg.train command, argv) and `done`
(its results.json exists). Launchers wrap `cmd` for their scheduler; they never rebuild it.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from typing import Any, BinaryIO, Iterator

from medcg import fileio
from medcg.errors import UserError
from medcg.eval.metrics import RESULTS_FILE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_LOG_DIR = os.path.join("runs", "sweep-logs")
LOG_FILE = "sweep.log"
# Directories that are one machine's own: a cluster's other nodes never see what is written there.
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")


def run_name(arg: str) -> str:
  """A run's directory name: its arg string made path-safe (`row=15,arm=related` -> `row=15__arm=related`)."""
  return re.sub(r"[^A-Za-z0-9=.,_-]", "_", arg).replace(",", "__") or "default"


def config_stem(config_path: str) -> str:
  return os.path.splitext(os.path.basename(config_path.split(":", 1)[0]))[0]


def workdir_for(root: str, config_path: str, arg: str) -> str:
  """ROOT/<config>/<run>: gs:// stays gs://, a local root becomes absolute (commands run elsewhere)."""
  return fileio.join(fileio.absolute(root), config_stem(config_path), run_name(arg))


def results_path(workdir: str) -> str:
  return fileio.join(workdir, RESULTS_FILE)


def is_done(workdir: str) -> bool:
  return fileio.exists(results_path(workdir))


def local_log(workdir: str, log_dir: str | None = None) -> str:
  """Where a run's sweep.log is written: in its workdir, or LOG_DIR/<config>/<run>/ for a remote one."""
  if not fileio.is_remote(workdir):
    return os.path.join(workdir, LOG_FILE)
  config, run = workdir.rstrip("/").split("/")[-2:]
  return os.path.join(os.path.abspath(log_dir or DEFAULT_LOG_DIR), config, run, LOG_FILE)


@contextlib.contextmanager
def appended_log(log_path: str, workdir: str) -> Iterator[BinaryIO]:
  """LOG_PATH opened for appending a run's output. For a gs:// workdir the log is a local file: the earlier
  attempts' copy is fetched from the workdir first, and the whole log copied back when the run has ended
  (object stores cannot append)."""
  remote_log = fileio.join(workdir, os.path.basename(log_path))
  remote = fileio.is_remote(workdir)
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  if remote and not os.path.exists(log_path) and fileio.exists(remote_log):
    fileio.copy_file(remote_log, log_path)
  try:
    with open(log_path, "ab") as log:
      yield log
  finally:
    if remote:
      fileio.copy_file(log_path, remote_log)


def check_root(root: str, launcher: str, *, gcs_only: bool, node_local_ok: bool = False) -> None:
  """A remote launcher's runs start on other machines: the root must be a path they see.

  `gcs_only` (TPU VMs, GKE): only gs:// is shared with this machine. Otherwise (SLURM) an absolute path on a
  shared filesystem or gs://; a relative path means a different place on a node, and /tmp is each node's own.
  """
  if fileio.is_remote(root):
    return
  if gcs_only:
    raise UserError(f"--root {root}: --launcher {launcher} runs on machines that do not share this one's disk "
                    "(and multi-host orbax checkpoints need a directory every host sees); use --root gs://BUCKET/...")
  if not os.path.isabs(root):
    raise UserError(f"--root {root}: a relative path, which a {launcher} node resolves against its own working "
                    f"directory; give the absolute path on a filesystem the nodes share (here: "
                    f"{os.path.abspath(root)}) or gs://BUCKET/...")
  real = os.path.realpath(root)
  if not node_local_ok and any(real == d or real.startswith(d + "/") for d in NODE_LOCAL):
    raise UserError(f"--root {root}: under {next(d for d in NODE_LOCAL if real == d or real.startswith(d + '/'))}, "
                    f"which is each node's own disk; the {launcher} nodes would not see each other's checkpoints "
                    "or this machine's: use a shared filesystem path or gs://BUCKET/...")


def duration(seconds: float) -> str:
  from medcg.train import summary  # imports jax: only once a run has ended, so `--dry_run` stays instant
  return summary.duration(seconds)


def result_headline(workdir: str) -> str:
  """'accuracy 95.0 % (n=60)' (with cIoU when detection was scored) from WORKDIR/results.json; '' if unreadable."""
  try:
    results = fileio.read_json(results_path(workdir))
    # runner.flat_metrics' two keys the headline reads (runner itself imports the model stack).
    metrics = {"eval/accuracy": float(results["overall"]["accuracy"]), "eval/samples": float(results["overall"]["n"])}
    if results.get("detection"):
      metrics["eval/ciou"] = float(results["detection"]["overall"]["ciou"])
    from medcg.train import summary
    return summary.headline(metrics)
  except Exception:  # a progress line is no reason to fail a sweep: the done line goes without its headline
    return ""


def last_log_line(log_path: str, max_chars: int = 300) -> str:
  """The last non-empty line of a local log (the last frame of a progress bar's \\r-redrawn line); '' if none."""
  try:
    with open(log_path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(f.tell() - 65536, 0))
      tail = f.read().decode("utf-8", errors="replace")
  except OSError:
    return ""
  for line in reversed(tail.splitlines()):
    line = line.split("\r")[-1].strip() or line.strip()
    if line:
      return line if len(line) <= max_chars else line[:max_chars - 3] + "..."
  return ""


class Progress:
  """The sweep's progress lines on stderr, each printed whole under a lock (parallel runs share one Progress).

  `begin` prints a skip line per finished run and the summary, `start` / `end` one line per run (numbered in
  the order the runs start), `finish` the tally. `verb` names what `start` did ("start", "submitted").
  """

  def __init__(self, runs: list[dict[str, Any]], *, announce_skips: bool = True, verb: str = "start"):
    self.skipped = [r for r in runs if r["done"]]
    self.todo = [r for r in runs if not r["done"]]
    self.announce_skips = announce_skips
    self.verb = verb
    self.finished: list[str] = []
    self.failed: list[str] = []
    self._started = 0
    self._lock = threading.Lock()

  def say(self, *lines: str) -> None:
    with self._lock:
      self._say(*lines)

  def _say(self, *lines: str) -> None:
    print("\n".join(lines), file=sys.stderr, flush=True)

  def begin(self) -> None:
    lines = [f"[skip] {r['arg']}: {r.get('skip_reason', 'finished')} ({r['workdir']})"
             for r in self.skipped] if self.announce_skips else []
    n = len(self.skipped) + len(self.todo)
    queued = sum(1 for r in self.skipped if r.get("skip_reason"))
    skipped = f"{len(self.skipped) - queued} finished already" + (f", {queued} queued or running" if queued else "")
    lines.append(f"{n} run{'s' * (n != 1)}: {skipped}, {len(self.todo)} to {'run' if self.verb == 'start' else 'submit'}")
    self.say(*lines)

  def start(self, r: dict[str, Any], log_path: str | None = None, note: str = "") -> int:
    """Prints the start line; returns the run's number (1 .. len(todo))."""
    with self._lock:
      self._started += 1
      i = self._started
      self._say(f"[{self.verb} {i}/{len(self.todo)}] {r['arg']} -> {r['workdir']}" + (f": {note}" if note else "")
                + (f" (log: {log_path})" if log_path else ""))
    return i

  def end(self, i: int, r: dict[str, Any], rc: int, seconds: float, log_path: str | None = None,
          why: str = "") -> None:
    """A done line (rc 0) with the run's headline, or a fail line: `why` (default "exit code RC") and the log."""
    tag = f"{i}/{len(self.todo)}"
    if rc == 0:
      headline = result_headline(r["workdir"])  # read outside the lock: gs:// reads take a while
      lines = [f"[done {tag}] {r['arg']} in {duration(seconds)}" + (f": {headline}" if headline else "")]
    else:
      lines = [f"[fail {tag}] {r['arg']}: {why or f'exit code {rc}'} after {duration(seconds)}"
               + (f"; log: {log_path}" if log_path else "")]
      last = last_log_line(log_path) if log_path else ""
      if last:
        lines.append(f"  last log line: {last}")
    with self._lock:
      (self.finished if rc == 0 else self.failed).append(r["arg"])
      self._say(*lines)

  def finish(self) -> None:
    with self._lock:
      not_started = len(self.todo) - len(self.finished) - len(self.failed)
      skipped = len(self.skipped)
      line = f"sweep: {len(self.finished)} finished, {len(self.failed)} failed, {skipped} skipped"
      if not_started:
        line += f", {not_started} not started"
      if self.failed:
        line += f" (failed: {', '.join(self.failed)})"
      self._say(line)
