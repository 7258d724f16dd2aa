"""The GPU check's last word: every stage's outcome and the owed targets, from what the stages wrote.

    python -m experiments.gpu_check_summary WORK_DIR OUT_DIR     # called by experiments/gpu_check.sh

Reads WORK_DIR/stages.tsv (one line per stage: name, status, exit code, seconds, budget), WORK_DIR/env.json
and the benchmarks' JSON reports under WORK_DIR (any of them may be missing: a failed or skipped stage
leaves none, a stage stopped at its time limit leaves the rows it had written) and OUT_DIR/compile_h200.json.
Writes OUT_DIR/summary.json and OUT_DIR/summary.md and prints the markdown. Standard library only, so
that it runs even where the benchmarks' imports failed.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

TARGET_MFU = 0.45
TARGET_KERNEL_SPEEDUP = 1.5
TARGET_PREFILL_SPEEDUP = 2.5


def _load(pattern: str) -> dict | None:
  """The first JSON file matching `pattern`, or None (missing or unreadable: the stage's log says why)."""
  for path in sorted(glob.glob(pattern)):
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None
  return None


def read_stages(work: str) -> list[dict]:
  stages = []
  try:
    with open(os.path.join(work, "stages.tsv")) as f:
      for line in f:
        name, status, rc, seconds, budget = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
        if name:
          stages.append(dict(name=name, status=status, rc=rc, seconds=seconds, budget=budget))
  except OSError:
    pass
  return stages


def _target(name: str, value: Any, met: bool | None, detail: str) -> dict:
  return dict(target=name, value=value, met=met, detail=detail)


def _ok_rows(report: dict | None, key: str = "rows") -> list[dict]:
  return [r for r in (report or {}).get(key, []) if r.get("status", "ok") == "ok"]


def summarize(work: str, out: str) -> dict:
  """Collects the stages' numbers into one dict (what summary.json holds)."""
  env = _load(os.path.join(work, "env.json")) or {}
  model = _load(os.path.join(work, "bench_model", "bench_model_*.json"))
  kernel = _load(os.path.join(work, "bench_trim_kernel", "bench_trim_*.json"))
  prefill = _load(os.path.join(work, "bench_trim_prefill", "bench_trim_*.json"))
  train_off = _load(os.path.join(work, "bench_train_off", "bench_train_*.json"))
  train_trim = _load(os.path.join(work, "bench_train_trim", "bench_train_*.json"))
  loop = _load(os.path.join(work, "bench_train_loop", "bench_train_*.json"))
  compiled = _load(os.path.join(out, "compile_h200.json"))
  targets = []

  # 1. bench_model: bench-1b forward / train step.
  rows = _ok_rows(model)
  best = max(rows, key=lambda r: r.get("train_mfu") or 0.0, default=None)
  targets.append(_target(
      "bench_model bench-1b: train-step MFU (owed numbers; no target)",
      None if best is None else best.get("train_mfu"), None,
      "not measured" if best is None else
      f"batch {best['batch']}: forward {best.get('forward_ms', 0):.1f} ms, train step "
      f"{best.get('train_step_ms', 0):.1f} ms, status {model.get('status')}"))

  # 2. bench_trim (a): Triton == XLA and the speed ratio at B=32.
  kv = (kernel or {}).get("kernel_verdict")
  if kv is None:
    kernel_rows = (kernel or {}).get("kernel", [])
    failed = [r for r in kernel_rows if r.get("check") != "pass" and r.get("impl") != "xla"]
    targets.append(_target("TRIM kernel == xla (B 1, 8, 32; 3 modes)", None,
                           False if failed else None,
                           f"incomplete: {len(kernel_rows)} rows written, {len(failed)} failed"))
    targets.append(_target(f"TRIM kernel speedup at B=32 >= {TARGET_KERNEL_SPEEDUP}x", None, None,
                           "not measured"))
  else:
    targets.append(_target("TRIM kernel == xla (B 1, 8, 32; 3 modes)", kv["checks"] - len(kv["failed"]),
                           kv["correct"], f"{kv['checks'] - len(kv['failed'])}/{kv['checks']} rows match"
                           + (f"; failed: {', '.join(kv['failed'])}" if kv["failed"] else "")))
    targets.append(_target(f"TRIM kernel speedup at B={kv['speed_batch']} >= {TARGET_KERNEL_SPEEDUP}x",
                           kv["speedup"], kv["speed_met"],
                           ", ".join(f"{k} {v:.2f}x" for k, v in kv["speedup"].items())))

  # 2b. bench_trim (b): prefill with ~121 TRIM tokens vs 576.
  mv = (prefill or {}).get("model_verdict")
  targets.append(_target(
      f"prefill >= {TARGET_PREFILL_SPEEDUP}x with ratio TRIM (~121 tokens vs 576)",
      None if mv is None else mv["prefill_ratio"], None if mv is None else mv["met"],
      "not measured" if mv is None else
      f"{(prefill.get('model') or [{}])[0].get('model')}: " + ", ".join(
          f"B={b} {v['speedup']:.2f}x ({100 * v['frac_of_flop_ratio']:.0f}% of FLOP ratio)"
          for b, v in mv["prefill_ratio"].items())))

  # 3. bench_train: MFU with TRIM off, and the TRIM step speedups at the same batch.
  off = [r for r in _ok_rows(train_off) if r.get("trim") == "off" and r.get("mfu") is not None]
  best_off = max(off, key=lambda r: r["mfu"], default=None)
  targets.append(_target(
      f"bench_train MFU >= {100 * TARGET_MFU:.0f}% with TRIM off", None if best_off is None else best_off["mfu"],
      None if best_off is None else best_off["mfu"] >= TARGET_MFU,
      "not measured" if best_off is None else
      f"best at batch {best_off['batch']}: {100 * best_off['mfu']:.1f}% ({1e3 * best_off['step_s']:.0f} ms/step); "
      + ", ".join(f"b{r['batch']} {100 * r['mfu']:.1f}%" for r in off)))
  off_by_batch = {r["batch"]: r for r in off}
  speedups = {}
  for r in _ok_rows(train_trim):
    base = off_by_batch.get(r["batch"])
    speedups[f"{r['trim']} b{r['batch']}"] = dict(
        step_ms=1e3 * r["step_s"], mfu=r.get("mfu"),
        speedup_vs_off=None if base is None else base["step_s"] / r["step_s"])
  targets.append(_target(
      "bench_train step with TRIM on (iqr_example, ratio) vs off (owed numbers; no target)", speedups or None,
      None, "not measured" if not speedups else ", ".join(
          f"{k}: {v['step_ms']:.0f} ms" + ("" if v["speedup_vs_off"] is None else f" ({v['speedup_vs_off']:.2f}x)")
          for k, v in speedups.items())))
  if loop is not None:
    targets.append(_target("bench_train loop: async vs sync", loop.get("loop"), None,
                           json.dumps(loop.get("loop"))[:300]))

  # 4. medcg.compile --measure: measured peak vs the compiler's prediction.
  measured = (compiled or {}).get("measured")
  targets.append(_target(
      "medcg.compile --measure: measured vs predicted peak memory", measured, None,
      "not measured" if measured is None else json.dumps(measured)[:400]))

  return dict(env=env, stages=read_stages(work), targets=targets,
              reports={k: v is not None for k, v in dict(
                  bench_model=model, bench_trim_kernel=kernel, bench_trim_prefill=prefill,
                  bench_train_off=train_off, bench_train_trim=train_trim, bench_train_loop=loop,
                  compile_h200=compiled).items()})


def markdown(summary: dict) -> str:
  env = summary["env"]
  lines = ["# GPU check", "",
           f"{env.get('gpu', 'unknown GPU')}; jax {env.get('jax', '?')}, python {env.get('python', '?')}; "
           f"{env.get('time', '')}", "",
           "| stage | status | exit | seconds | budget |", "|---|---|---|---|---|"]
  lines += [f"| {s['name']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['budget']} |"
            for s in summary["stages"]]
  lines += ["", "| target | met | detail |", "|---|---|---|"]
  verdict = {True: "yes", False: "**NO**", None: "-"}
  lines += [f"| {t['target']} | {verdict[t['met']]} | {t['detail']} |" for t in summary["targets"]]
  lines += ["", "Full reports and logs: gpu_check.tar.gz (`tar xzf gpu_check.tar.gz`)."]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m experiments.gpu_check_summary WORK_DIR OUT_DIR", file=sys.stderr)
    return 2
  work, out = argv
  summary = summarize(work, out)
  text = markdown(summary)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
