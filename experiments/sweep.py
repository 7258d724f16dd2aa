"""Expand a config's get_sweep() into runs; run them locally, on every worker of a TPU pod, or print them.

    python -m experiments.sweep --config configs/cg_table3.py --launcher print [--tpu NAME --zone Z]
    python -m experiments.sweep --config configs/cg_table3.py:rows=1-14 --launcher local --parallel 2 --root runs/t3
    python -m experiments.sweep --config configs/scaling.py --launcher pod --tpu my-v5p --zone us-east5-a

Each sweep entry is the arg string of one run (`row=15,arm=related,seed=0`). A run's workdir is
`ROOT/<config name>/<arg string made path-safe>`; a run whose `results.json` exists is skipped, so a sweep
can be re-launched after a failure or preemption. `--collect` gathers every finished run's results.json into
one table beside the paper's numbers (the config's `collect(results)` does the layout); `--out OUT` also writes
OUT.md and OUT.json (the table plus every run's overall / per-subset numbers).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def workdir_for(root: str, config_path: str, arg: str) -> str:
  stem = os.path.splitext(os.path.basename(config_path.split(":", 1)[0]))[0]
  return os.path.join(root, stem, run_name(arg))


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
                 "done": os.path.exists(os.path.join(wd, "results.json"))})
  return runs


def run_local(runs: list[dict[str, Any]], parallel: int) -> list[tuple[str, int]]:
  todo = [r for r in runs if not r["done"]]

  def one(r):
    os.makedirs(r["workdir"], exist_ok=True)
    with open(os.path.join(r["workdir"], "sweep.log"), "ab") as log:
      proc = subprocess.run(r["cmd"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return r["arg"], proc.returncode

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
    return list(pool.map(one, todo))


def collect(config_path: str, root: str) -> dict[str, Any]:
  """Gather finished runs' results.json; the config's collect() lays them out beside the paper."""
  module = load_config_module(config_path)
  results = {}
  for arg in sweep_args(config_path):
    path = os.path.join(workdir_for(root, config_path, arg), "results.json")
    if os.path.exists(path):
      with open(path) as f:
        results[arg] = json.load(f)
  table = dict(module.collect(results)) if hasattr(module, "collect") else {}
  # Every run's headline numbers travel with the table, so a committed table can be re-laid out or re-tested.
  table["runs"] = {arg: {k: res[k] for k in ("overall", "per_subset", "detection") if k in res}
                   for arg, res in results.items()}
  return table


def write_table(out: str, table: dict[str, Any]) -> None:
  """OUT.md (the markdown table) and OUT.json (the table plus every run's numbers), each written atomically."""
  from medcg import fileio
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fileio.atomic_write_text(out + ".md", table.get("markdown", "") + "\n")
  fileio.atomic_write_json(out + ".json", table)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/x.py[:base args]")
  p.add_argument("--launcher", choices=("local", "pod", "print"), default="print")
  p.add_argument("--root", default="runs", help="parent of the run workdirs")
  p.add_argument("--parallel", type=int, default=1, help="local: runs at once")
  p.add_argument("--python", default=sys.executable if sys.executable else "python")
  p.add_argument("--tpu", default="", help="pod: TPU VM name")
  p.add_argument("--zone", default="")
  p.add_argument("--project", default="")
  p.add_argument("--repo-dir", default="~/medcg", help="pod: the checkout on the workers")
  p.add_argument("--collect", action="store_true", help="only gather finished runs into a table")
  p.add_argument("--out", default="", help="also write the collected table to OUT.md and OUT.json")
  a = p.parse_args(argv)

  if a.collect:
    table = collect(a.config, a.root)
    print(table.get("markdown", json.dumps(table, indent=2)))
    if a.out:
      write_table(a.out, table)
    return 0
  if a.launcher == "pod" and not (a.tpu and a.zone):
    p.error("--launcher pod needs --tpu and --zone")
  on_pod = a.launcher == "pod" or (a.launcher == "print" and a.tpu)
  python = ".venv/bin/python" if on_pod else a.python
  runs = plan(a.config, a.root, a.launcher, python=python, tpu=a.tpu, zone=a.zone, project=a.project,
              repo_dir=a.repo_dir)
  if a.launcher == "print":
    for r in runs:
      print(("# done: " if r["done"] else "") + shlex.join(r["cmd"]))
    return 0
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
  failed = [(arg, rc) for arg, rc in run_local(runs, a.parallel) if rc]
  for arg, rc in failed:
    print(f"run {arg} failed with exit code {rc}; see its sweep.log", file=sys.stderr)
  table = collect(a.config, a.root)
  print(table.get("markdown", json.dumps(table, indent=2)))
  if a.out:
    write_table(a.out, table)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
