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
On a gs:// root each run's sweep.log is written to a local file (`--log-dir`) and copied to its workdir when
the run ends, since object stores cannot append.

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


def run_local(runs: list[dict[str, Any]], parallel: int, log_dir: str | None = None) -> list[tuple[str, int]]:
  """Runs the unfinished runs here, `parallel` at once; returns (arg, exit code) per run started."""
  todo = [r for r in runs if not r["done"]]

  def one(r):
    log_path = local_log(r["workdir"], log_dir)
    remote_log = fileio.join(r["workdir"], "sweep.log")
    remote = fileio.is_remote(r["workdir"])
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if remote and not os.path.exists(log_path) and fileio.exists(remote_log):
      fileio.copy_file(remote_log, log_path)  # keep the earlier attempts' log, as a local sweep.log does
    try:
      with open(log_path, "ab") as log:
        proc = subprocess.run(r["cmd"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    finally:
      if remote:  # no appends on an object store: the whole log, once the run has ended
        fileio.copy_file(log_path, remote_log)
    return r["arg"], proc.returncode

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
    return list(pool.map(one, todo))


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
  p.add_argument("--repo-dir", default="~/medcg", help="pod: the checkout on the workers")
  p.add_argument("--log-dir", default=DEFAULT_LOG_DIR,
                 help="local launcher, gs:// root: where each run's sweep.log is written before it is copied")
  p.add_argument("--compilation-cache-dir", default=None,
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
    for r in runs:  # pods run one job at a time across all workers
      if r["done"]:
        continue
      print(shlex.join(r["cmd"]), flush=True)
      rc = subprocess.run(r["cmd"]).returncode
      if rc:
        print(f"run {r['arg']} failed with exit code {rc}", file=sys.stderr)
        return rc
    return 0
  failed = [(arg, rc) for arg, rc in run_local(runs, a.parallel, a.log_dir) if rc]
  logs = {r["arg"]: local_log(r["workdir"], a.log_dir) for r in runs}
  for arg, rc in failed:
    print(f"run {arg} failed with exit code {rc}; see {logs[arg]}", file=sys.stderr)
  _print_table(collect(a.config, a.root), a.out)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
