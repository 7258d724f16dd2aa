"""Model speed: forward and train-step time, tokens/s, memory and MFU of the VLM.

    python -m experiments.bench_model                          # GPU / TPU: bench-1b, bf16, batches until OOM
    python -m experiments.bench_model --batches=8,16 --remat=full
    JAX_PLATFORMS=cpu python -m experiments.bench_model        # CPU: the tiny preset, small batches

Rows per batch size B (sequences of --seq_len tokens, 576 of them image placeholders for bench-1b):
forward = jitted `vlm(images, input_ids, attention_mask)` to float32 logits; train = one AdamW step on the
projector + LLM with the vision tower frozen (LLaVA-1.5 fine-tuning), loss on the answer tokens. tokens/s
counts every position of the sequence. MFU = `vlm.model_flops` x B / (time x peak bf16 FLOP/s of the device)
(`medcg.train.mfu`; none on CPU). Memory: the compiled step's arguments + temporaries + outputs (XLA's
memory analysis, any backend) and the device's peak bytes in use (GPU/TPU). On GPU / TPU the batches (the
default 4..64, or --batches) stop at the first that runs out of memory; that row is reported as OOM.

On CPU the numbers only show the script works: the preset shrinks to `tiny` and the output says so.
Writes experiments/results/bench_model_<platform>.json and .md atomically after every batch (`status` says
whether the sweep finished) and prints the table.
"""
from __future__ import annotations

import json
import os
import platform as platform_lib
import sys
import time
from typing import Any, Callable

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import models
from experiments import benchlib
from medcg import fileio
from medcg.model import vlm as vlm_lib
from medcg.train import mfu as mfu_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", None, "Model preset (default bench-1b; CPU: tiny).")
flags.DEFINE_list("batches", None,
                  "Batch sizes (default 4,8,16,32,64 on an accelerator, stopping at OOM; CPU 2,4).")
flags.DEFINE_integer("seq_len", None, "Tokens per sequence incl. image placeholders (default 1024; CPU 64).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (params stay float32).")
flags.DEFINE_string("remat", "none", "Per-layer remat policy for every tower (none, full, dots_saveable, ...).")
flags.DEFINE_integer("reps", 10, "Timed calls per measurement (median reported); CPU uses 3.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Directory for bench_model_<platform>.json / .md.")


_timed = benchlib.timed


_atomic_write = fileio.atomic_write_text


def _inputs(cfg, n_image: int, batch: int, seq_len: int, rng: np.random.Generator) -> dict[str, jax.Array]:
  """A batch in the pipeline's layout: [bos] 8 text <image>*n text..., the last quarter as the answer."""
  if seq_len < n_image + 16:
    raise ValueError(f"--seq_len={seq_len} leaves no room for text around {n_image} image tokens")
  size = cfg.vision.image_size
  ids = rng.integers(3, min(cfg.llm.vocab_size, 30000), (batch, seq_len)).astype(np.int32)
  ids[:, 0] = cfg.llm.bos_token_id
  ids[:, 9:9 + n_image] = cfg.image_token_id
  loss_mask = np.zeros((batch, seq_len), np.float32)
  loss_mask[:, -seq_len // 4:] = 1.0
  return dict(image=jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32),
              input_ids=jnp.asarray(ids), attention_mask=jnp.ones((batch, seq_len), jnp.int32),
              loss_mask=jnp.asarray(loss_mask))


def _trainable(path, _) -> bool:
  return path[0] in ("projector", "llm")  # LLaVA-1.5 fine-tuning: the vision tower stays frozen


def _memory(compiled) -> float | None:
  """GiB of arguments + temporaries + outputs (minus donated aliases) from XLA's memory analysis."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**30
  except Exception:  # some backends do not implement it
    return None


def _peak_device_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def bench(preset: str, batches: list[int], seq_len: int, reps: int, stop_at_oom: bool,
          on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
  cfg = models.get(preset, dtype=FLAGS.dtype, param_dtype="float32", remat=FLAGS.remat)
  n_image = vlm_lib.num_image_tokens(cfg)
  make = lambda: vlm_lib.VLM(cfg, rngs=nnx.Rngs(0))
  graphdef, _, _ = nnx.split(nnx.eval_shape(make), _trainable, ...)
  params, frozen = jax.jit(lambda: nnx.split(make(), _trainable, ...)[1:])()
  tx = optax.adamw(1e-5, weight_decay=0.0)
  opt_state = jax.jit(tx.init)(params)
  n_params = sum(x.size for x in jax.tree.leaves(params)) + sum(x.size for x in jax.tree.leaves(frozen))

  def forward(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    return model(batch["image"], batch["input_ids"], batch["attention_mask"])

  def train_step(params, opt_state, frozen, batch):
    def loss_fn(p):
      logits = forward(p, frozen, batch)
      return vlm_lib.answer_loss(logits, batch["input_ids"], batch["loss_mask"])[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  fwd_jit = jax.jit(forward)
  step_jit = jax.jit(train_step, donate_argnums=(0, 1))
  flops_fwd = vlm_lib.model_flops(cfg, seq_len)
  flops_train = vlm_lib.model_flops(cfg, seq_len, training=True)
  rows, rng = [], np.random.default_rng(0)
  for b in batches:
    row = dict(preset=preset, batch=b, seq_len=seq_len, image_tokens=n_image, dtype=FLAGS.dtype,
               remat=FLAGS.remat, params=n_params)
    try:
      batch = _inputs(cfg, n_image, b, seq_len, rng)
      fwd_compiled = fwd_jit.lower(params, frozen, batch).compile()
      step_compiled = step_jit.lower(params, opt_state, frozen, batch).compile()
      t_fwd = _timed(lambda: fwd_compiled(params, frozen, batch), reps)
      state = [params, opt_state]

      def one_step():
        state[0], state[1], loss = step_compiled(state[0], state[1], frozen, batch)
        return loss

      t_train = _timed(one_step, reps)
      params, opt_state = state
    except Exception as e:  # noqa: BLE001 - only OOM is expected; anything else is re-raised
      if not (stop_at_oom and _is_oom(e)):
        raise
      rows.append({**row, "status": "OOM"})
      on_row(rows[-1])
      print(f"batch {b}: out of memory, stopping", file=sys.stderr)
      break
    mfu_fwd = mfu_lib.mfu(flops_fwd * b, t_fwd, 1)
    mfu_train = mfu_lib.mfu(flops_train * b, t_train, 1)
    rows.append({**row, "status": "ok",
                 "forward_ms": 1e3 * t_fwd, "train_step_ms": 1e3 * t_train,
                 "forward_tokens_per_s": b * seq_len / t_fwd, "train_tokens_per_s": b * seq_len / t_train,
                 "forward_mfu": mfu_fwd, "train_mfu": mfu_train,
                 "forward_tflops_per_s": flops_fwd * b / t_fwd / 1e12,
                 "train_tflops_per_s": flops_train * b / t_train / 1e12,
                 "train_step_memory_gib": _memory(step_compiled), "forward_memory_gib": _memory(fwd_compiled),
                 "device_peak_gib": _peak_device_gib()})
    on_row(rows[-1])
  return rows


COLUMNS = ["preset", "batch", "seq_len", "status", "forward_ms", "train_step_ms", "forward_tokens_per_s",
           "train_tokens_per_s", "forward_mfu", "train_mfu", "train_tflops_per_s", "train_step_memory_gib",
           "device_peak_gib"]


def _fmt(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"
  return str(v)


def _markdown(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  preset = FLAGS.preset or ("tiny" if on_cpu else "bench-1b")
  seq_len = FLAGS.seq_len or (64 if on_cpu else 1024)
  batches = [int(b) for b in (FLAGS.batches or (["2", "4"] if on_cpu else ["4", "8", "16", "32", "64"]))]
  reps = 3 if on_cpu and FLAGS.reps == 10 else FLAGS.reps
  device = jax.devices()[0]
  note = ""
  if on_cpu:
    note = (f"CPU run ({os.cpu_count()} cores, shared): preset {preset} at seq_len {seq_len}. These numbers only "
            "show that the script works; GPU numbers for bench-1b need an accelerator.")
    print("NOTE: " + note)
  command = "python -m experiments.bench_model " + " ".join(sys.argv[1:])
  if on_cpu:
    command = "JAX_PLATFORMS=cpu " + command
  result = dict(
      command=command.strip(), backend=backend, device=device.device_kind, n_devices=jax.device_count(),
      peak_bf16_flops=mfu_lib.peak_flops(device), jax=jax.__version__, python=platform_lib.python_version(),
      note=note, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), status="running", rows=[])
  name = f"bench_model_{'cpu' if on_cpu else backend}"
  os.makedirs(FLAGS.out, exist_ok=True)

  def write():
    table = _markdown(result["rows"])
    _atomic_write(os.path.join(FLAGS.out, name + ".json"), json.dumps(result, indent=2) + "\n")
    md = (f"# VLM speed ({device.device_kind}, {backend})\n\n`{result['command']}`  \njax {jax.__version__}, "
          f"{result['time']}, {result['status']}\n\n" + (f"**{note}**\n\n" if note else "") + table + "\n\n"
          "MFU: model FLOPs (`vlm.model_flops`: frozen vision tower forward only, causal attention halved) / "
          "(time x peak bf16 FLOP/s). Memory: XLA memory analysis of the compiled step (args + temps + outputs - "
          "donated).\n")
    _atomic_write(os.path.join(FLAGS.out, name + ".md"), md)
    return table

  def on_row(row):
    # Written after every batch: a run stopped at a time limit keeps the rows it measured.
    result["rows"].append(row)
    write()

  # On an accelerator an OOM row ends the sweep (given batches too) instead of losing the rows before it.
  bench(preset, batches, seq_len, reps, stop_at_oom=not on_cpu, on_row=on_row)
  result["status"] = "done"
  print(write())


if __name__ == "__main__":
  app.run(main)
