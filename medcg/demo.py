"""The main job: compositional generalisation on SynthMAT, on a CPU, in minutes.

    python -m medcg.demo --workdir runs/demo [--seeds 3]
    python -m medcg.demo --model tiny-qwen2vl --workdir runs/demo_qwen   # the Qwen2-VL architecture, 112 px

1. builds SynthMAT (the synthetic Med-MAT release) and converts it to TFRecord shards, unless they exist;
2. trains a byte-level BPE tokenizer on the shards' prompts (from-scratch models read ~3x fewer tokens);
3. runs the three arms of `configs/demo.py` (Table 3 row 25: CT-Brain 05 + X-ray-Lung 28 -> CT-Lung 03):
   the untrained Baseline, Baseline+ (as many samples from subsets sharing no MAT element with 03) and
   Related (the two related subsets), each evaluated on subset 03's test split, which no arm trains on;
4. prints the CG table (n, intervals, the CG test) with the paper's numbers beside it and writes it to
   WORKDIR/demo.md, with demo.json and the Table 3 bar plot WORKDIR/demo_table3.png (and .svg).

Finished arms are skipped (a re-run resumes). Each arm's start and end (its accuracy, or its exit code, log and
last log line) are reported on stderr as `experiments.sweep` reports its runs. Each arm's workdir holds its
checkpoints, metrics, TensorBoard events, samples.jsonl and results.json. Before the first arm starts, the shards
are checked against every arm's config (`medcg.preflight`): shards built for other sizes fail in seconds, naming
what is short and the commands that rebuild it. `--workdir` may be gs://BUCKET/... (the data dirs stay local).

A bad flag, path or data prints one line `medcg.demo: error: ...` and exits 2; `--verbose` or MEDCG_VERBOSE=1
adds its traceback.
"""
from __future__ import annotations

import os
import sys
import time

from configs import common
from configs import models
from medcg import errors
from medcg import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join("configs", "demo.py")


def ensure_shards(raw_dir: str, shards_dir: str, *, image_size: int, per_subset: int, test_per_subset: int,
                  seed: int, fmt: str) -> None:
  """SynthMAT -> shards, skipped when a complete manifest is there (convert itself resumes per subset)."""
  from medcg.data import shards as shards_lib
  from medcg.data.__main__ import main as data_main
  try:
    shards_lib.Manifest.load(shards_dir)
    print(f"[demo] using the SynthMAT shards in {shards_dir}")
    return
  except (FileNotFoundError, ValueError):
    pass
  if not os.path.exists(os.path.join(raw_dir, "Aggregated_Subsets")):
    print(f"[demo] writing SynthMAT ({per_subset} train + {test_per_subset} test per subset, {image_size} px) "
          f"to {raw_dir}", flush=True)
    data_main(["synth", "--out", raw_dir, "--image_size", str(image_size), "--per_subset", str(per_subset),
               "--test_per_subset", str(test_per_subset), "--seed", str(seed), "--no_progress"])
  print(f"[demo] converting to {fmt} shards in {shards_dir}", flush=True)
  data_main(["convert", "--src", raw_dir, "--out", shards_dir, "--image_size", str(image_size),
             "--format", fmt, "--no_progress"])


def main(argv=None) -> int:
  p = errors.ArgumentParser(prog="python -m medcg.demo", description=__doc__)
  p.add_argument("--workdir", default="runs/demo", help="parent of the arms' workdirs (local or gs://)")
  p.add_argument("--model", default="tiny", choices=models.FROM_SCRATCH,
                 help="the from-scratch preset: tiny (LLaVA architecture, 32 px) or tiny-qwen2vl (Qwen2-VL, 112 px)")
  p.add_argument("--data_dir", default=None, help="where SynthMAT (JSON + PNG) is written (default data/synthmat, "
                 "data/synthmat112 for tiny-qwen2vl)")
  p.add_argument("--shards", default=None, help="converted shards, built if missing (default data/synthmat_shards, "
                 "data/synthmat112_shards for tiny-qwen2vl)")
  p.add_argument("--seeds", type=errors.positive_int, default=1, help="seeds per arm (mean ± sd when > 1)")
  p.add_argument("--format", default="tfrecord", choices=("tfrecord", "array_record"), help="shard format")
  p.add_argument("--synth_train", type=errors.positive_int, default=common.SYNTH_TRAIN,
                 help="SynthMAT train samples per subset")
  p.add_argument("--synth_test", type=errors.positive_int, default=common.SYNTH_TEST,
                 help="SynthMAT test samples per subset")
  p.add_argument("--epochs", type=int, default=0, help="0: the recipe's")
  p.add_argument("--compilation_cache_dir", default=None,
                 help="the arms' JAX compilation cache ('off' disables; default $MEDCG_COMPILATION_CACHE, else "
                 "~/.cache/medcg/jax): the second arm with the same shapes loads the first's programs")
  a = p.parse_args(argv)
  if a.compilation_cache_dir is not None:  # the arms are subprocesses: they read it from the environment
    from medcg import compile_cache
    os.environ[compile_cache.ENV] = a.compilation_cache_dir
  # Paths given relative to the caller's directory; the sweep runs from the repository root.
  a.workdir = fileio.absolute(a.workdir)
  raw, shards = common.synth_dirs(a.model)
  a.data_dir, a.shards = os.path.abspath(a.data_dir or raw), os.path.abspath(a.shards or shards)
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    return _run(a)
  except Exception as e:  # the user's to fix (data, paths, storage): the message, no traceback
    status = errors.exit_status(e, "medcg.demo", verbose_=a.verbose or None)
    if status is None:
      raise
    return status
  finally:
    os.chdir(cwd)


def check_data(base: str, a) -> None:
  """Every arm's data before any arm starts (the tokenizer is left out: the demo trains it next)."""
  from configs import demo as demo_config
  from experiments import sweep
  from medcg import preflight
  configs = {arg: demo_config.get_config(arg) for arg in sweep.sweep_args(base)}
  preflight.check_all(configs, tokenizer=False, synth_src=a.data_dir, synth_test=a.synth_test)


def _run(a) -> int:
  t0 = time.time()
  ensure_shards(a.data_dir, a.shards, image_size=common.synth_image_size(a.model), per_subset=a.synth_train,
                test_per_subset=a.synth_test, seed=0, fmt=a.format)
  # Run args that differ from configs/demo.py's defaults travel in the sweep's base arg.
  extra = dict(model=(a.model, "tiny"), shards=(a.shards, os.path.join(REPO, common.synth_dirs(a.model)[1])),
               synth_train=(a.synth_train, common.SYNTH_TRAIN), synth_test=(a.synth_test, common.SYNTH_TEST),
               epochs=(a.epochs, 0))
  base = f"{DEMO_CONFIG}:seeds={a.seeds}" + "".join(f",{k}={v}" for k, (v, d) in extra.items() if v != d)
  check_data(base, a)
  tok = common.corpus_tokenizer_path(a.shards)
  if not os.path.exists(tok):
    from medcg.data.__main__ import build_corpus_tokenizer
    build_corpus_tokenizer(a.shards, common.CORPUS_VOCAB, tok)
    print(f"[demo] trained the BPE tokenizer {tok}")
  print(f"[demo] data ready after {time.time() - t0:.0f} s", flush=True)

  from experiments import sweep
  from experiments.launchers import local
  runs = sweep.plan(base, a.workdir, python=sys.executable)
  for r in runs:
    state = "done" if r["done"] else "to train" if "arm=baseline," not in r["arg"] + "," else "to evaluate"
    print(f"[demo] {r['arg']}: {state}", flush=True)
  # The sweep reports each arm's start and end (accuracy, or exit code and last log line) on stderr; the done
  # arms were named just above, so it does not repeat them. The first failure stops the demo.
  started = local.run(runs, parallel=1, stop_on_failure=True, announce_skips=False)
  failed = [rc for _, rc in started if rc]
  if failed:
    return failed[0]
  table = sweep.collect(base, a.workdir)
  print(table.get("markdown", ""))
  written = sweep.write_table(fileio.join(a.workdir, "demo"), table)  # demo.md, demo.json and the plot
  plots = [w for w in written if w.endswith(".png")]
  print(f"[demo] total {time.time() - t0:.0f} s; table in {written[0]}" + (f", plot in {plots[0]}" if plots else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
