"""Every fit recipe (configs/hardware.py) compiled by its target's compiler: the table a reader checks before renting.

    python -m experiments.aot_fit                                  # all TPU recipes (needs libtpu), ~15 min on 2 cores
    python -m experiments.aot_fit --targets h100x8,h200x1          # GPU rows (needs jax-cuda12-plugin, ptxas)
    python -m experiments.aot_fit --models llava-1.5-7b --targets v5p-8

Each row is `medcg.aot.step_compile.run` on the recipe's config (Table 3 row 15 on Med-MAT, the paper's global
batch 32, vision tower frozen, f32 master weights + AdamW, bf16 compute): per-device peak against usable memory,
the compiler's verdict, compile time, hardware FLOPs (layer scans accounted) over model_flops, the train step's
collectives (all-gather / reduce-scatter / all-reduce / collective-permute, and how many sit in the layer loops),
and the evaluation step's peak. Rows merge into experiments/results/aot_fit.json by (model, target), so TPU and
GPU rows can come from two environments; each row keeps the jax / libtpu / CUDA-plugin versions it was made
with. Also `bench-1b` with TRIM's Pallas kernel (`impl=pallas_tpu`) on v5e-8: the kernel inside the sharded step.
"""
from __future__ import annotations

import argparse
import os
import platform as platform_lib
import sys
import time
from typing import Any, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from configs import fit  # noqa: E402
from configs import hardware  # noqa: E402
from medcg import errors  # noqa: E402
from medcg import fileio  # noqa: E402
from medcg.aot import report as report_lib  # noqa: E402
from medcg.aot import step_compile  # noqa: E402
from medcg.aot import targets as targets_lib  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results")
KERNEL_ROW = ("bench-1b+trim-pallas", "v5e-8")


def kernel_config():
  """bench-1b with TRIM (iqr_example, k_max 288) through the Mosaic kernel, FSDP over 8 chips."""
  from configs import cg_table3
  c = cg_table3.get_config("data=medmat,model=bench-1b")  # FSDP, full remat, CLIP towers frozen
  c.trim.enabled = True
  c.trim.mode, c.trim.k_max, c.trim.impl = "iqr_example", 288, "pallas_tpu"
  return c


def row_config(model: str, target: str):
  if (model, target) == KERNEL_ROW:
    return kernel_config()
  return fit.get_config(f"{model}@{target}", allow_misses=True)


def summarize(model: str, target: str, rep: dict[str, Any], wall_s: float) -> dict[str, Any]:
  train = rep["train"]
  hlo = train.get("hlo", {}).get("collectives", {})
  coll = {k: {"count": v.get("count", 0), "in_loop": v.get("in_loop_count", 0), "bytes": v.get("bytes", 0)}
          for k, v in hlo.items()}
  flops = rep.get("flops", {})
  return {
      "model": model, "target": target, "mesh": rep["mesh"], "remat": rep["remat"],
      "accum_steps": rep["accum_steps"], "global_batch": rep["global_batch"],
      "per_device_batch": rep["per_device_batch"], "seq_len": rep["seq_len"], "trim": rep["trim"],
      "peak_bytes": train.get("peak_bytes") or train.get("needed_bytes"), "usable_bytes": rep["usable_bytes"],
      "fits": train.get("fits"), "headroom_bytes": train.get("headroom_bytes"), "error": train.get("error", ""),
      "knobs": train.get("knobs", []), "compile_s": train["compile_s"],
      "hardware_over_model_flops": flops.get("hardware_over_model"), "model_flops": flops.get("model_flops"),
      "hardware_flops": flops.get("hardware_flops"), "collectives": coll,
      "custom_calls": train.get("hlo", {}).get("custom_calls", {}),
      "eval_peak_bytes": rep.get("eval", {}).get("peak_bytes"), "eval_fits": rep.get("eval", {}).get("fits"),
      "env": dict(hardware.RECIPES.get((model, target), {}).get("env", {})),
      "use_instead": hardware.RECIPES.get((model, target), {}).get("use", ""),
      "versions": rep["versions"], "device_kind": rep["device_kind"], "wall_s": round(wall_s, 1),
  }


def _c(row, kind: str) -> str:
  c = row["collectives"].get(kind)
  return "0" if not c else f"{c['count']} ({c['in_loop']})"


def markdown(rows: Sequence[dict[str, Any]], commands: Sequence[str]) -> str:
  g = report_lib.gib
  lines = [
      "# AOT fit: the paper's recipe compiled for each target on a CPU host", "",
      "Commands (rows merge by model and target; each row's command and versions are its own, in aot_fit.json): "
      + ", ".join(f"`{c}`" for c in commands) + ".",
      f"Machine: {platform_lib.node()} ({os.cpu_count()} CPUs), no accelerator: TPU rows by libtpu's compiler for "
      "the named topology, GPU rows by XLA's GPU compiler through the CUDA PJRT plugin (deviceless).", "",
      "Recipe: Table 3 row 15 on Med-MAT, global batch 32, seq 1024, vision tower frozen, f32 master weights + "
      "AdamW, bf16 compute (configs/hardware.py). Peak = arguments + non-donated outputs + XLA temporaries + "
      "program (per device); usable = what the compiler allows (TPU: from libtpu's own limit; GPU: the card x "
      "XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless the recipe's env says otherwise). Collectives: count in the "
      "optimised train step (in brackets: inside the scanned layer loops). HW/model FLOPs: compiler FLOPs with the "
      "layer scans accounted for (medcg.aot.step_compile.hardware_flops) over `model_flops`; full remat "
      "recomputes the forward, so about 4/3 is expected.", "",
      "| model | target | mesh (d,f,t) | remat | accum | batch/dev | peak | usable | fits | headroom | compile s | "
      "HW/model FLOPs | all-gather | reduce-scatter | all-reduce | permute | eval peak | versions |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    m = r["mesh"]
    ratio = r["hardware_over_model_flops"]
    ver = ", ".join(f"{k} {v}" for k, v in r["versions"].items() if k in ("jax", "libtpu", "jax-cuda12-plugin"))
    fits = {True: "yes", False: "**no**", None: "-"}[r["fits"]]
    lines.append(
        f"| {r['model']} | {r['target']} | {m.get('data')},{m.get('fsdp')},{m.get('tensor')} | {r['remat']} | "
        f"{r['accum_steps']} | {r['per_device_batch'] // r['accum_steps']} | {g(r['peak_bytes'])} | "
        f"{g(r['usable_bytes'])} | {fits} | {g(r['headroom_bytes'])} | {r['compile_s']:.0f} | "
        f"{'-' if ratio is None else f'{ratio:.3f}'} | {_c(r, 'all-gather')} | {_c(r, 'reduce-scatter')} | "
        f"{_c(r, 'all-reduce')} | {_c(r, 'collective-permute')} | {g(r['eval_peak_bytes'])} | {ver} |")
  misses = [r for r in rows if r["fits"] is False]
  if misses:
    lines += ["", "Rows that do not fit, with the compiler's numbers and the knobs that would help:"]
    for r in misses:
      lines.append(f"- {r['model']} on {r['target']}: {r['error'] or 'peak over usable'}; knobs: "
                   + "; ".join(r["knobs"]) + (f". Recipe: use {r['use_instead']}." if r.get("use_instead") else ""))
  envs = [r for r in rows if r["env"]]
  if envs:
    lines += ["", "Launch environment the GPU recipes need:"]
    lines += [f"- {r['model']} on {r['target']}: " + " ".join(f"{k}={v}" for k, v in r["env"].items()) for r in envs]
  kernels = [r for r in rows if r["custom_calls"]]
  if kernels:
    lines += ["", "Custom calls in the train step (Pallas kernels appear as tpu_custom_call / Triton):"]
    lines += [f"- {r['model']} on {r['target']}: " + ", ".join(f"{k} x{v}" for k, v in r["custom_calls"].items())
              for r in kernels]
  return "\n".join(lines) + "\n"


def _write(out: str, json_path: str, ordered: list[dict[str, Any]]) -> None:
  commands = sorted({r.get("command", "").strip() for r in ordered})
  fileio.atomic_write_json(json_path, report_lib.jsonable({"commands": commands, "rows": ordered}))
  fileio.atomic_write_text(os.path.join(out, "aot_fit.md"), markdown(ordered, commands))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  p = errors.ArgumentParser(prog="python -m experiments.aot_fit", description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="llava-1.5-7b,llava-1.5-13b")
  p.add_argument("--targets", default="v5p-8,v5e-16,v4-16,v5e-32,v4-32",
                 help="pairs without a recipe in configs/hardware.py are skipped")
  p.add_argument("--kernel_row", action=argparse.BooleanOptionalAction, default=True,
                 help=f"also compile {KERNEL_ROW[0]} on {KERNEL_ROW[1]} (TPU targets only)")
  p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--out", default=OUT)
  args = p.parse_args(argv)
  wanted = [(m, t) for m in args.models.split(",") for t in args.targets.split(",") if (m, t) in hardware.RECIPES]
  if not wanted:
    p.error(f"no recipe for any of --models={args.models} x --targets={args.targets} (configs/hardware.py)")
  for m, t in wanted:
    hardware.recipe(m, t, allow_misses=True)
  if args.kernel_row and any(targets_lib.get(t).platform == "tpu" for _, t in wanted):
    wanted.append(KERNEL_ROW)
  command = "python -m experiments.aot_fit " + " ".join(argv if argv is not None else sys.argv[1:])
  json_path = os.path.join(args.out, "aot_fit.json")
  old = fileio.read_json(json_path) if fileio.exists(json_path) else {"rows": []}
  rows = {(r["model"], r["target"]): r for r in old["rows"]}
  console = Console(width=160)
  for model, target in wanted:
    t0 = time.perf_counter()
    console.print(f"[bold]{model} on {target}[/bold] ...")
    rep = step_compile.run(row_config(model, target), target, with_flops=args.flops)
    row = summarize(model, target, rep, time.perf_counter() - t0)
    row["command"] = command
    if row["hardware_flops"] is None and (model, target) in rows:  # a --no-flops rerun keeps the FLOPs it had
      for k in ("hardware_flops", "hardware_over_model_flops"):
        row[k] = rows[(model, target)].get(k)
    rows[(model, target)] = row
    print(report_lib.format_text(rep), flush=True)
    ordered = sorted(rows.values(), key=lambda r: (r["model"], r["target"]))
    _write(args.out, json_path, ordered)  # after every row: a long run stopped early keeps what it compiled
  table = Table(title="AOT fit")
  for col in ("model", "target", "mesh", "remat", "accum", "peak", "usable", "fits", "compile s"):
    table.add_column(col)
  for r in ordered:
    table.add_row(r["model"], r["target"], str(tuple(r["mesh"].values())), r["remat"], str(r["accum_steps"]),
                  report_lib.gib(r["peak_bytes"]), report_lib.gib(r["usable_bytes"]), str(r["fits"]),
                  f"{r['compile_s']:.0f}")
  console.print(table)
  console.print(f"wrote {json_path} and aot_fit.md")
  return ordered


if __name__ == "__main__":
  main()
