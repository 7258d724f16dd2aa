"""TRIM speed: (a) the Pallas kernels against the XLA reference, (b) what TRIM saves in the model.

    python -m experiments.bench_trim                          # full size on GPU / TPU
    python -m experiments.bench_trim --nomodel_part           # (a) only
    JAX_PLATFORMS=cpu python -m experiments.bench_trim        # CPU: small sizes, interpret mode

(a) `trim(...)` at B in --batches (default N=576, D=1024, E=768, mode iqr_batch, k_max 256) for
    impl="xla" and the backend's kernel ("pallas_gpu" on GPU, "pallas_tpu" on TPU). Columns: median
    time, the bytes TRIM must move at least (read image_embeds, text_embeds and hidden once, write
    tokens and count), the bandwidth that implies and its fraction of H100 HBM (3.35 TB/s), and the
    speedup over xla, plus a correctness check at that size (same K as xla, max |difference|).
    Target: the kernel >= 1.5x faster than xla at B=32.
(b) prefill latency of a random `llava-1.5-7b` at batch 1 and 8, and the train-step time of
    `bench-1b` (AdamW on projector + LLM, vision and text towers frozen), TRIM off vs on
    (iqr_example with k_max 192, and ratio 0.21 = 120 kept + 1 mean token), each against the
    FLOP-count ratio from `vlm.model_flops`. Targets: prefill >= 2.5x faster with ~121 tokens and
    within 90% of the FLOP ratio.

On CPU there is no Pallas backend: the kernels run in interpret mode (a jitted emulation, not a
kernel timing), sizes shrink (N=144, D=128, E=64; a 96-px `tiny` model) and the output says so.
Writes experiments/results/bench_trim_<platform>.json and .md atomically and prints the table.
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

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes for part (a).")
flags.DEFINE_integer("n", None, "Tokens per image (default 576; CPU 144).")
flags.DEFINE_integer("d", None, "Feature width of hidden (default 1024; CPU 128).")
flags.DEFINE_integer("e", None, "CLIP projection width (default 768; CPU 64).")
flags.DEFINE_integer("k_max", None, "TRIM capacity in part (a) (default 256; CPU N/2).")
flags.DEFINE_enum("mode", "iqr_batch", list(trim_lib.MODES), "TRIM mode for part (a).")
flags.DEFINE_float("ratio", 0.21, "Keep ratio for mode=ratio (also part (b)'s ratio rows).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of hidden in part (a).")
flags.DEFINE_integer("reps", 20, "Timed calls per row (median reported); CPU uses 3.")
flags.DEFINE_bool("model_part", True, "Run part (b) (prefill and train step with TRIM off / on).")
flags.DEFINE_string("prefill_preset", "llava-1.5-7b", "Model preset for the prefill rows.")
flags.DEFINE_list("prefill_batches", ["1", "8"], "Batch sizes for the prefill rows.")
flags.DEFINE_string("train_preset", "bench-1b", "Model preset for the train-step rows.")
flags.DEFINE_integer("train_batch", 8, "Batch size of the train-step rows.")
flags.DEFINE_integer("text_len", 64, "Text tokens around the image in part (b) prompts.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Directory for bench_trim_<platform>.json / .md.")

H100_HBM_BYTES_PER_S = 3.35e12


_timed = benchlib.timed


_atomic_write = fileio.atomic_write_text


# ----------------------------------------------------------------------------- (a) kernel

def kernel_rows(platform: str, on_cpu: bool) -> list[dict]:
  n = FLAGS.n or (144 if on_cpu else 576)
  d = FLAGS.d or (128 if on_cpu else 1024)
  e = FLAGS.e or (64 if on_cpu else 768)
  k_max = FLAGS.k_max if FLAGS.k_max is not None else (n // 2 if on_cpu else 256)
  reps = 3 if on_cpu else FLAGS.reps
  dtype = jnp.dtype(FLAGS.dtype)
  ratio = FLAGS.ratio if FLAGS.mode == "ratio" else None
  kernels = {"gpu": ["pallas_gpu"], "tpu": ["pallas_tpu"]}.get(platform,
                                                               ["pallas_gpu", "pallas_tpu"])
  rows = []
  for b in map(int, FLAGS.batches):
    rng = np.random.default_rng(b)
    hidden = jnp.asarray(rng.normal(size=(b, n, d)), dtype)
    image_embeds = jnp.asarray(rng.normal(size=(b, n, e)) * 0.3, jnp.float32)
    text_embeds = jnp.asarray(rng.normal(size=(b, e)), jnp.float32)
    moved = (image_embeds.nbytes + text_embeds.nbytes + hidden.nbytes
             + b * (k_max + 1) * d * dtype.itemsize + b * 4)
    base = reference = None
    for impl in ["xla"] + kernels:
      fn = jax.jit(functools.partial(trim_lib.trim, k_max=k_max, mode=FLAGS.mode, ratio=ratio,
                                     impl=impl, interpret=on_cpu and impl != "xla"))
      tokens, count = fn(hidden, image_embeds, text_embeds)
      reference = reference or (tokens, count)
      # Correctness at benchmark size: same K and tokens as xla (acceptance on the H100).
      same_k = bool(jnp.all(count == reference[1]))
      max_diff = float(jnp.max(jnp.abs(tokens.astype(jnp.float32)
                                       - reference[0].astype(jnp.float32))))
      seconds = _timed(lambda fn=fn: fn(hidden, image_embeds, text_embeds), reps)
      base = base or seconds
      rows.append(dict(
          part="a", batch=b, n=n, d=d, e=e, k_max=k_max, mode=FLAGS.mode, dtype=FLAGS.dtype,
          impl=impl + (" (interpret)" if on_cpu and impl != "xla" else ""),
          time_us=seconds * 1e6, bytes=int(moved), gb_per_s=moved / seconds / 1e9,
          frac_h100_hbm=moved / seconds / H100_HBM_BYTES_PER_S, speedup_vs_xla=base / seconds,
          mean_k=float(jnp.mean(count)) - 1, same_k_as_xla=same_k, max_abs_diff_vs_xla=max_diff))
  return rows


# ----------------------------------------------------------------------------- (b) model

def _cpu_model_cfg() -> ml_collections.ConfigDict:
  from configs import models  # pylint: disable=g-import-not-at-top
  cfg = models.get("tiny")
  cfg.vision.image_size = 96  # 12 x 12 = 144 patches, so reduction is visible at CPU size
  return cfg


def _model_cfg(preset: str, on_cpu: bool) -> ml_collections.ConfigDict:
  from configs import models  # pylint: disable=g-import-not-at-top
  return _cpu_model_cfg() if on_cpu else models.get(preset)


def _trim_settings(num_patches: int) -> list[tuple[str, Any]]:
  ratio_k = trim_lib.static_ratio_k(num_patches, FLAGS.ratio)
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


def model_rows(on_cpu: bool) -> list[dict]:
  from medcg.model import vlm as vlm_lib  # pylint: disable=g-import-not-at-top
  reps = 5 if on_cpu else 10
  rows = []
  # Prefill: forward over the prompt, last-position logits.
  cfg = _model_cfg(FLAGS.prefill_preset, on_cpu)
  num_patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  for b in map(int, FLAGS.prefill_batches):
    base = base_flops = None
    for name, trim_cfg in _trim_settings(num_patches):
      model = vlm_lib.VLM(cfg, rngs=nnx.Rngs(0), trim=trim_cfg)
      graphdef, state = nnx.split(model)
      images, ids, mask, _, text_ids = _inputs(cfg, model, b, np.random.default_rng(b))

      @jax.jit
      def prefill(state, images, ids, mask, text_ids, graphdef=graphdef, trim_on=trim_cfg is not None):
        m = nnx.merge(graphdef, state)
        return m(images, ids, mask, text_ids if trim_on else None)[:, -1]

      seconds = _timed(lambda: prefill(state, images, ids, mask, text_ids), reps)
      flops = vlm_lib.model_flops(cfg, ids.shape[1], trim=trim_cfg)
      base, base_flops = base or seconds, base_flops or flops
      rows.append(dict(part="b", what="prefill", model="cpu-small" if on_cpu else FLAGS.prefill_preset,
                       batch=b, trim=name, seq_len=int(ids.shape[1]), time_ms=seconds * 1e3,
                       speedup=base / seconds, flop_ratio=base_flops / flops,
                       frac_of_flop_ratio=(base / seconds) / (base_flops / flops)))
      del model, state
  # Train step: AdamW on projector + LLM (LLaVA-1.5 stage 2), towers frozen.
  cfg = _model_cfg(FLAGS.train_preset, on_cpu)
  num_patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  b = 4 if on_cpu else FLAGS.train_batch
  trained = nnx.All(nnx.Param, lambda path, _: path[0] in ("projector", "llm"))
  base = base_flops = None
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
    base, base_flops = base or seconds, base_flops or flops
    rows.append(dict(part="b", what="train step", model="cpu-small" if on_cpu else FLAGS.train_preset,
                     batch=b, trim=name, seq_len=int(ids.shape[1]), time_ms=seconds * 1e3,
                     speedup=base / seconds, flop_ratio=base_flops / flops,
                     frac_of_flop_ratio=(base / seconds) / (base_flops / flops)))
    del model, optimizer
  return rows


# ----------------------------------------------------------------------------- report

def _markdown(rows: list[dict], columns: list[str]) -> str:
  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


KERNEL_COLUMNS = ["batch", "n", "d", "e", "k_max", "mode", "dtype", "impl", "time_us", "bytes",
                  "gb_per_s", "frac_h100_hbm", "speedup_vs_xla", "mean_k", "same_k_as_xla",
                  "max_abs_diff_vs_xla"]
MODEL_COLUMNS = ["what", "model", "batch", "trim", "seq_len", "time_ms", "speedup", "flop_ratio",
                 "frac_of_flop_ratio"]


def main(argv):
  del argv
  platform = jax.default_backend()
  on_cpu = platform not in ("gpu", "tpu")
  device = jax.devices()[0].device_kind
  note = ("CPU run: small sizes, Pallas kernels in interpret mode (an emulation; its times are not "
          "kernel times), fraction of H100 HBM shown only to keep the columns"
          if on_cpu else f"{platform} run on {device}")
  print(note)
  kernel = kernel_rows(platform, on_cpu)
  model = model_rows(on_cpu) if FLAGS.model_part else []
  command = "python -m experiments.bench_trim " + " ".join(sys.argv[1:])
  report = dict(command=command.strip(), platform=platform, device=device, jax=jax.__version__,
                note=note, kernel=kernel, model=model,
                model_part="done" if model else "skipped (--nomodel_part)")
  md = [f"# TRIM benchmark ({platform}, {device})", "", note, "", f"`{report['command']}`", "",
        "## (a) kernel vs xla", "", _markdown(kernel, KERNEL_COLUMNS), ""]
  if model:
    md += ["## (b) model: TRIM off vs on", "", _markdown(model, MODEL_COLUMNS), ""]
  text = "\n".join(md)
  print(text)
  os.makedirs(FLAGS.out, exist_ok=True)
  stem = os.path.join(FLAGS.out, f"bench_trim_{platform}")
  _atomic_write(stem + ".json", json.dumps(report, indent=2) + "\n")
  _atomic_write(stem + ".md", text)
  print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
  app.run(main)
