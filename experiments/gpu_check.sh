#!/usr/bin/env bash
# The GPU check (issue 12, item 7): every measurement owed on a GPU, in one device call of at most 8 minutes.
#
# Before the call, here (PyPI reachable):
#   bash experiments/gpu_wheels.sh            # .whl/: ml_collections, grain, array_record, portpicker (~4.4 MiB)
#
# The device-tool call (one H200, Python 3.12, jax 0.11.2 + CUDA 13; nothing can be downloaded there):
#   run(command="bash experiments/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The script stops itself after GPU_CHECK_TOTAL_S (470 s) of stages; timeout_s leaves ~70 s for the
# wheel install, the summary and the transfer. The machine's start (a minute or more) comes on top: about
# 10 of the session's 15 device minutes. A rerun of some stages on the still-warm machine:
#   run(command="GPU_CHECK_STAGES=trim_kernel,compile bash experiments/gpu_check.sh", carry=[".whl"], timeout_s=300)
# then give_back.
#
# What comes back ($OUT, 4 files, well inside the tool's 8 files of 16 MiB):
#   summary.md / summary.json   every stage's status and time, and each target: met / NOT met / not measured
#   compile_h200.json           medcg.compile --measure's report (measured vs predicted peak memory)
#   gpu_check.tar.gz            everything else: env.json, stages.tsv, logs/<stage>.log, and each bench's own
#                               JSON + markdown under bench_model/, bench_trim_kernel/, bench_trim_prefill/,
#                               bench_train_off/, bench_train_trim/ (copy those into experiments/results/)
# The tarball and the summary are rewritten after every stage, so a call cut short still returns what ran.
#
# Stages (each under `timeout`: one that hangs cannot eat the others' time; a failing stage is recorded and
# the rest run; its stdout/stderr go to logs/<stage>.log):
#   env          nvidia-smi, versions, the wheels importable
#   model        bench_model: bench-1b forward + train step at batch 16, 32 (tokens/s, MFU, memory)
#   trim_kernel  bench_trim (a): Triton kernel == XLA at B 1, 8, 32 (N=576, D=1024, E=768), all three modes
#                (counts exact, tokens to tests/test_trim.py's 1e-6), and Triton / XLA speed (target >= 1.5x at B=32)
#   trim_prefill bench_trim (b): llava-1.5-7b prefill at batch 1, 8, TRIM off / iqr_example / ratio (~121 tokens):
#                target >= 2.5x and >= 90% of the FLOP ratio
#   train_off    bench_train: bench-1b real train step, TRIM off, batch 16, 32: target MFU >= 45%
#   train_trim   bench_train: the same with TRIM iqr_example and ratio at batch 32
#   compile      medcg.compile --measure: one real step's peak memory vs the compiler's prediction
# The budgets are estimates (no GPU was lent when this was written): compile times of bench-1b and the 7B on
# the H200 decide them. bench_model and bench_trim write their report after every row, so a stage stopped at its
# budget keeps what it measured; bench_train and medcg.compile write at the end only.
#
# Environment: OUT (default /tmp/gpu_check), PYTHON (python3), GPU_CHECK_WORK (/tmp/gpu_check_work),
# GPU_CHECK_TOTAL_S (470), GPU_CHECK_STAGES (comma list; default all). Exit status 0 when every stage
# passed, else 1. Checked on CPU by tests/test_gpu_check.py (syntax, modules, flags, wheels).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
ONLY=",${GPU_CHECK_STAGES:-},"
RESERVE_S=10  # kept back from the deadline for the summary and the tarball
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1

mkdir -p "$OUT" "$WORK/logs"
: >"$WORK/stages.tsv"
START=$SECONDS
FAILED=0

snapshot() {
  # Summary + tarball after every stage (atomic renames): a call cut short still returns what ran.
  "$PY" -m experiments.gpu_check_summary "$WORK" "$OUT" >"$WORK/summary.txt" 2>&1
  tar czf "$OUT/gpu_check.tar.gz.tmp" -C "$WORK" . && mv "$OUT/gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}

stage() {
  # stage NAME BUDGET_S COMMAND...: runs COMMAND under timeout, logs it, records its outcome.
  local name=$1 budget=$2
  shift 2
  if [[ $ONLY != ",," && $ONLY != *",$name,"* ]]; then
    return 0
  fi
  local left=$((TOTAL_S - (SECONDS - START) - RESERVE_S))
  ((budget > left)) && budget=$left
  if ((budget < 15)); then
    printf '%s\tskipped (no time left)\t-\t0\t%s\n' "$name" "$budget" >>"$WORK/stages.tsv"
    echo "== $name: skipped, ${left}s left"
    FAILED=1
    return 0
  fi
  echo "== $name (budget ${budget}s): $*"
  local t0=$SECONDS rc status
  timeout -k 10 "$budget" "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${budget}s" ;;
    *) status="FAILED" ;;
  esac
  ((rc != 0)) && FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$budget" >>"$WORK/stages.tsv"
  echo "   $status (exit $rc, $((SECONDS - t0))s)"
  if ((rc != 0)); then
    tail -n 8 "$WORK/logs/$name.log" | sed 's/^/   | /'
  fi
  snapshot
}

# The wheels the image lacks (experiments/gpu_wheels.sh), as the device README installs them.
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >"$WORK/logs/wheels.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    printf 'wheels\tok\t0\t-\t-\n' >>"$WORK/stages.tsv"
  else
    printf 'wheels\tFAILED\t1\t-\t-\n' >>"$WORK/stages.tsv"
    FAILED=1
  fi
else
  echo "no .whl/*.whl: run experiments/gpu_wheels.sh here and carry .whl" | tee "$WORK/logs/wheels.log"
  printf 'wheels\tmissing (carry .whl)\t-\t-\t-\n' >>"$WORK/stages.tsv"
fi

stage env 25 "$PY" - "$WORK/env.json" <<'EOF'
# One process: the benches' own imports are their stages' business (their absl flags would clash here).
import importlib, importlib.metadata as md, json, platform, subprocess, sys, time
env = dict(time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), python=platform.python_version())
def save():
  with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=2)
try:
  env["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,temperature.gpu",
       "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
except Exception as e:  # noqa: BLE001 - recorded, not fatal
  env["nvidia_smi"] = repr(e)
env["packages"] = {}
for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "etils", "absl-py",
             "ml_collections", "grain", "array_record", "portpicker", "numpy", "triton"):
  try:
    env["packages"][dist] = md.version(dist)
  except md.PackageNotFoundError:
    env["packages"][dist] = None
save()
env["imports"] = {}
for mod in ("ml_collections", "grain", "array_record", "portpicker", "configs.models", "medcg.model.vlm",
            "medcg.kernels.trim_pallas", "medcg.train.trainer", "configs.cg_table3"):
  try:
    importlib.import_module(mod)
    env["imports"][mod] = "ok"
  except Exception as e:  # noqa: BLE001 - the stage that needs it fails and says so
    env["imports"][mod] = repr(e)[:300]
save()
import jax
env["jax"] = jax.__version__
env["backend"] = jax.default_backend()
env["devices"] = [str(d) for d in jax.devices()]
env["gpu"] = jax.devices()[0].device_kind
save()
print(json.dumps(env, indent=2))
bad = [m for m, v in env["imports"].items() if v != "ok"]
sys.exit(1 if bad or env["backend"] != "gpu" else 0)
EOF

# 1. bench_model: bench-1b forward and train step (an OOM row ends the batches; rows written as they come).
stage model 60 "$PY" -m experiments.bench_model --preset=bench-1b --batches=16,32 --reps=5 --out="$WORK/bench_model"

# 2. bench_trim (a): Triton == XLA at B 1, 8, 32 for every mode, and the speed ratio (exit 1 on a mismatch).
stage trim_kernel 60 "$PY" -m experiments.bench_trim --nomodel_part --batches=1,8,32 \
  --modes=iqr_batch,iqr_example,ratio --n=576 --d=1024 --e=768 --out="$WORK/bench_trim_kernel"

# 2b. bench_trim (b): the prefill target (llava-1.5-7b, bf16 weights); bench_train times the train step.
stage trim_prefill 95 "$PY" -m experiments.bench_trim --nokernel_part --notrain_rows \
  --prefill_preset=llava-1.5-7b --prefill_batches=1,8 --out="$WORK/bench_trim_prefill"

# 3. bench_train: the real step's MFU with TRIM off (target 45 %), then TRIM on at one batch.
stage train_off 90 "$PY" -m experiments.bench_train --preset bench-1b --trim off --batch_sizes 16,32 \
  --steps 5 --warmup 1 --out "$WORK/bench_train_off"
stage train_trim 65 "$PY" -m experiments.bench_train --preset bench-1b --trim iqr_example,ratio --batch_sizes 32 \
  --steps 5 --warmup 1 --out "$WORK/bench_train_trim"
# 3b. The async-vs-sync loop comparison (`bench_train --loop`) runs the real trainer on SynthMAT shards, which
# this image cannot build (no TensorFlow for the converter): build them here, put them in a carried folder and
# pass --shards; take its ~40 s from train_off / train_trim to stay inside 470 s. Off by default:
# stage train_loop 40 "$PY" -m experiments.bench_train --loop --batch_sizes 8,32 --shards .gpu_shards \
#   --out "$WORK/bench_train_loop"

# 4. medcg.compile --measure: one real step on this GPU, measured peak vs the compiler's prediction.
stage compile 60 "$PY" -m medcg.compile --config configs/cg_table3.py:data=medmat,model=bench-1b --target h200x1 \
  --measure --json "$OUT/compile_h200.json"

snapshot
cat "$WORK/summary.txt"
echo "== done in $((SECONDS - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
