"""Expand a config's get_sweep() into runs; run them locally, on every worker of a TPU pod, or print them.

    python -m experiments.sweep --config configs/cg_table3.py --launcher print [--tpu NAME --zone Z]
    python -m experiments.sweep --config configs/cg_table3.py:rows=1-14 --launcher local --parallel 2 --root runs/t3
    python -m experiments.sweep --config configs/scaling.py --launcher pod --tpu my-v5p --zone us-east5-a

Each sweep entry is the arg string of one run (`row=15,arm=related,seed=0`). A run's workdir is
`ROOT/<config name>/<arg string made path-safe>`; a run whose `results.json` exists is skipped, so a sweep
can be re-launched after a failure or preemption. `--collect` gathers every finished run's results.json into
one table beside the paper's numbers (the config's `collect(results)` does the layout: n and 95 % intervals on
every accuracy, the CG test on every Baseline+ / Trained pair); `--out OUT` also writes OUT.md, OUT.json (the
table plus every run's counts and per-sample outcomes) and the paper's figures as OUT_<name>.png / .svg.
`--collect --from OUT.json` re-lays out a table written earlier, after its runs are gone.

ROOT may be `gs://BUCKET/...` for every launcher, and must be for a pod: its hosts write one multi-host orbax
checkpoint, so the workdir must be a directory every host sees. Before any run starts, the data of every
unfinished run is checked (`medcg.preflight`), so a short shards dir fails in seconds, not after the first arms.
On a gs:// root each run's sweep.log is written to a local file (`--log_dir`) and copied to its workdir when
the run ends, since object stores cannot append.

The local and pod launchers report progress on stderr, one whole line per event (runs in parallel never
interleave mid-line); stdout keeps the pod commands and the collected table:

    [skip] arm=baseline,seed=0: finished (/abs/runs/demo/arm=baseline__seed=0)
    3 runs: 1 finished already, 2 to run
    [start 1/2] arm=baseline_plus,seed=0 -> /abs/runs/demo/arm=baseline_plus__seed=0 (log: .../sweep.log)
    [done 1/2] arm=baseline_plus,seed=0 in 2 m 31 s: accuracy 48.3 % (n=60)
    [start 2/2] arm=related,seed=0 -> /abs/runs/demo/arm=related__seed=0 (log: .../sweep.log)
    [fail 2/2] arm=related,seed=0: exit code 1 after 12 s; log: .../sweep.log
      last log line: ValueError: ...
    sweep: 1 finished, 1 failed, 1 skipped

A done line's headline (accuracy and n, cIoU for detection) is read from the run's results.json. A pod's runs
print their output on this terminal, so their lines name no log; the pod launcher stops at the first failure.
Exit status: 0 when every run finished, else 1 (local) or the failed run's exit code (pod).

A bad flag, config or path prints one line `experiments.sweep: error: ...` and exits 2; `--verbose` or
MEDCG_VERBOSE=1 adds its traceback.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from medcg import errors
from medcg import fileio
from medcg.errors import UserError

PROG = "experiments.sweep"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LOG_DIR = os.path.join("runs", "sweep-logs")


def load_config_module(path: str):
  """Import a config file by path (configs/x.py), like ml_collections' config_flags does."""
  file = path.split(":", 1)[0]
  if not os.path.exists(file):
    raise FileNotFoundError(f"--config: no such config file {file}")
  name = "medcg_cfg_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(file))[0])
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sweep_args(config_path: str) -> list[str]:
  """The arg strings of the sweep: get_sweep(base_arg) if the config defines it."""
  module = load_config_module(config_path)
  base = config_path.split(":", 1)[1] if ":" in config_path else None
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_path}: defines no get_sweep()")
  args = list(module.get_sweep(base)) if base is not None else list(module.get_sweep())
  if len(set(args)) != len(args):
    raise ValueError(f"{config_path}: get_sweep() returned duplicate runs")
  return args


def run_name(arg: str) -> str:
  return re.sub(r"[^A-Za-z0-9=.,_-]", "_", arg).replace(",", "__") or "default"


def config_stem(config_path: str) -> str:
  return os.path.splitext(os.path.basename(config_path.split(":", 1)[0]))[0]


def workdir_for(root: str, config_path: str, arg: str) -> str:
  """ROOT/<config>/<run>: gs:// stays gs://, a local root becomes absolute (commands run elsewhere)."""
  return fileio.join(fileio.absolute(root), config_stem(config_path), run_name(arg))


def train_command(config_path: str, arg: str, workdir: str, python: str = "python") -> list[str]:
  file = config_path.split(":", 1)[0]
  return [python, "-m", "medcg.train", f"--config={file}:{arg}", f"--workdir={workdir}"]


def pod_command(tpu: str, zone: str, project: str, repo_dir: str, cmd: Sequence[str]) -> list[str]:
  """The same command on every worker of a TPU pod (jax.distributed reads the pod topology)."""
  # "~/x" must reach the worker's shell unquoted, or it will not expand to the home directory.
  where = "~/" + shlex.quote(repo_dir[2:]) if repo_dir.startswith("~/") else shlex.quote(repo_dir)
  remote = f"cd {where} && MEDCG_DISTRIBUTED=1 {' '.join(shlex.quote(c) for c in cmd)}"
  out = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}", "--worker=all",
         f"--command={remote}"]
  if project:
    out.insert(6, f"--project={project}")
  return out


def plan(config_path: str, root: str, launcher: str, *, python: str = "python", tpu: str = "", zone: str = "",
         project: str = "", repo_dir: str = "~/medcg") -> list[dict[str, Any]]:
  """Every run of the sweep with its workdir, command and whether it is already done."""
  runs = []
  for arg in sweep_args(config_path):
    wd = workdir_for(root, config_path, arg)
    cmd = train_command(config_path, arg, wd, python=python)
    if launcher == "pod" or (launcher == "print" and tpu):
      cmd = pod_command(tpu, zone, project, repo_dir, cmd)
    runs.append({"arg": arg, "workdir": wd, "cmd": cmd,
                 "done": fileio.exists(fileio.join(wd, "results.json"))})
  return runs


def local_log(workdir: str, log_dir: str | None = None) -> str:
  """Where a run's sweep.log is written: in its workdir, or LOG_DIR/<config>/<run>/ for a remote one."""
  if not fileio.is_remote(workdir):
    return os.path.join(workdir, "sweep.log")
  config, run = workdir.rstrip("/").split("/")[-2:]
  return os.path.join(os.path.abspath(log_dir or DEFAULT_LOG_DIR), config, run, "sweep.log")


def _duration(seconds: float) -> str:
  from medcg.train import summary  # imports jax: only once a run has ended, so `--launcher print` stays instant
  return summary.duration(seconds)


def result_headline(workdir: str) -> str:
  """'accuracy 95.0 % (n=60)' (with cIoU when detection was scored) from WORKDIR/results.json; '' if unreadable."""
  try:
    results = fileio.read_json(fileio.join(workdir, "results.json"))
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
  the order the runs start), `finish` the tally.
  """

  def __init__(self, runs: list[dict[str, Any]], *, announce_skips: bool = True):
    self.skipped = [r for r in runs if r["done"]]
    self.todo = [r for r in runs if not r["done"]]
    self.announce_skips = announce_skips
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
    lines = [f"[skip] {r['arg']}: finished ({r['workdir']})" for r in self.skipped] if self.announce_skips else []
    n = len(self.skipped) + len(self.todo)
    lines.append(f"{n} run{'s' * (n != 1)}: {len(self.skipped)} finished already, {len(self.todo)} to run")
    self.say(*lines)

  def start(self, r: dict[str, Any], log_path: str | None = None) -> int:
    """Prints the start line; returns the run's number (1 .. len(todo))."""
    with self._lock:
      self._started += 1
      i = self._started
      self._say(f"[start {i}/{len(self.todo)}] {r['arg']} -> {r['workdir']}"
                + (f" (log: {log_path})" if log_path else ""))
    return i

  def end(self, i: int, r: dict[str, Any], rc: int, seconds: float, log_path: str | None = None) -> None:
    tag = f"{i}/{len(self.todo)}"
    if rc == 0:
      headline = result_headline(r["workdir"])  # read outside the lock: gs:// reads take a while
      lines = [f"[done {tag}] {r['arg']} in {_duration(seconds)}" + (f": {headline}" if headline else "")]
    else:
      lines = [f"[fail {tag}] {r['arg']}: exit code {rc} after {_duration(seconds)}"
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
      line = f"sweep: {len(self.finished)} finished, {len(self.failed)} failed, {len(self.skipped)} skipped"
      if not_started:
        line += f", {not_started} not started"
      if self.failed:
        line += f" (failed: {', '.join(self.failed)})"
      self._say(line)


def run_local(runs: list[dict[str, Any]], parallel: int, log_dir: str | None = None, *,
              stop_on_failure: bool = False, announce_skips: bool = True) -> list[tuple[str, int]]:
  """Runs the unfinished runs here, `parallel` at once; returns (arg, exit code) per run started.

  Reports on stderr as it goes (see the module docstring): a skip line per finished run (unless
  `announce_skips` is False), the summary, a start line and a done or fail line per run, the tally.
  `stop_on_failure`: no run starts after one has failed (those running go on to their end).
  """
  progress = Progress(runs, announce_skips=announce_skips)
  stop = threading.Event()

  def one(r):
    if stop.is_set():
      return None
    log_path = local_log(r["workdir"], log_dir)
    remote_log = fileio.join(r["workdir"], "sweep.log")
    remote = fileio.is_remote(r["workdir"])
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if remote and not os.path.exists(log_path) and fileio.exists(remote_log):
      fileio.copy_file(remote_log, log_path)  # keep the earlier attempts' log, as a local sweep.log does
    i = progress.start(r, log_path)
    t = time.monotonic()
    try:
      with open(log_path, "ab") as log:
        proc = subprocess.run(r["cmd"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    except OSError as e:  # the command could not start (no such interpreter): said, then raised as before
      progress.say(f"[fail {i}/{len(progress.todo)}] {r['arg']}: could not start ({e})")
      raise
    finally:
      if remote:  # no appends on an object store: the whole log, once the run has ended
        fileio.copy_file(log_path, remote_log)
    if proc.returncode and stop_on_failure:
      stop.set()
    progress.end(i, r, proc.returncode, time.monotonic() - t, log_path)
    return r["arg"], proc.returncode

  progress.begin()
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
    done = [x for x in pool.map(one, progress.todo) if x is not None]
  progress.finish()
  return done


def run_pod(runs: list[dict[str, Any]]) -> int:
  """Runs the unfinished runs one at a time (each on every worker), stopping at the first failure; its exit code.

  The runs' output comes to this terminal; the command goes to stdout, the progress lines to stderr.
  """
  progress = Progress(runs)
  progress.begin()
  rc = 0
  for r in progress.todo:
    i = progress.start(r)
    print(shlex.join(r["cmd"]), flush=True)
    t = time.monotonic()
    rc = subprocess.run(r["cmd"]).returncode
    progress.end(i, r, rc, time.monotonic() - t)
    if rc:
      break
  progress.finish()
  return rc


RUN_KEYS = ("overall", "per_subset", "detection", "outcomes")


def collect(config_path: str, root: str, from_json: str = "") -> dict[str, Any]:
  """Gather finished runs' results.json; the config's collect() lays them out beside the paper.

  `from_json` re-collects a table written earlier (its "runs": the runs' counts and per-sample outcomes)
  instead of reading workdirs, so a committed table can be re-laid out after the runs are gone. The table's
  "figures" are zero-argument functions that build matplotlib figures (`write_table` draws them).
  """
  module = load_config_module(config_path)
  results = {}
  if from_json:
    stored = fileio.read_json(from_json).get("runs")
    if not isinstance(stored, dict):
      raise UserError(f"--from {from_json}: no 'runs' object (is this a table written by --collect --out?)")
    wanted = set(sweep_args(config_path))
    results = {arg: res for arg, res in stored.items() if arg in wanted}
  else:
    for arg in sweep_args(config_path):
      path = fileio.join(workdir_for(root, config_path, arg), "results.json")
      if fileio.exists(path):
        results[arg] = fileio.read_json(path)
  table = dict(module.collect(results)) if hasattr(module, "collect") else {}
  # Every run's counts (and per-sample outcomes, for the paired test) travel with the table, so a committed
  # table can be re-laid out (`--from`) or re-tested.
  table["runs"] = {arg: {k: res[k] for k in RUN_KEYS if k in res} for arg, res in results.items()}
  return table


def write_table(out: str, table: dict[str, Any]) -> list[str]:
  """OUT.md (the markdown table, with its plots linked), OUT.json (the table plus every run's numbers) and each
  figure as OUT_<name>.png and .svg, every file written atomically. Returns the files written."""
  table = dict(table)
  figures = table.pop("figures", {}) or {}
  written, links = [], []
  if figures:
    from medcg.eval import plots  # matplotlib only when there is something to draw
    for name, make in figures.items():
      png = f"{out}_{name}.png"
      plots.save(make(), png)
      written += [png, png[:-4] + ".svg"]
      links.append(f"![{name}]({os.path.basename(png)})")
  markdown = table.get("markdown", "")
  if links:
    markdown = markdown.rstrip() + "\n\n" + "\n\n".join(links)
  fileio.atomic_write_text(out + ".md", markdown + "\n")
  fileio.atomic_write_json(out + ".json", table)
  return [out + ".md", out + ".json"] + written


def check_data(config_path: str, runs: list[dict[str, Any]], *, check_local: bool = True) -> None:
  """medcg.preflight on every unfinished run's config: every missing piece of data reported before any run.

  Configs are built from the repository root, where the runs start, so relative data paths mean the same.
  """
  from medcg import preflight
  todo = [r for r in runs if not r["done"]]
  if not todo:
    return
  module = load_config_module(config_path)
  with contextlib.chdir(REPO):
    configs = {r["arg"]: module.get_config(r["arg"]) for r in todo}
    preflight.check_all(configs, check_local=check_local)


def _print_table(table: dict[str, Any], out: str) -> None:
  print(table.get("markdown", json.dumps({k: v for k, v in table.items() if k != "figures"}, indent=2)))
  if out:
    for path in write_table(out, table):
      print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  try:
    return _main(argv)
  except Exception as e:  # the user's to fix (flags, data, storage): one message, no traceback
    status = errors.exit_status(e, PROG, verbose_=errors.verbose(sys.argv[1:] if argv is None else argv))
    if status is None:
      raise
    return status


def _main(argv: Sequence[str] | None) -> int:
  p = errors.ArgumentParser(prog=f"python -m {PROG}", description=__doc__)
  p.add_argument("--config", required=True, help="configs/x.py[:base args]")
  p.add_argument("--launcher", choices=("local", "pod", "print"), default="print",
                 help="run here, on every worker of a TPU pod, or print the commands")
  p.add_argument("--root", default="runs", help="parent of the run workdirs (gs://BUCKET/... works)")
  p.add_argument("--parallel", type=errors.positive_int, default=1, help="local: runs at once")
  p.add_argument("--python", default=sys.executable if sys.executable else "python",
                 help="the interpreter that runs each medcg.train")
  p.add_argument("--tpu", default="", help="pod: TPU VM name")
  p.add_argument("--zone", default="", help="pod: the TPU's zone")
  p.add_argument("--project", default="", help="pod: the GCP project (default: gcloud's)")
  p.add_argument("--repo_dir", default="~/medcg", help="pod: the checkout on the workers")
  p.add_argument("--log_dir", default=DEFAULT_LOG_DIR,
                 help="local launcher, gs:// root: where each run's sweep.log is written before it is copied")
  p.add_argument("--compilation_cache_dir", default=None,
                 help="local launcher: the runs' JAX compilation cache ('off' disables; default "
                 "$MEDCG_COMPILATION_CACHE, else ~/.cache/medcg/jax)")
  p.add_argument("--collect", action="store_true", help="only gather finished runs into a table")
  p.add_argument("--out", default="", help="also write the collected table to OUT.md and OUT.json, and its plots "
                 "to OUT_<name>.png / .svg")
  p.add_argument("--from", dest="from_json", default="",
                 help="with --collect: re-collect a table written earlier (OUT.json) instead of reading workdirs")
  a = p.parse_args(argv)

  if a.from_json and not a.collect:
    p.error("--from needs --collect")
  if a.compilation_cache_dir is not None:  # the runs are subprocesses: they read it from the environment
    from medcg import compile_cache
    os.environ[compile_cache.ENV] = a.compilation_cache_dir
  if a.collect:
    table = collect(a.config, a.root, a.from_json)
    found, total = len(table["runs"]), len(sweep_args(a.config))
    where = a.from_json or fileio.join(fileio.absolute(a.root), config_stem(a.config))
    print(f"{found} of {total} runs found under {where}", file=sys.stderr)
    if not found:
      return 1
    _print_table(table, a.out)
    return 0
  if a.launcher == "pod" and not (a.tpu and a.zone):
    p.error("--launcher pod needs --tpu and --zone")
  on_pod = a.launcher == "pod" or (a.launcher == "print" and a.tpu)
  if on_pod and not fileio.is_remote(a.root):
    raise UserError(f"--root {a.root}: a pod's workers need one shared workdir (multi-host orbax checkpoints are "
                    "written to a directory every host sees); use --root gs://BUCKET/...")
  python = ".venv/bin/python" if on_pod else a.python
  runs = plan(a.config, a.root, a.launcher, python=python, tpu=a.tpu, zone=a.zone, project=a.project,
              repo_dir=a.repo_dir)
  if a.launcher == "print":
    for r in runs:
      print(("# done: " if r["done"] else "") + shlex.join(r["cmd"]))
    return 0
  # A pod's local paths are the workers' (not this machine's): only gs:// data is checked from here.
  check_data(a.config, runs, check_local=a.launcher == "local")
  if a.launcher == "pod":
    return run_pod(runs)  # pods run one job at a time across all workers
  failed = [(arg, rc) for arg, rc in run_local(runs, a.parallel, a.log_dir) if rc]
  _print_table(collect(a.config, a.root), a.out)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
