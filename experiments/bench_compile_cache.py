"""What the persistent compilation cache saves: the demo's three arms with the cache off, cold and warm.

    python -m experiments.bench_compile_cache [--synth_train 12 --synth_test 4 --epochs 1] [--out experiments/results/bench_compile_cache]

One run of the script, three conditions side by side (the machines are noisy, so compare the ratios):
  off   MEDCG_COMPILATION_CACHE=off: every process compiles everything;
  cold  an empty cache folder: the same compilations, now also written;
  warm  the folder the cold pass filled: a second process with the same shapes loads them.
Each condition runs `python -m medcg.demo` at a toy size (the shards and tokenizer are built once, before the
timed passes) into its own workdir. Reported per condition: the demo's wall time, and per arm the trainer's
first-step latency (`train/step_time_s` of step 1 in metrics.jsonl: its first window holds the compilation; the
untrained Baseline has no step) and the process's wall time (from sweep.log's start to its results.json).
"""
from __future__ import annotations


from medcg import errors
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDITIONS = ("off", "cold", "warm")


def _demo(args, workdir: str, data: str, cache: str) -> float:
  env = dict(os.environ, MEDCG_COMPILATION_CACHE=cache, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "medcg.demo", "--workdir", workdir, "--data_dir", os.path.join(data, "raw"),
         "--shards", os.path.join(data, "shards"), "--format", "array_record", "--synth_train",
         str(args.synth_train), "--synth_test", str(args.synth_test), "--epochs", str(args.epochs)]
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"demo failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
  return time.perf_counter() - t


def _first_step(arm_dir: str) -> float | None:
  path = os.path.join(arm_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  for line in open(path):
    row = json.loads(line)
    if row.get("step") == 1 and "train/step_time_s" in row:
      return float(row["train/step_time_s"])
  return None


def main(argv=None) -> int:
  p = errors.ArgumentParser(description=__doc__)
  p.add_argument("--synth_train", type=int, default=12)
  p.add_argument("--synth_test", type=int, default=4)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--out", default="", help="write OUT.md and OUT.json")
  a = p.parse_args(argv)
  root = tempfile.mkdtemp(prefix="bench_cc_")
  try:
    cache = os.path.join(root, "cache")
    # Data and tokenizer first (an untimed pass that also trains nothing new for the timed ones).
    _demo(a, os.path.join(root, "prep"), root, "off")
    rows = {}
    for cond in CONDITIONS:
      workdir = os.path.join(root, cond)
      wall = _demo(a, workdir, root, "off" if cond == "off" else cache)
      arms = {}
      for arm_dir in sorted(os.listdir(os.path.join(workdir, "demo"))):
        arm = arm_dir.split("__")[0].split("=")[1]
        arms[arm] = _first_step(os.path.join(workdir, "demo", arm_dir))
      rows[cond] = {"demo_s": wall, "first_step_s": arms}
  finally:
    shutil.rmtree(root, ignore_errors=True)
  arm_names = sorted({arm for r in rows.values() for arm in r["first_step_s"]})
  headers = ["condition", "demo wall s", "x off"] + [f"{arm} first step s" for arm in arm_names if
                                                      any(r["first_step_s"][arm] is not None for r in rows.values())]
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for cond, r in rows.items():
    cells = [cond, f"{r['demo_s']:.1f}", f"{r['demo_s'] / rows['off']['demo_s']:.2f}"]
    cells += [f"{r['first_step_s'][arm]:.2f}" for arm in arm_names if r["first_step_s"][arm] is not None]
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print(table)
  result = {"command": "python -m experiments.bench_compile_cache " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.python_version()})",
            "date": time.strftime("%Y-%m-%d"), "sizes": vars(a), "rows": rows}
  if a.out:
    from medcg import fileio
    fileio.atomic_write_json(a.out + ".json", result)
    fileio.atomic_write_text(a.out + ".md", f"# Persistent compilation cache: the demo off / cold / warm\n\n"
                             f"Command: `{result['command']}`  \nMachine: {result['machine']}, {result['date']}\n\n"
                             f"{table}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
