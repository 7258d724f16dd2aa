"""Expand a config's get_sweep() into runs and hand them to a scheduler: this machine, SLURM (submitit), TPU VMs
(queued resources) or GKE (xpk); or collect the finished ones into the paper's tables.

    python -m experiments.sweep --config configs/cg_table3.py --launcher local --parallel 2 --root runs/t3
    python -m experiments.sweep --config configs/cg_table3.py --launcher slurm --root /shared/runs/t3 \\
        --partition gpu --gpus_per_node 8 --time 24:00:00 --array_parallelism 16
    python -m experiments.sweep --config configs/scaling.py --launcher tpu-vm --tpu_type v5litepod-16 \\
        --zone us-west4-a --root gs://BUCKET/runs --dry_run
    python -m experiments.sweep --config configs/scaling.py --launcher xpk --cluster my-gke --tpu_type v5p-16 \\
        --zone us-east5-a --root gs://BUCKET/runs --dry_run
    python -m experiments.sweep --config configs/cg_table3.py --root runs/t3 --collect --out results/t3

Each sweep entry is the arg string of one run (`row=15,arm=related,seed=0`). A run's workdir is
`ROOT/<config name>/<arg string made path-safe>`; a run whose `results.json` exists is skipped, so a sweep
can be re-launched after a failure or preemption (unfinished runs resume from their checkpoints). `--dry_run`
prints what the launcher would do (commands, job script) and runs nothing. Each launcher's flags are in its
own section of --help; experiments/launchers/ says what a launcher is.

`--collect` gathers every finished run's results.json into one table beside the paper's numbers (the config's
`collect(results)` does the layout: n and 95 % intervals on every accuracy, the CG test on every Baseline+ /
Trained pair); `--out OUT` also writes OUT.md, OUT.json (the table plus every run's counts and per-sample
outcomes) and the paper's figures as OUT_<name>.png / .svg. `--collect --from OUT.json` re-lays out a table
written earlier, after its runs are gone. Launchers whose runs end before they return (local, slurm --wait)
collect at the end.

ROOT may be `gs://BUCKET/...` for every launcher, and must be for tpu-vm and xpk: their hosts write one
multi-host orbax checkpoint to a directory every host sees, and they do not share this machine's disk. SLURM
takes an absolute path on the cluster's shared filesystem (not a relative path, not /tmp) or gs://. Before
any run starts, the data of every unfinished run is checked (`medcg.preflight`), so a short shards dir fails
in seconds, not after the first arms (a TPU VM's or GKE pod's local paths are theirs: only gs:// ones are
checked from here).

Progress goes to stderr, one whole line per event (runs in parallel never interleave mid-line); stdout keeps
the commands and the collected table:

    [skip] arm=baseline,seed=0: finished (/abs/runs/demo/arm=baseline__seed=0)
    3 runs: 1 finished already, 2 to run
    [start 1/2] arm=baseline_plus,seed=0 -> /abs/runs/demo/arm=baseline_plus__seed=0 (log: .../sweep.log)
    [done 1/2] arm=baseline_plus,seed=0 in 2 m 31 s: accuracy 48.3 % (n=60)
    [start 2/2] arm=related,seed=0 -> /abs/runs/demo/arm=related__seed=0 (log: .../sweep.log)
    [fail 2/2] arm=related,seed=0: exit code 1 after 12 s; log: .../sweep.log
      last log line: ValueError: ...
    sweep: 1 finished, 1 failed, 1 skipped

A done line's headline (accuracy and n, cIoU for detection) is read from the run's results.json. Exit status:
0 when every run finished (or was submitted), else 1 (the tpu-vm launcher: the failed run's exit code).
`--launcher print` and `--launcher pod` are the older spellings of `--dry_run` and `--launcher tpu-vm --tpu NAME`.

A bad flag, config or path prints one line `experiments.sweep: error: ...` and exits 2; `--verbose` or
MEDCG_VERBOSE=1 adds its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
from typing import Any, Sequence

from experiments.launchers import LAUNCHERS
from experiments.launchers import base
from experiments.launchers.base import config_stem, run_name, workdir_for  # noqa: F401 (the sweep's naming)
from medcg import errors
from medcg import fileio
from medcg.errors import UserError

PROG = "experiments.sweep"
REPO = base.REPO


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
  base_arg = config_path.split(":", 1)[1] if ":" in config_path else None
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_path}: defines no get_sweep()")
  args = list(module.get_sweep(base_arg)) if base_arg is not None else list(module.get_sweep())
  if len(set(args)) != len(args):
    raise ValueError(f"{config_path}: get_sweep() returned duplicate runs")
  return args


def train_command(config_path: str, arg: str, workdir: str, python: str = "python") -> list[str]:
  file = config_path.split(":", 1)[0]
  return [python, "-m", "medcg.train", f"--config={file}:{arg}", f"--workdir={workdir}"]


def plan(config_path: str, root: str, *, python: str = "python") -> list[dict[str, Any]]:
  """Every run of the sweep with its workdir, medcg.train command and whether it is already done."""
  runs = []
  for arg in sweep_args(config_path):
    wd = workdir_for(root, config_path, arg)
    runs.append({"arg": arg, "workdir": wd, "cmd": train_command(config_path, arg, wd, python=python),
                 "done": base.is_done(wd)})
  return runs


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
      path = base.results_path(workdir_for(root, config_path, arg))
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


def parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog=f"python -m {PROG}", description=__doc__)
  p.add_argument("--config", required=True, help="configs/x.py[:base args]")
  p.add_argument("--launcher", choices=(*LAUNCHERS, "print", "pod"), default="print",
                 help="; ".join(f"{name}: {m.HELP}" for name, m in LAUNCHERS.items())
                 + "; print: local's --dry_run; pod: tpu-vm on --tpu")
  p.add_argument("--root", default="runs", help="parent of the run workdirs (gs://BUCKET/... works)")
  p.add_argument("--dry_run", action="store_true", help="print what the launcher would do; run nothing")
  p.add_argument("--parallel", type=errors.positive_int, default=1,
                 help="runs at once (local; tpu-vm with --pod_per_run)")
  p.add_argument("--python", default=sys.executable if sys.executable else "python",
                 help="the interpreter that runs each medcg.train (local, slurm)")
  p.add_argument("--poll_s", type=float, default=30.0,
                 help="slurm --wait, tpu-vm: seconds between checks of a job's or a queued resource's state")
  p.add_argument("--compilation_cache_dir", default=None,
                 help="the runs' JAX compilation cache, passed in their environment ('off' disables; default "
                 "$MEDCG_COMPILATION_CACHE, else ~/.cache/medcg/jax)")
  p.add_argument("--collect", action="store_true", help="only gather finished runs into a table")
  p.add_argument("--out", default="", help="also write the collected table to OUT.md and OUT.json, and its plots "
                 "to OUT_<name>.png / .svg")
  p.add_argument("--from", dest="from_json", default="",
                 help="with --collect: re-collect a table written earlier (OUT.json) instead of reading workdirs")
  g = p.add_argument_group("Google Cloud (--launcher tpu-vm, xpk)")
  g.add_argument("--zone", default="", help="the TPUs' zone")
  g.add_argument("--project", default="", help="the GCP project (default: gcloud's)")
  g.add_argument("--tpu_type", default="",
                 help="accelerator type, e.g. v5litepod-16 or v5p-32 (tpu-vm: create queued resources of it)")
  for m in LAUNCHERS.values():
    m.add_flags(p)
  return p


def _resolve_aliases(a: argparse.Namespace) -> None:
  """The older spellings: `print` is --dry_run (of tpu-vm when --tpu is given), `pod` is tpu-vm on --tpu."""
  if a.launcher == "print":
    a.launcher, a.dry_run = ("tpu-vm" if a.tpu else "local"), True
  elif a.launcher == "pod":
    a.launcher = "tpu-vm"


def _main(argv: Sequence[str] | None) -> int:
  p = parser()
  a = p.parse_args(argv)
  _resolve_aliases(a)
  if a.from_json and not a.collect:
    p.error("--from needs --collect")
  if a.compilation_cache_dir is not None:  # the runs are subprocesses: they read it from the environment
    from medcg import compile_cache
    os.environ[compile_cache.ENV] = a.compilation_cache_dir
  if a.collect:
    return _collect(a)
  launcher = LAUNCHERS[a.launcher]
  launcher.check(a)
  runs = plan(a.config, a.root, python=a.python)
  if hasattr(launcher, "mark_active"):
    launcher.mark_active(runs, a)
  if a.dry_run:
    launcher.dry_run(runs, a)
    return 0
  check_data(a.config, runs, check_local=launcher.DATA_IS_LOCAL)
  status = launcher.launch(runs, a)
  if launcher.waits(a):
    _print_table(collect(a.config, a.root), a.out)
  return status


def _collect(a: argparse.Namespace) -> int:
  table = collect(a.config, a.root, a.from_json)
  found, total = len(table["runs"]), len(sweep_args(a.config))
  where = a.from_json or fileio.join(fileio.absolute(a.root), config_stem(a.config))
  print(f"{found} of {total} runs found under {where}", file=sys.stderr)
  if not found:
    return 1
  _print_table(table, a.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
