"""TRIM speed: (a) the Pallas kernels against the XLA reference, (b) what TRIM saves in the model.

    python -m experiments.bench_trim                          # full size on GPU / TPU
    python -m experiments.bench_trim --nomodel_part           # (a) only
    python -m experiments.bench_trim --nokernel_part          # (b) only
    JAX_PLATFORMS=cpu python -m experiments.bench_trim        # CPU: small sizes, interpret mode

(a) `trim(...)` for every mode in --modes (default all three) at B in --batches (default 1, 8, 32;
    N=576, D=1024, E=768, k_max 256) for impl="xla" and the backend's kernel ("pallas_gpu", the
    Triton kernels, on GPU; "pallas_tpu" on TPU). Each row is a correctness check: on inputs redrawn
    until no decision is within float rounding (as tests/test_trim.py draws them), the kernel must
    give xla's counts exactly and its tokens to the tests' tolerance (1e-6; bf16 hidden 1e-2), all
    finite. Columns: median time per call (back-to-back calls, and waiting after each), the bytes
    TRIM must move at least (read image_embeds, text_embeds and hidden once, write tokens and
    count), the bandwidth that implies and its fraction of H100 HBM (3.35 TB/s), and the speedup
    over xla. Target: the kernel >= 1.5x faster than xla at B=32. The exit status is 1 when a check
    fails (after the report is written).
(b) prefill latency of a random `llava-1.5-7b` (bf16 weights on an accelerator) at batch 1 and 8,
    and the train-step time of `bench-1b` (AdamW on projector + LLM, vision and text towers
    frozen; --notrain_rows skips it), TRIM off vs on
    (iqr_example with k_max 192, and ratio 0.21 = 120 kept + 1 mean token), each against the
    FLOP-count ratio from `vlm.model_flops`. Targets: prefill >= 2.5x faster with ~121 tokens and
    within 90% of the FLOP ratio.

On CPU there is no Pallas backend: the kernels run in interpret mode (a jitted emulation, not a
kernel timing), sizes shrink (N=144, D=128, E=64; a 96-px `tiny` model) and the output says so.
Writes experiments/results/bench_trim_<platform>.json and .md atomically after every row (a run
stopped part-way keeps what it measured; `status` says "running") and prints the table.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Callable

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import benchlib
from medcg import fileio
from medcg.kernels import trim as trim_lib
from medcg.kernels import trim_common

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes for part (a).")
flags.DEFINE_integer("n", None, "Tokens per image (default 576; CPU 144).")
flags.DEFINE_integer("d", None, "Feature width of hidden (default 1024; CPU 128).")
flags.DEFINE_integer("e", None, "CLIP projection width (default 768; CPU 64).")
flags.DEFINE_integer("k_max", None, "TRIM capacity in part (a) (default 256; CPU N/2).")
flags.DEFINE_list("modes", list(trim_common.MODES), "TRIM modes for part (a) (default all three).")
flags.register_validator("modes", lambda v: bool(v) and set(v) <= set(trim_common.MODES),
                         f"--modes: a comma list of {', '.join(trim_common.MODES)}")
flags.DEFINE_float("ratio", 0.21, "Keep ratio for mode=ratio (also part (b)'s ratio rows).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of hidden in part (a).")
flags.DEFINE_integer("reps", 20, "Timed calls per row (median reported); CPU uses 3.")
flags.DEFINE_bool("kernel_part", True, "Run part (a) (kernel vs XLA: correctness check and time).")
flags.DEFINE_bool("model_part", True, "Run part (b) (prefill and train step with TRIM off / on).")
flags.DEFINE_integer("seed", None, "Seed of part (a)'s inputs (default: fresh each run, recorded).")
flags.DEFINE_string("prefill_preset", "llava-1.5-7b", "Model preset for the prefill rows.")
flags.DEFINE_enum("prefill_param_dtype", "bfloat16", ["bfloat16", "float32"],
                  "Weights of the prefill model on GPU / TPU (inference keeps them in half precision).")
flags.DEFINE_bool("train_rows", True, "Part (b)'s train-step rows (bench_train times the real step).")
flags.DEFINE_list("prefill_batches", ["1", "8"], "Batch sizes for the prefill rows.")
flags.DEFINE_string("train_preset", "bench-1b", "Model preset for the train-step rows.")
flags.DEFINE_integer("train_batch", 8, "Batch size of the train-step rows.")
flags.DEFINE_integer("text_len", 64, "Text tokens around the image in part (b) prompts.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Directory for bench_trim_<platform>.json / .md.")

H100_HBM_BYTES_PER_S = 3.35e12
TARGET_KERNEL_SPEEDUP = 1.5
TARGET_PREFILL_SPEEDUP = 2.5
TARGET_FLOP_FRACTION = 0.9
MODES_INDEX = {m: i for i, m in enumerate(trim_common.MODES)}
# tests/test_trim.py's kernel-vs-XLA tolerances (float32 hidden; bfloat16 hidden) and draw margin.
CHECK_TOL = {"float32": 1e-6, "bfloat16": 1e-2}
CHECK_MARGIN = 1e-4


_timed = benchlib.timed


_atomic_write = fileio.atomic_write_text


# ----------------------------------------------------------------------------- (a) kernel

def _pipelined(fn: Callable[[], Any], reps: int, groups: int = 5) -> float:
  """Median seconds per call over `groups` runs of `reps` back-to-back calls, waited on once per group.

  Dispatch of the next call overlaps the device work of the previous one, so this is close to device
  time for kernels of tens of microseconds, where a wait after every call measures the host round trip.
  """
  jax.block_until_ready(fn())
  times = []
  for _ in range(groups):
    start = time.perf_counter()
    out = [fn() for _ in range(reps)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / reps)
  return float(np.median(times))


def _separated(p: np.ndarray, ub: np.ndarray | None, k_eff: np.ndarray, rel: float) -> bool:
  """False if a p lies within `rel` of the IQR threshold or of the top-k cut (as tests/test_trim.py)."""
  for i in range(p.shape[0]):
    row = np.sort(p[i])[::-1]
    if ub is not None and np.min(np.abs(row - ub[i])) <= rel * abs(ub[i]):
      return False
    k = int(k_eff[i])
    if 0 < k < len(row) and row[k - 1] - row[k] <= rel * row[k - 1]:
      return False
  return True


def draw(rng: np.random.Generator, b: int, n: int, d: int, e: int, k_max: int, mode: str,
         ratio: float | None, attempts: int = 50):
  """Random (hidden, image_embeds, text_embeds) whose TRIM decisions float rounding cannot flip.

  The kernel and the XLA reference sum the scores in different orders; on inputs where a p sits
  within 1e-4 (relative) of the threshold or of the k-th largest p they could keep different
  tokens and both be right. The draw is rejected then, as tests/test_trim.py's `draw` does, so the
  check below can ask for the same count exactly. Decisions are taken on a float64 NumPy port.
  Returns the inputs (NumPy, float32), the spread of the scores and the attempt that passed.
  """
  for attempt in range(attempts):
    scale = float(rng.uniform(0.1, 0.6))  # spread of the scores: sparse to dense outlier sets
    hidden = rng.normal(size=(b, n, d)).astype(np.float32)
    image_embeds = (rng.normal(size=(b, n, e)) * scale).astype(np.float32)
    text_embeds = rng.normal(size=(b, e)).astype(np.float32)
    s = np.einsum("bne,be->bn", image_embeds.astype(np.float64), text_embeds.astype(np.float64))
    p = np.exp(-(s - s.min(axis=1, keepdims=True)))
    p /= p.sum(axis=1, keepdims=True)
    ub = None
    if mode == "ratio":
      k = np.full(b, trim_common.static_ratio_k(n, ratio))
    elif mode == "iqr_batch":
      q1, q3 = np.percentile(p, [25.0, 75.0])
      ub = np.full(b, q3 + trim_common.IQR_FACTOR * (q3 - q1))
      k = np.full(b, int(np.sum(p > ub[0])) // b)
    else:
      q1, q3 = np.percentile(p, [25.0, 75.0], axis=1)
      ub = q3 + trim_common.IQR_FACTOR * (q3 - q1)
      k = np.sum(p > ub[:, None], axis=1)
    if _separated(p, ub, np.minimum(k, k_max), CHECK_MARGIN):
      return (hidden, image_embeds, text_embeds), scale, attempt
  raise RuntimeError(f"bench_trim: no well-separated draw in {attempts} attempts "
                     f"(mode {mode}, B={b}, N={n}); rerun with another --seed")


def compare(tokens, count, ref_tokens, ref_count, dtype) -> dict[str, Any]:
  """The kernel's output against XLA's: counts exactly, tokens to tests/test_trim.py's tolerance."""
  tokens = np.asarray(jnp.asarray(tokens, jnp.float32))
  ref_tokens = np.asarray(jnp.asarray(ref_tokens, jnp.float32))
  count, ref_count = np.asarray(count), np.asarray(ref_count)
  tol = CHECK_TOL[jnp.dtype(dtype).name]
  same_count = bool(np.array_equal(count, ref_count))
  finite = bool(np.all(np.isfinite(tokens)))
  close = finite and tokens.shape == ref_tokens.shape and bool(
      np.allclose(tokens, ref_tokens, rtol=tol, atol=tol, equal_nan=False))
  diff = np.abs(tokens - ref_tokens) if tokens.shape == ref_tokens.shape else np.array([np.inf])
  return dict(same_count_as_xla=same_count, tokens_close_to_xla=close, finite=finite,
              max_abs_diff_vs_xla=float(np.max(diff)), check_tol=tol,
              check="pass" if same_count and close else "FAIL")


def kernel_rows(platform: str, on_cpu: bool, seed: int,
                on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
  """Part (a): every mode x batch, XLA then the backend's kernel(s): time and the correctness check."""
  n = FLAGS.n or (144 if on_cpu else 576)
  d = FLAGS.d or (128 if on_cpu else 1024)
  e = FLAGS.e or (64 if on_cpu else 768)
  k_max = FLAGS.k_max if FLAGS.k_max is not None else (n // 2 if on_cpu else 256)
  reps = 3 if on_cpu else FLAGS.reps
  dtype = jnp.dtype(FLAGS.dtype)
  kernels = {"gpu": ["pallas_gpu"], "tpu": ["pallas_tpu"]}.get(platform,
                                                               ["pallas_gpu", "pallas_tpu"])
  rows = []
  for mode in FLAGS.modes:
    ratio = FLAGS.ratio if mode == "ratio" else None
    for b in map(int, FLAGS.batches):
      rng = np.random.default_rng([seed, MODES_INDEX[mode], b])
      inputs, scale, attempt = draw(rng, b, n, d, e, k_max, mode, ratio)
      hidden = jnp.asarray(inputs[0], dtype)
      image_embeds, text_embeds = jnp.asarray(inputs[1]), jnp.asarray(inputs[2])
      moved = (image_embeds.nbytes + text_embeds.nbytes + hidden.nbytes
               + b * (k_max + 1) * d * dtype.itemsize + b * 4)
      base = base_sync = reference = None
      for impl in ["xla"] + kernels:
        fn = jax.jit(functools.partial(trim_lib.trim, k_max=k_max, mode=mode, ratio=ratio,
                                       impl=impl, interpret=on_cpu and impl != "xla"))
        tokens, count = jax.block_until_ready(fn(hidden, image_embeds, text_embeds))
        reference = reference or (tokens, count)
        check = compare(tokens, count, *reference, dtype)
        call = lambda fn=fn: fn(hidden, image_embeds, text_embeds)
        seconds = _pipelined(call, reps)
        seconds_sync = _timed(call, reps)
        base, base_sync = base or seconds, base_sync or seconds_sync
        row = dict(
            part="a", batch=b, n=n, d=d, e=e, k_max=k_max, mode=mode, dtype=FLAGS.dtype,
            impl=impl + (" (interpret)" if on_cpu and impl != "xla" else ""),
            time_us=seconds * 1e6, time_us_sync=seconds_sync * 1e6, bytes=int(moved),
            gb_per_s=moved / seconds / 1e9, frac_h100_hbm=moved / seconds / H100_HBM_BYTES_PER_S,
            speedup_vs_xla=base / seconds, speedup_vs_xla_sync=base_sync / seconds_sync,
            mean_k=float(jnp.mean(count)) - 1, seed=seed, score_scale=scale, redraws=attempt,
            **check)
        rows.append(row)
        on_row(row)
  return rows


def kernel_verdict(rows: list[dict]) -> dict[str, Any]:
  """Correctness over every row and, per mode, the kernel's speedup at the largest batch (target 1.5x)."""
  kernel = [r for r in rows if r["impl"] != "xla"]
  failed = [f"{r['impl']} {r['mode']} B={r['batch']}" for r in kernel if r["check"] != "pass"]
  top = max((r["batch"] for r in rows), default=None)
  speed = {f"{r['impl']} {r['mode']}": r["speedup_vs_xla"] for r in kernel if r["batch"] == top}
  return dict(
      checks=len(kernel), failed=failed, correct=not failed, speed_batch=top, speedup=speed,
      target_speedup=TARGET_KERNEL_SPEEDUP,
      speed_met=bool(speed) and all(v >= TARGET_KERNEL_SPEEDUP for v in speed.values()))


# ----------------------------------------------------------------------------- (b) model

def _cpu_model_cfg() -> ml_collections.ConfigDict:
  from configs import models  # pylint: disable=g-import-not-at-top
  cfg = models.get("tiny")
  cfg.vision.image_size = 96  # 12 x 12 = 144 patches, so reduction is visible at CPU size
  return cfg


def _model_cfg(preset: str, on_cpu: bool, param_dtype: str | None = None) -> ml_collections.ConfigDict:
  from configs import models  # pylint: disable=g-import-not-at-top
  return _cpu_model_cfg() if on_cpu else models.get(preset, param_dtype=param_dtype)


def _trim_settings(num_patches: int) -> list[tuple[str, Any]]:
  ratio_k = trim_common.static_ratio_k(num_patches, FLAGS.ratio)
  return [
      ("off", None),
      ("iqr_example", ml_collections.ConfigDict(dict(
          enabled=True, mode="iqr_example", k_max=min(num_patches, max(1, num_patches // 3)),
          ratio=None, impl="auto", text_source="question"))),
      (f"ratio {FLAGS.ratio}", ml_collections.ConfigDict(dict(
          enabled=True, mode="ratio", k_max=ratio_k, ratio=FLAGS.ratio, impl="auto",
          text_source="question"))),
  ]


def _inputs(cfg, model, b: int, rng: np.random.Generator):
  vision = cfg.vision
  images = jnp.asarray(rng.normal(size=(b, vision.image_size, vision.image_size, 3)), jnp.float32)
  slots = model.num_image_tokens
  vocab = min(cfg.llm.vocab_size, cfg.image_token_id)
  text = rng.integers(3, vocab, size=(b, FLAGS.text_len))
  ids = np.concatenate([np.full((b, 1), cfg.llm.bos_token_id), np.full((b, slots), cfg.image_token_id),
                        text], axis=1).astype(np.int32)
  mask = np.ones_like(ids)
  loss_mask = np.zeros(ids.shape, np.float32)
  loss_mask[:, -8:] = 1.0  # the answer: the last 8 tokens
  text_ids = rng.integers(3, cfg.text.vocab_size, size=(b, 32)).astype(np.int32)
  return images, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask), jnp.asarray(text_ids)


def _speedup_row(base: dict | None, seconds: float, flops: float) -> dict[str, float]:
  """Speedup and FLOP ratio against the TRIM-off row `base` (None: this is that row)."""
  t0, f0 = (seconds, flops) if base is None else (base["time_ms"] / 1e3, base["flops"])
  return dict(time_ms=seconds * 1e3, flops=flops, speedup=t0 / seconds, flop_ratio=f0 / flops,
              frac_of_flop_ratio=(t0 / seconds) / (f0 / flops))


def model_rows(on_cpu: bool, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
  """Part (b): prefill and train step, TRIM off / iqr_example / ratio, each against TRIM off."""
  from medcg.model import vlm as vlm_lib  # pylint: disable=g-import-not-at-top
  reps = 5 if on_cpu else 10
  rows = []

  def add(row):
    rows.append(row)
    on_row(row)

  # Prefill: forward over the prompt, last-position logits. One model per TRIM setting (a 7B init
  # is the slow part), every batch size on it; "off" comes first, so each batch has its base.
  # bf16 weights: an f32 copy would add a weight conversion to every call that TRIM cannot shrink.
  cfg = _model_cfg(FLAGS.prefill_preset, on_cpu, FLAGS.prefill_param_dtype)
  num_patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  off = {}
  for name, trim_cfg in _trim_settings(num_patches):
    model = vlm_lib.VLM(cfg, rngs=nnx.Rngs(0), trim=trim_cfg)
    graphdef, state = nnx.split(model)
    del model

    @jax.jit
    def prefill(state, images, ids, mask, text_ids, graphdef=graphdef, trim_on=trim_cfg is not None):
      m = nnx.merge(graphdef, state)
      return m(images, ids, mask, text_ids if trim_on else None)[:, -1]

    for b in map(int, FLAGS.prefill_batches):
      images, ids, mask, _, text_ids = _inputs(cfg, nnx.merge(graphdef, state), b,
                                               np.random.default_rng(b))
      seconds = _timed(lambda: prefill(state, images, ids, mask, text_ids), reps)
      flops = vlm_lib.model_flops(cfg, ids.shape[1], trim=trim_cfg)
      row = dict(part="b", what="prefill", model="cpu-small" if on_cpu else FLAGS.prefill_preset,
                 batch=b, trim=name, seq_len=int(ids.shape[1]),
                 param_dtype=cfg.llm.param_dtype,
                 **_speedup_row(off.get(b), seconds, flops))
      off.setdefault(b, row)
      add(row)
    del state, prefill
  if not FLAGS.train_rows:
    return rows
  # Train step: AdamW on projector + LLM (LLaVA-1.5 stage 2), towers frozen.
  cfg = _model_cfg(FLAGS.train_preset, on_cpu)
  num_patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  b = 4 if on_cpu else FLAGS.train_batch
  trained = nnx.All(nnx.Param, lambda path, _: path[0] in ("projector", "llm"))
  base = None
  for name, trim_cfg in _trim_settings(num_patches):
    model = vlm_lib.VLM(cfg, rngs=nnx.Rngs(0), trim=trim_cfg)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-5), wrt=trained)
    images, ids, mask, loss_mask, text_ids = _inputs(cfg, model, b, np.random.default_rng(b))
    trim_on = trim_cfg is not None

    @nnx.jit
    def train_step(model, optimizer, images, ids, mask, loss_mask, text_ids, trim_on=trim_on):
      def loss_fn(m):
        logits = m(images, ids, mask, text_ids if trim_on else None)
        return vlm_lib.answer_loss(logits, ids, loss_mask)[0]
      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trained))(model)
      optimizer.update(model, grads)
      return loss

    seconds = _timed(lambda: train_step(model, optimizer, images, ids, mask, loss_mask, text_ids),
                     reps)
    flops = vlm_lib.model_flops(cfg, ids.shape[1], training=True, trim=trim_cfg)
    row = dict(part="b", what="train step", model="cpu-small" if on_cpu else FLAGS.train_preset,
               batch=b, trim=name, seq_len=int(ids.shape[1]), **_speedup_row(base, seconds, flops))
    base = base or row
    add(row)
    del model, optimizer
  return rows


def model_verdict(rows: list[dict]) -> dict[str, Any]:
  """Prefill with the ratio setting (~121 tokens): >= 2.5x faster and >= 90% of the FLOP ratio."""
  ratio = [r for r in rows if r["what"] == "prefill" and r["trim"].startswith("ratio")]
  per_batch = {str(r["batch"]): dict(speedup=r["speedup"], frac_of_flop_ratio=r["frac_of_flop_ratio"])
               for r in ratio}
  met = bool(ratio) and all(r["speedup"] >= TARGET_PREFILL_SPEEDUP
                            and r["frac_of_flop_ratio"] >= TARGET_FLOP_FRACTION for r in ratio)
  return dict(prefill_ratio=per_batch, target_speedup=TARGET_PREFILL_SPEEDUP,
              target_frac_of_flop_ratio=TARGET_FLOP_FRACTION, met=met)


# ----------------------------------------------------------------------------- report

def _markdown(rows: list[dict], columns: list[str]) -> str:
  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


KERNEL_COLUMNS = ["mode", "batch", "n", "d", "e", "k_max", "dtype", "impl", "time_us", "time_us_sync",
                  "gb_per_s", "frac_h100_hbm", "speedup_vs_xla", "speedup_vs_xla_sync", "mean_k",
                  "check", "same_count_as_xla", "max_abs_diff_vs_xla"]
MODEL_COLUMNS = ["what", "model", "batch", "trim", "seq_len", "time_ms", "speedup", "flop_ratio",
                 "frac_of_flop_ratio"]


def _verdict_lines(report: dict) -> list[str]:
  lines = []
  kv = report.get("kernel_verdict")
  if kv:
    lines.append(f"- Correctness: {kv['checks'] - len(kv['failed'])}/{kv['checks']} kernel rows match xla "
                 "(counts exactly, tokens to tests/test_trim.py's tolerance)"
                 + (f"; FAILED: {', '.join(kv['failed'])}" if kv["failed"] else "."))
    speed = ", ".join(f"{k} {v:.2f}x" for k, v in kv["speedup"].items())
    lines.append(f"- Kernel speed at B={kv['speed_batch']} (target >= {kv['target_speedup']}x): {speed}: "
                 + ("met." if kv["speed_met"] else "NOT met."))
  mv = report.get("model_verdict")
  if mv:
    pre = ", ".join(f"B={b} {v['speedup']:.2f}x ({100 * v['frac_of_flop_ratio']:.0f}% of the FLOP ratio)"
                    for b, v in mv["prefill_ratio"].items())
    lines.append(f"- Prefill with ratio TRIM (target >= {mv['target_speedup']}x and >= "
                 f"{100 * mv['target_frac_of_flop_ratio']:.0f}% of the FLOP ratio): {pre}: "
                 + ("met." if mv["met"] else "NOT met."))
  return lines


def _write(report: dict, stem: str) -> str:
  """Writes the report so far (JSON + markdown): a stage killed at its time limit keeps its rows."""
  md = [f"# TRIM benchmark ({report['platform']}, {report['device']})", "", report["note"], "",
        f"`{report['command']}`  ", f"jax {report['jax']}, seed {report['seed']}, {report['status']}", ""]
  if report["kernel"]:
    md += ["## (a) kernel vs xla", "", _markdown(report["kernel"], KERNEL_COLUMNS), "",
           "time_us: median per call of back-to-back calls (device time, launches overlapped); "
           "time_us_sync: waiting after every call (host round trip included). Inputs are redrawn "
           f"until no p is within {CHECK_MARGIN:g} (relative) of the threshold or the top-k cut.", ""]
  if report["model"]:
    md += ["## (b) model: TRIM off vs on", "", _markdown(report["model"], MODEL_COLUMNS), ""]
  md += _verdict_lines(report)
  text = "\n".join(md) + "\n"
  _atomic_write(stem + ".json", json.dumps(report, indent=2) + "\n")
  _atomic_write(stem + ".md", text)
  return text


def main(argv):
  del argv
  platform = jax.default_backend()
  on_cpu = platform not in ("gpu", "tpu")
  device = jax.devices()[0].device_kind
  seed = FLAGS.seed if FLAGS.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
  note = ("CPU run: small sizes, Pallas kernels in interpret mode (an emulation; its times are not "
          "kernel times), fraction of H100 HBM shown only to keep the columns"
          if on_cpu else f"{platform} run on {device}")
  print(note)
  print(f"seed {seed} (--seed={seed} repeats part (a)'s inputs)")
  command = "python -m experiments.bench_trim " + " ".join(sys.argv[1:])
  report = dict(command=command.strip(), platform=platform, device=device, jax=jax.__version__,
                note=note, seed=seed, status="running", kernel=[], model=[],
                kernel_part="running" if FLAGS.kernel_part else "skipped (--nokernel_part)",
                model_part="running" if FLAGS.model_part else "skipped (--nomodel_part)")
  os.makedirs(FLAGS.out, exist_ok=True)
  stem = os.path.join(FLAGS.out, f"bench_trim_{platform}")

  def on_row(part):
    def add(row):
      report[part].append(row)
      _write(report, stem)
    return add

  if FLAGS.kernel_part:
    kernel_rows(platform, on_cpu, seed, on_row("kernel"))
    report["kernel_part"] = "done"
    report["kernel_verdict"] = kernel_verdict(report["kernel"])
  if FLAGS.model_part:
    model_rows(on_cpu, on_row("model"))
    report["model_part"] = "done"
    report["model_verdict"] = model_verdict(report["model"])
  report["status"] = "done"
  print(_write(report, stem))
  print(f"wrote {stem}.json and {stem}.md")
  if not report.get("kernel_verdict", {}).get("correct", True):
    # After writing: the numbers are kept, and the exit status flags the mismatch.
    print("bench_trim: kernel and xla DIFFER: " + ", ".join(report["kernel_verdict"]["failed"]),
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
