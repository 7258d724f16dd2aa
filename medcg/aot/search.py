"""`--search`: the best recipe that fits a target, tried in order of preference and stopped at the first fit.

Criterion (stated in every report): among recipes whose train step fits the target's usable memory with at least
`MIN_HEADROOM` to spare, prefer (1) less recomputation (remat none, then dots_with_no_batch_dims_saveable, then
full), then (2) fewer gradient-accumulation micro-steps (a larger per-device micro-batch), then (3) no tensor
parallelism (pure FSDP keeps the Megatron all-reduces off the critical path). The order is lexicographic, so the
first candidate that fits is the best one and the search compiles no more than it must.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import ml_collections

from medcg.aot import step_compile

REMATS = ("none", "dots_with_no_batch_dims_saveable", "full")
MIN_HEADROOM = 0.05
CRITERION = ("fits with >= 5% of usable memory to spare; then least recompute (remat none < "
             "dots_with_no_batch_dims_saveable < full), then fewest accumulation steps, then no tensor parallelism")


def candidates(config, n_devices: int) -> list[dict[str, Any]]:
  """The grid, best first: remat x accumulation x mesh shape (fsdp over all devices, or fsdp x tensor 2)."""
  b = config.data.batch_size
  meshes = [{"data": 1, "fsdp": n_devices, "tensor": 1}]
  if n_devices % 2 == 0 and n_devices > 1:
    meshes.append({"data": 1, "fsdp": n_devices // 2, "tensor": 2})
  out = []
  for remat, mesh in itertools.product(REMATS, meshes):
    dp = mesh["data"] * mesh["fsdp"]
    if b % dp:
      continue
    per_shard = b // dp
    accs = [a for a in (1, 2, 4, 8, 16, 32) if per_shard % a == 0]
    for acc in accs:
      out.append({"remat": remat, "accum_steps": acc, "mesh": mesh})
  rank = lambda c: (REMATS.index(c["remat"]), c["accum_steps"], c["mesh"]["tensor"])
  return sorted(out, key=rank)


def apply(config, cand: dict[str, Any]) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  step_compile.set_remat(c, cand["remat"])
  c.train.accum_steps = cand["accum_steps"]
  for axis, size in cand["mesh"].items():
    c.mesh[axis] = size
  c.mesh.num_devices = 0
  return c


def search(config, target_name: str, devices, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compile candidates in order until one fits; returns {criterion, tried: [...], best: report | None}."""
  tried = []
  for cand in candidates(config, len(devices)):
    c = apply(config, cand)
    report = step_compile.run(c, target_name, with_eval=False, with_flops=False, devices=devices)
    train = report["train"]
    peak = train.get("peak_bytes") or train.get("needed_bytes")
    usable = report["usable_bytes"]
    ok = bool(train.get("fits")) and usable and (usable - train["peak_bytes"]) >= MIN_HEADROOM * usable
    row = {**cand, "mesh": dict(cand["mesh"]), "fits": bool(ok), "peak_bytes": peak, "usable_bytes": usable,
           "compile_s": train["compile_s"]}
    tried.append(row)
    log(f"  remat={cand['remat']:<34} accum={cand['accum_steps']:<3} mesh={cand['mesh']}  "
        f"peak={_gib(peak)} of {_gib(usable)}  {'fits' if ok else 'does not fit'}")
    if ok:
      return {"criterion": CRITERION, "tried": tried, "best": report, "best_candidate": row}
  return {"criterion": CRITERION, "tried": tried, "best": None, "best_candidate": None}


def _gib(n) -> str:
  return "?" if not n else f"{n / step_compile.GiB:.1f} GiB"
