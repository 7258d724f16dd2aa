"""Training speed of the real medcg train step: step time, tokens/s, peak memory and MFU, TRIM off / on.

    python -m experiments.bench_train                                   # GPU / TPU: bench-1b, bf16
    python -m experiments.bench_train --preset bench-1b --batch_sizes 8,16,32,auto --steps 10 \
        --trim off,iqr_example,ratio
    JAX_PLATFORMS=cpu python -m experiments.bench_train                 # CPU: the tiny preset, small batches
    JAX_PLATFORMS=cpu python -m experiments.bench_train --loop          # the train loop: synchronous vs async

What runs is what `medcg.train.trainer` runs: the VLM split into trainable / frozen / rest params (the vision
tower frozen by the regex `vision/.*`, and with TRIM the CLIP text tower `text/.*` too), `optimizer.
make_optimizer` (AdamW, global-norm clipping), `step.make_train_step`, `jax.jit` with `sharding.param_shardings`
on a data-parallel mesh and the state donated; bf16 compute with f32 master weights. Batches are random but
shaped like the pipeline's (DEVELOPING.md): `[bos] head <image>*S text... answer eos pad...`, S = 576 image
slots (k_max + 1 with TRIM) + --text_len 128 text positions (704 for bench-1b), rows right-padded to a random
real length, the loss on the 3 answer tokens.

TRIM modes: `off`; `iqr_example` (per-example IQR rule, k_max = half the patches: 288 of 576); `ratio`
(ratio = 121/576, TRIM's reported average of ~121 kept tokens, k_max = that count). TRIM batches also carry
`text_ids` (B, 77), random ids below the CLIP text vocabulary, which the step passes to the VLM.

Per (batch, TRIM mode): compile time, median step time of --steps timed steps after --warmup (each waited for
with block_until_ready), tokens/s (real tokens = attention_mask sum), effective tokens/s (what the decoder
attends to after TRIM masks its unused slots), positions/s, model FLOPs per step (`vlm.model_flops(training=
True)`: frozen towers forward only), MFU against `mfu.peak_flops()`, XLA's memory analysis of the compiled step
and the device's peak bytes in use. `auto` doubles the batch until XLA reports RESOURCE_EXHAUSTED and keeps the
largest that ran. On CPU the preset shrinks to `tiny` at small batches and the output says so.

Writes experiments/results/bench_train_<device>.json and .md atomically and prints a rich table.

`--loop` measures the train loop instead of the step: the real `medcg.train.trainer.train` on SynthMAT shards
(built in a temporary directory unless --shards), its log windows (--log_every steps each) alternating between the
loop as it was before it went asynchronous (the host waits for every step's loss, `float(loss)`, before it reads
and stages the next batch; the trainer's benchmark switch `_WAIT_EACH_STEP`) and the loop as it is (losses read
back at log steps, the next batch staged while the step runs). The switch flips in the trainer's evaluation hook
at every log step, so both loops run in one process, one compilation and the same machine load. Steady-state
step time is the trainer's own `train/step_time_s` (wall time between two synced log steps / steps) after two
warm-up windows; the report gives both loops side by side, their ratio (median over adjacent window pairs), and
whether the per-step losses of the --repeats runs (alternating which loop goes first) are bitwise equal.
Writes bench_train_loop_<device>.json and .md.

Imports: jax, flax, optax, numpy, rich, absl (medcg.kernels.trim), safetensors (medcg.model.hf) and
ml_collections (medcg.model.vlm, medcg.model.llm and configs/models.py import it at module level). A GPU image
without ml_collections needs its pure-Python wheel (`pip install --no-deps ml_collections`; absl-py and
PyYAML are its only dependencies). Nothing here imports grain, tensorflow or tensorflow-datasets, nor
medcg.train.trainer (which pulls in orbax and the data pipeline), except `--loop`, which runs the trainer and
imports it (and the shard converter, tensorflow-datasets) only then. XLA_PYTHON_CLIENT_MEM_FRACTION defaults to
0.95 here so that `auto` can use the whole GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform as platform_lib
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from rich.console import Console
from rich.table import Table

from configs import models
from medcg import errors
from medcg import fileio
from medcg.kernels import trim_common
from medcg.model import vlm as vlm_lib
from medcg.train import mfu as mfu_lib
from medcg.train import optimizer as opt_lib
from medcg.train import sharding as shd
from medcg.train import step as step_lib

TRIM_MODES = ("off", "iqr_example", "ratio")
TRIM_RATIO = 121 / 576          # TRIM's reported average: ~121 of LLaVA-1.5's 576 patches kept
HEAD_TOKENS = 4                 # template text between bos and the image ("USER: " and the like)
ANSWER_TOKENS = 3               # answer letter + eos, as the pipeline's loss_mask marks them
TEXT_TOWER_LEN = 77             # CLIP text context
TARGET_MFU = 0.45
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class OutOfMemory(RuntimeError):
  """XLA could not fit a configuration on the device (compile- or run-time RESOURCE_EXHAUSTED)."""


def is_oom(error: BaseException) -> bool:
  """Whether an exception is XLA's out-of-memory (the text is the only stable signal across jax versions)."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ------------------------------------------------------------------------------------------------- settings
def trim_config(mode: str, num_patches: int) -> ml_collections.ConfigDict | None:
  """The `trim` config section of a benchmark mode (None: TRIM off)."""
  if mode == "off":
    return None
  if mode == "iqr_example":
    return ml_collections.ConfigDict(dict(enabled=True, mode="iqr_example", k_max=max(1, num_patches // 2),
                                          ratio=None, impl="auto"))
  if mode == "ratio":
    k = trim_common.static_ratio_k(num_patches, TRIM_RATIO)
    return ml_collections.ConfigDict(dict(enabled=True, mode="ratio", k_max=k, ratio=TRIM_RATIO, impl="auto"))
  raise ValueError(f"--trim: unknown mode {mode!r}; choose from {', '.join(TRIM_MODES)}")


def model_config(preset: str, dtype: str, remat: str) -> ml_collections.ConfigDict:
  """The preset with bf16 compute / f32 params, its vocabulary covering the image placeholder id.

  The trainer sizes the vocabulary the same way (`trainer.model_config`): `step.token_losses` gathers the
  target logit of every position, and a placeholder id past the vocabulary would gather NaN.
  """
  cfg = models.get(preset, dtype=dtype, param_dtype="float32", remat=remat)
  if cfg.image_token_id >= cfg.llm.vocab_size:
    cfg.llm.vocab_size = -(-(cfg.image_token_id + 1) // 8) * 8
  return cfg


def optimizer_config() -> ml_collections.ConfigDict:
  """LLaVA-1.5-style fine-tuning optimizer: AdamW, constant lr, no weight decay, clip at 1.0."""
  return ml_collections.ConfigDict(dict(lr=2e-5, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                        b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, end_lr_frac=0.0))


def make_batch(cfg, slots: int, text_len: int, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A random host batch in the pipeline's layout (DEVELOPING.md "Batches"), plus CLIP `text_ids`.

  Each row: bos, HEAD_TOKENS template ids, `slots` image placeholders, then question text up to a random real
  length in [3/4, 1] of `text_len`, whose last ANSWER_TOKENS are the answer (loss_mask 1), then padding.
  """
  min_text = 1 + HEAD_TOKENS + ANSWER_TOKENS + 1
  if text_len < min_text:
    raise ValueError(f"--text_len={text_len}: needs at least {min_text} positions (bos, template, answer)")
  seq_len = slots + text_len
  vocab = min(cfg.llm.vocab_size, cfg.image_token_id)
  ids = rng.integers(3, vocab, (batch, seq_len)).astype(np.int32)
  ids[:, 0] = cfg.llm.bos_token_id
  start = 1 + HEAD_TOKENS
  ids[:, start:start + slots] = cfg.image_token_id
  lengths = rng.integers(max(min_text, (3 * text_len) // 4), text_len + 1, batch) + slots
  pos = np.arange(seq_len)[None, :]
  attention_mask = (pos < lengths[:, None]).astype(np.int32)
  loss_mask = ((pos >= (lengths - ANSWER_TOKENS)[:, None]) & (attention_mask == 1)).astype(np.float32)
  ids[np.arange(batch), lengths - 1] = cfg.llm.eos_token_id
  ids = np.where(attention_mask == 1, ids, cfg.llm.pad_token_id).astype(np.int32)
  size = cfg.vision.image_size
  out = dict(image=rng.standard_normal((batch, size, size, 3), dtype=np.float32), input_ids=ids,
             attention_mask=attention_mask, loss_mask=loss_mask,
             prompt_len=(lengths - ANSWER_TOKENS).astype(np.int32))
  if cfg.get("text") is not None:
    out["text_ids"] = rng.integers(3, cfg.text.vocab_size, (batch, TEXT_TOWER_LEN)).astype(np.int32)
  return out


# ------------------------------------------------------------------------------------------------- the step
class Setup:
  """One TRIM mode's model, optimizer and jitted init / step / kept-count functions on `mesh`."""

  def __init__(self, cfg, trim_cfg, mesh: jax.sharding.Mesh, total_steps: int):
    self.cfg, self.trim_cfg, self.mesh = cfg, trim_cfg, mesh
    make_model = lambda: vlm_lib.VLM(cfg, rngs=nnx.Rngs(0), trim=trim_cfg)
    abstract = nnx.eval_shape(make_model)
    self.freeze = ("vision/.*",) + (("text/.*",) if trim_cfg is not None else ())
    opt_lib.check_patterns_match(nnx.state(abstract, nnx.Param), self.freeze, "bench_train freeze")
    trainable = nnx.All(nnx.Param, nnx.Not(opt_lib.frozen_filter(self.freeze)))
    self.graphdef, abs_params, abs_frozen, abs_rest = nnx.split(abstract, trainable, nnx.Param, ...)
    self.slots = abstract.num_image_tokens
    self.trainable_params = step_lib.tree_size(abs_params)
    self.frozen_params = step_lib.tree_size(abs_frozen)
    self.tx, schedule = opt_lib.make_optimizer(optimizer_config(), abs_params, total_steps)
    self.params_sh = shd.param_shardings(abs_params, mesh)
    self.frozen_sh = shd.param_shardings(abs_frozen, mesh)
    self.rest_sh = shd.param_shardings(abs_rest, mesh)
    self.repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def init_all():
      _, p, f, r = nnx.split(make_model(), trainable, nnx.Param, ...)
      return p, f, r

    self.init = jax.jit(init_all, out_shardings=(self.params_sh, self.frozen_sh, self.rest_sh))
    # The trainer's step; it passes the batch's text_ids (TRIM) to the VLM (step.MODEL_INPUTS).
    self.step_fn = step_lib.make_train_step(self.graphdef, self.tx, schedule)
    graphdef = self.graphdef

    def kept_counts(params, frozen, rest, images, text_ids):
      # The model's own TRIM path: slots in use minus the mean-of-the-rest token.
      _, mask = nnx.merge(graphdef, params, frozen, rest).image_features(images, text_ids)
      return mask.sum(axis=-1) - 1

    self.kept_counts = jax.jit(kept_counts)

  def new_state(self):
    """Fresh sharded (state, frozen, rest): donation consumes the state, and an OOM may leave it deleted."""
    params, frozen, rest = self.init()
    opt_state = jax.jit(self.tx.init)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.repl)
    return {"params": params, "opt_state": opt_state, "step": step}, frozen, rest


def _memory_gib(compiled) -> float | None:
  """Arguments + temporaries + outputs - donated aliases, from XLA's memory analysis of the compiled step."""
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes) / 2**30
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None


def _device_peak_gib() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def measure(setup: Setup, batch_size: int, text_len: int, steps: int, warmup: int, seed: int,
            profile_dir: str | None = None) -> dict[str, Any]:
  """Compiles and times the train step at one batch size; raises OutOfMemory when it does not fit.

  With `profile_dir`, the timed steps also run under `jax.profiler.trace` (TensorBoard / Perfetto trace).
  """
  cfg, mesh = setup.cfg, setup.mesh
  host = make_batch(cfg, setup.slots, text_len, batch_size, np.random.default_rng(seed))
  keys = ("image", "input_ids", "attention_mask", "loss_mask") + (("text_ids",) if setup.trim_cfg else ())
  state = frozen = rest = None
  try:
    with shd.use_mesh(mesh):  # activation constraints are traced by lower() and kept_counts
      batch = shd.global_batch({k: host[k] for k in keys}, mesh)
      state, frozen, rest = setup.new_state()
      state_sh = jax.tree.map(lambda x: x.sharding, state)
      train_step = jax.jit(setup.step_fn, in_shardings=(state_sh, setup.frozen_sh, setup.rest_sh, None),
                           out_shardings=(state_sh, setup.repl), donate_argnums=(0,))
      t0 = time.perf_counter()
      compiled = train_step.lower(state, frozen, rest, batch).compile()
      compile_s = time.perf_counter() - t0
      kept = None
      if setup.trim_cfg is not None:
        counts = setup.kept_counts(state["params"], frozen, rest, batch["image"], batch["text_ids"])
        kept = np.asarray(jax.device_get(counts), np.float64)
      for _ in range(warmup):
        state, metrics = compiled(state, frozen, rest, batch)
        jax.block_until_ready((state, metrics))
      times = []
      with contextlib.ExitStack() as stack:
        if profile_dir:
          stack.enter_context(jax.profiler.trace(profile_dir))
        for _ in range(steps):
          t0 = time.perf_counter()
          state, metrics = compiled(state, frozen, rest, batch)
          jax.block_until_ready((state, metrics))
          times.append(time.perf_counter() - t0)
      loss = float(metrics["loss"])
  except Exception as e:  # noqa: BLE001 - only OOM is expected; anything else propagates
    if is_oom(e):
      raise OutOfMemory(f"batch {batch_size}: {str(e).splitlines()[0][:300]}") from e
    raise
  finally:
    del state, frozen, rest
    gc.collect()
  step_s = statistics.median(times)
  real_tokens = int(host["attention_mask"].sum())
  positions = batch_size * host["input_ids"].shape[1]
  unused_slots = 0 if kept is None else int(round(float(np.sum(setup.slots - (kept + 1)))))
  seq_len = int(host["input_ids"].shape[1])
  flops = vlm_lib.model_flops(cfg, seq_len, training=True, trim=setup.trim_cfg) * batch_size
  return dict(
      batch=batch_size, seq_len=seq_len, image_slots=setup.slots, text_len=text_len, status="ok",
      compile_s=compile_s, step_s=step_s, step_s_min=min(times), step_s_max=max(times), timed_steps=steps,
      real_tokens_per_step=real_tokens, tokens_per_s=real_tokens / step_s,
      effective_tokens_per_s=(real_tokens - unused_slots) / step_s, positions_per_s=positions / step_s,
      image_tokens_kept_mean=None if kept is None else float(kept.mean()),
      flops_per_step=flops, tflops_per_s=flops / step_s / 1e12,
      mfu=mfu_lib.mfu(flops, step_s, mesh.size, jax.devices()[0]),
      xla_memory_gib=_memory_gib(compiled), device_peak_gib=_device_peak_gib(), loss=loss, profile=profile_dir)


def search_largest_batch(try_batch: Callable[[int], dict], start: int, limit: int,
                         smaller_fits: bool = False) -> list[dict]:
  """Doubles the batch from `start` until `try_batch` raises OutOfMemory or `limit` is passed.

  Returns the rows tried in order (the OOM row records where it stopped); the last ok row is marked
  `auto_largest`. Unless a smaller batch already fit (`smaller_fits`), an OOM at `start` is an error:
  nothing fits.
  """
  rows, b = [], start
  while b <= limit:
    try:
      rows.append(try_batch(b))
    except OutOfMemory as e:
      if not smaller_fits and not any(r["status"] == "ok" for r in rows):
        raise OutOfMemory(f"auto batch: even batch {b} does not fit ({e})") from e
      rows.append({"batch": b, "status": "OOM", "error": str(e)})
      break
    b *= 2
  ok = [r for r in rows if r["status"] == "ok"]
  if ok:
    ok[-1]["auto_largest"] = True
  return rows


# ------------------------------------------------------------------------------------------------- report
COLUMNS = [("trim", "trim"), ("batch", "batch"), ("seq_len", "seq"), ("status", "status"),
           ("image_tokens_kept_mean", "kept img"), ("compile_s", "compile s"), ("step_s", "step ms"),
           ("tokens_per_s", "tokens/s"), ("effective_tokens_per_s", "eff tok/s"), ("positions_per_s", "pos/s"),
           ("tflops_per_s", "TFLOP/s"), ("mfu", "MFU"), ("xla_memory_gib", "XLA GiB"),
           ("device_peak_gib", "peak GiB"), ("loss", "loss")]


def _fmt(key: str, v) -> str:
  if v is None:
    return "n/a"
  if key == "step_s":
    return f"{1e3 * v:.1f}"
  if key == "mfu":
    return f"{100 * v:.1f}%"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
  return str(v)


def rich_table(rows: list[dict], title: str) -> Table:
  table = Table(title=title)
  for _, name in COLUMNS:
    table.add_column(name, justify="right")
  for r in rows:
    table.add_row(*[_fmt(k, r.get(k)) + ("*" if k == "batch" and r.get("auto_largest") else "")
                    for k, _ in COLUMNS])
  return table


def markdown(report: dict) -> str:
  head = "| " + " | ".join(name for _, name in COLUMNS) + " |"
  lines = [f"# medcg train step ({report['device']}, {report['backend']})", "",
           f"`{report['command']}`  ", f"jax {report['versions']['jax']}, flax {report['versions']['flax']}, "
           f"optax {report['versions']['optax']}, {report['time']}, {report['n_devices']} device(s), mesh "
           f"{report['mesh']}", ""]
  if report["note"]:
    lines += [f"**{report['note']}**", ""]
  counts = (f"{report['trainable_params']:,} trainable / {report['frozen_params']:,} frozen params (TRIM off)"
            if report["trainable_params"] is not None else "TRIM off not run")
  lines += [f"Preset `{report['preset']}`: {counts}, compute {report['dtype']}, params float32, remat `{report['remat']}`, "
            f"median of {report['steps']} steps after {report['warmup']} warm-up.", "",
            head, "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_fmt(k, r.get(k)) + ("*" if k == "batch" and r.get("auto_largest") else "")
                              for k, _ in COLUMNS) + " |" for r in report["rows"]]
  lines.append("")
  if any(r.get("auto_largest") for r in report["rows"]):
    lines += [f"`*`: the largest batch `auto` found, doubling until XLA reported RESOURCE_EXHAUSTED (an OOM "
              f"row) or the batch passed --max_batch {report['max_batch']}.", ""]
  lines += [
            "- tokens/s: real tokens (attention_mask sum) per second; eff tok/s: minus the TRIM slots masked out "
            "of attention; pos/s: every position the decoder computes (batch x seq).",
            "- MFU: `vlm.model_flops(training=True)` x batch (trained parts 3x forward; the frozen vision tower "
            "and TRIM's CLIP text tower forward only; causal attention halved) / (step time x peak bf16 FLOP/s "
            "x devices).",
            "- XLA GiB: the compiled step's arguments + temporaries + outputs - donated (per row). peak GiB: "
            "the device's `peak_bytes_in_use`, a high-water mark since the process started (jax cannot reset "
            "it), so it is exact only for the largest row run so far.",
            "- kept img: mean image tokens TRIM kept (the model's own slot mask). With random weights and "
            "images this is not TRIM's real count (~121 with CLIP weights); the compute does not depend on it: "
            "shapes are static, the decoder always runs k_max + 1 image slots.",
            f"- Train step: `{report['train_step']}` (jit, donated state, data-parallel mesh), AdamW + clip 1.0.",
            "",
            f"Target: MFU >= {100 * TARGET_MFU:.0f}% with TRIM off on an H100. {report['verdict']}", ""]
  return "\n".join(lines)


def verdict(rows: list[dict], device_kind: str, on_cpu: bool) -> str:
  off = [r for r in rows if r["trim"] == "off" and r["status"] == "ok" and r.get("mfu") is not None]
  if on_cpu or not off:
    return "Not measured here (no accelerator): the H100 numbers are still owed."
  best = max(off, key=lambda r: r["mfu"])
  met = best["mfu"] >= TARGET_MFU
  where = "" if "H100" in device_kind else f" (measured on {device_kind}, not an H100)"
  return (f"Best TRIM-off MFU {100 * best['mfu']:.1f}% at batch {best['batch']}{where}: "
          + ("target met." if met else "target NOT met."))


_atomic_write = fileio.atomic_write_text


def _write_report(console, out: str, name: str, report: dict, md: str) -> None:
  """<out>/<name>.json and .md, each written atomically."""
  os.makedirs(out, exist_ok=True)
  _atomic_write(os.path.join(out, name + ".json"), json.dumps(report, indent=2) + "\n")
  _atomic_write(os.path.join(out, name + ".md"), md)
  console.print(f"wrote {os.path.join(out, name)}.json and .md")


def _device_slug(backend: str, kind: str) -> str:
  if backend == "cpu":
    return "cpu"
  return f"{backend}_" + re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = errors.ArgumentParser(prog="python -m experiments.bench_train", description=__doc__.split("\n")[0])
  p.add_argument("--preset", default=None, help="model preset (default bench-1b; CPU: tiny)")
  p.add_argument("--batch_sizes", default=None,
                 help="comma list of global batch sizes and/or 'auto' (default 8,16,auto; CPU: one per device)")
  p.add_argument("--steps", type=int, default=None, help="timed steps per row, median reported (default 10; CPU 2)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--trim", default="off,iqr_example,ratio", help=f"comma list of {', '.join(TRIM_MODES)}")
  p.add_argument("--text_len", type=int, default=None, help="text positions besides the image slots (default 128)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
  p.add_argument("--remat", default="none", help="per-layer remat policy (none, full, dots_saveable, ...)")
  p.add_argument("--devices", type=int, default=0, help="use the first N devices (default all)")
  p.add_argument("--mesh", default="dp", choices=sorted(shd.MESH_PRESETS), help="mesh preset (sharding.py)")
  p.add_argument("--max_batch", type=int, default=None, help="cap for 'auto' (default 1024; CPU 4 x devices)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--profile_dir", default=None,
                 help="trace the timed steps of every row with jax.profiler into DIR/<trim>_b<batch>")
  p.add_argument("--out", default=RESULTS, help="directory for bench_train_<device>.json / .md")
  p.add_argument("--loop", action="store_true",
                 help="benchmark the trainer's loop, synchronous vs asynchronous (bench_train_loop_<device>.*)")
  p.add_argument("--log_every", type=int, default=10, help="--loop: train.log_every, the sync interval")
  p.add_argument("--windows", type=int, default=6,
                 help="--loop: timed log windows of each loop per run, alternating (after 2 warm-up ones)")
  p.add_argument("--repeats", type=int, default=2, help="--loop: trainer runs (alternating which loop goes first)")
  p.add_argument("--shards", default=None,
                 help="--loop: SynthMAT shards with subsets 05 and 28 (24 train samples each); default: built")
  args = p.parse_args(argv)
  if args.log_every < 1 or args.windows < 1 or args.repeats < 1:
    p.error("--log_every, --windows and --repeats must be >= 1")
  if args.steps is not None and args.steps < 1:
    p.error(f"--steps={args.steps}: need at least one timed step")
  if args.devices < 0 or args.devices > jax.device_count():
    p.error(f"--devices={args.devices}: have {jax.device_count()} devices")
  if args.warmup < 0:
    p.error(f"--warmup={args.warmup}: must be >= 0")
  return args


def _batch_plan(text: str, dp: int) -> tuple[list[int], bool]:
  sizes, auto = [], False
  for item in (s.strip() for s in text.split(",") if s.strip()):
    if item == "auto":
      auto = True
      continue
    try:
      b = int(item)
    except ValueError:
      raise ValueError(f"--batch_sizes: {item!r} is neither an integer nor 'auto'") from None
    if b < 1 or b % dp:
      raise ValueError(f"--batch_sizes: {b} is not a positive multiple of the data-parallel size {dp}")
    sizes.append(b)
  return sorted(set(sizes)), auto


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark; returns the report it wrote to <out>/bench_train_<device>.json."""
  # GPU: let XLA's allocator use nearly all memory (default 75%) so `auto` finds the real largest batch.
  # Read when the backend starts, so this works unless jax already touched a device in this process.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  args = parse_args(argv)
  if args.loop:
    return loop_main(args, argv)
  console = Console() if sys.stdout.isatty() else Console(width=170)  # logs: keep the table's columns whole
  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  device = jax.devices()[0]
  mesh = shd.make_mesh(args.mesh, devices=jax.devices()[:args.devices or jax.device_count()])
  dp = shd.data_parallel_size(mesh)
  preset = args.preset or ("tiny" if on_cpu else "bench-1b")
  steps = args.steps or (2 if on_cpu else 10)
  text_len = args.text_len or 128
  sizes, auto = _batch_plan(args.batch_sizes or (str(dp if dp > 1 else 2) if on_cpu else "8,16,auto"), dp)
  limit = args.max_batch or (4 * dp if on_cpu else 1024)
  modes = [m.strip() for m in args.trim.split(",") if m.strip()]
  for m in modes:
    trim_config(m, 1)  # validates the name before anything compiles
  cfg = model_config(preset, args.dtype, args.remat)
  num_patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  note = ""
  if on_cpu:
    note = (f"CPU run ({os.cpu_count()} cores, shared; {jax.device_count()} CPU devices): preset {preset} at "
            f"batch sizes {args.batch_sizes or ','.join(map(str, sizes))}. These numbers only show that the script works; the "
            "bench-1b numbers on an H100 are still owed.")
    console.print("NOTE: " + note)

  rows: list[dict] = []
  params_off = None
  for mode in modes:
    trim_cfg = trim_config(mode, num_patches)
    setup = Setup(cfg, trim_cfg, mesh, total_steps=steps + args.warmup)
    if trim_cfg is None:
      params_off = (setup.trainable_params, setup.frozen_params)
    extra = dict(trim=mode, k_max=None if trim_cfg is None else int(trim_cfg.k_max),
                 ratio=None if trim_cfg is None else trim_cfg.ratio)

    def try_batch(b, setup=setup, extra=extra):
      prof = args.profile_dir and os.path.join(args.profile_dir, f"{extra['trim']}_b{b}")
      row = {**extra, **measure(setup, b, text_len, steps, args.warmup, args.seed, prof)}
      console.print(f"  trim={row['trim']} batch={b}: {1e3 * row['step_s']:.1f} ms/step, "
                    f"{row['tokens_per_s']:,.0f} tokens/s, MFU {_fmt('mfu', row['mfu'])}")
      return row

    mode_rows = []
    for b in sizes:
      try:
        mode_rows.append(try_batch(b))
      except OutOfMemory as e:
        mode_rows.append({**extra, "batch": b, "status": "OOM", "error": str(e)})
        console.print(f"  trim={mode} batch={b}: out of memory")
        break
    fits = [r["batch"] for r in mode_rows if r["status"] == "ok"]
    if auto and len(fits) == len(mode_rows):
      start = 2 * fits[-1] if fits else dp
      mode_rows += [{**extra, **r} for r in search_largest_batch(try_batch, start, limit, bool(fits))]
    if auto and fits and not any(r.get("auto_largest") for r in mode_rows):
      next(r for r in mode_rows if r["batch"] == fits[-1])["auto_largest"] = True
    rows += mode_rows
    del setup
    gc.collect()

  command = "python -m experiments.bench_train " + " ".join(sys.argv[1:] if argv is None else argv)
  if on_cpu:
    command = "JAX_PLATFORMS=cpu " + command
  report = dict(
      command=command.strip(), backend=backend, device=device.device_kind, n_devices=jax.device_count(),
      mesh=dict(mesh.shape), peak_bf16_flops=mfu_lib.peak_flops(device),
      versions=dict(jax=jax.__version__, jaxlib=_jaxlib_version(),
                    flax=flax.__version__, optax=optax.__version__, python=platform_lib.python_version()),
      time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), note=note, preset=preset, dtype=args.dtype,
      param_dtype="float32", remat=args.remat, vocab_size=int(cfg.llm.vocab_size), steps=steps,
      warmup=args.warmup, text_len=text_len, num_patches=num_patches, trim_modes=modes,
      trainable_params=(params_off or (None, None))[0], frozen_params=(params_off or (None, None))[1],
      train_step="medcg.train.step.make_train_step",
      xla_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), max_batch=limit, target_mfu=TARGET_MFU, rows=rows)
  report["verdict"] = verdict(rows, device.device_kind, on_cpu)
  console.print(rich_table(rows, f"medcg train step: {preset} on {device.device_kind}"))
  console.print(report["verdict"])
  _write_report(console, args.out, "bench_train_" + _device_slug(backend, device.device_kind), report,
                markdown(report))
  return report


# ------------------------------------------------------------------------------------------------- loop
LOOPS = ("sync", "async")
LOOP_MIXTURE = [(5, "train", 24), (28, "train", 24)]
LOOP_SEQ_LEN = 256
LOOP_WARMUP_WINDOWS = 2   # log windows not timed: the first step (compilation) and steps 2..log_every


def build_shards(root: str) -> str:
  """Small SynthMAT shards (subsets 05 and 28, 32 px, ArrayRecord) for the loop benchmark; returns their dir."""
  from medcg.data import synth
  from medcg.data.__main__ import main as data_main
  synth.write_synthmat(os.path.join(root, "raw"), image_size=32, per_subset=24, test_per_subset=4, seed=0,
                       subsets=[5, 28], progress=False)
  out = os.path.join(root, "shards")
  data_main(["convert", "--src", os.path.join(root, "raw"), "--out", out, "--image_size", "32",
             "--format", "array_record", "--no_progress"])
  return out


def loop_config(shards: str, preset: str, dtype: str, batch: int, steps: int, log_every: int,
                mesh_devices: int) -> ml_collections.ConfigDict:
  """A trainer config: the preset at 32 px, seq 256, no evaluation, one checkpoint (the last step's)."""
  from medcg import configlib
  c = configlib.base_config()
  c.data.shards_dir = shards
  c.data.mixture = LOOP_MIXTURE
  c.data.eval_mixture = []
  c.data.seq_len = LOOP_SEQ_LEN
  c.data.batch_size = batch
  c.model = models.get(preset, dtype=dtype, param_dtype="float32")
  c.data.image_size = int(c.model.vision.image_size)
  c.train.update(dict(steps=steps, log_every=log_every, log_batches=False, lr=1e-3, warmup_steps=1))
  c.checkpoint.update(dict(every=0, every_minutes=0.0))
  c.mesh.num_devices = mesh_devices
  return c


def run_loop(config, workdir: str, first: str) -> dict[str, Any]:
  """One trainer run whose log windows alternate between the two loops, starting with `first`.

  The trainer's evaluation hook, called at every log step (eval.every = log_every, right after that step's
  metrics row), flips the benchmark switch, so window k+1 runs the other loop than window k. The two loops'
  windows thus interleave under the same machine load (a shared CPU drifts by far more than the difference).
  """
  from medcg.train import trainer
  k = config.train.log_every
  window_loop: dict[int, str] = {}  # log step -> the loop its window (the log_every steps before it) ran
  current = [first]

  def flip(model, step):
    del model
    current[0] = LOOPS[1 - LOOPS.index(current[0])]
    trainer._WAIT_EACH_STEP = current[0] == "sync"  # pylint: disable=protected-access
    window_loop[step + k] = current[0]
    return {}

  saved = trainer._WAIT_EACH_STEP  # pylint: disable=protected-access
  trainer._WAIT_EACH_STEP = first == "sync"  # pylint: disable=protected-access
  try:
    t0 = time.perf_counter()
    result = trainer.train(config, workdir, evaluate_fn=flip)
    wall = time.perf_counter() - t0
  finally:
    trainer._WAIT_EACH_STEP = saved  # pylint: disable=protected-access
  rows = [json.loads(line) for line in fileio.read_text(os.path.join(workdir, "metrics.jsonl")).splitlines()]
  # Windows after the warm-up ones: the first step (compilation) and steps 2..k.
  windows = [dict(step=r["step"], loop=window_loop[r["step"]], step_s=r["train/step_time_s"],
                  tokens_per_s=r["train/tokens_per_s"])
             for r in rows if "train/step_time_s" in r and r["step"] >= LOOP_WARMUP_WINDOWS * k]
  return dict(first=first, windows=windows, run_wall_s=wall, losses=result.losses)


def loop_summary(runs: list[dict]) -> dict[str, Any]:
  """Per loop: the median over its windows of every run; the sync / async ratio as the median over adjacent
  window pairs (same load) and as the ratio of the medians."""
  out = {}
  windows = [w for run in runs for w in run["windows"]]
  for loop in LOOPS:
    times = [w["step_s"] for w in windows if w["loop"] == loop]
    out[loop] = dict(step_s=statistics.median(times), step_s_min=min(times), step_s_max=max(times),
                     windows=len(times), steps=len(times) * runs[0]["log_every"],
                     tokens_per_s=statistics.median(w["tokens_per_s"] for w in windows if w["loop"] == loop))
  pairs = []
  for run in runs:
    ws = run["windows"]
    for a, b in zip(ws[0::2], ws[1::2]):
      by = {a["loop"]: a["step_s"], b["loop"]: b["step_s"]}
      pairs.append(by["sync"] / by["async"])
  out["ratio_sync_over_async"] = statistics.median(pairs)
  out["ratio_of_medians"] = out["sync"]["step_s"] / out["async"]["step_s"]
  out["pair_ratios"] = pairs
  out["losses_identical"] = all(run["losses"] == runs[0]["losses"] for run in runs)
  return out


def loop_markdown(report: dict) -> str:
  lines = [f"# medcg train loop: synchronous vs asynchronous ({report['device']}, {report['backend']})", "",
           f"`{report['command']}`  ",
           f"Machine: {report['machine']}. jax {report['versions']['jax']}, flax {report['versions']['flax']}, "
           f"{report['time']}, mesh {report['mesh']}.", ""]
  if report["note"]:
    lines += [f"**{report['note']}**", ""]
  lines += [f"The real `medcg.train.trainer.train` loop on SynthMAT shards: preset `{report['preset']}` "
            f"({report['dtype']} compute), seq {report['seq_len']}, train.log_every {report['log_every']}; per "
            f"batch size {report['repeats']} run(s) of {report['steps_per_run']} steps, each alternating the two "
            f"loops window by window after {LOOP_WARMUP_WINDOWS} warm-up windows (runs alternate which loop goes "
            "first).", "",
            "| batch | loop | step ms (median) | min | max | windows | steps | tokens/s | sync / async |",
            "|---|---|---|---|---|---|---|---|---|"]
  for res in report["results"]:
    s = res["summary"]
    for loop in LOOPS:
      ratio = (f"**{s['ratio_sync_over_async']:.3f}** (pairs; medians {s['ratio_of_medians']:.3f})"
               if loop == "async" else "")
      lines.append(f"| {res['batch']} | {loop} | {1e3 * s[loop]['step_s']:.1f} | {1e3 * s[loop]['step_s_min']:.1f} | "
                   f"{1e3 * s[loop]['step_s_max']:.1f} | {s[loop]['windows']} | {s[loop]['steps']} | "
                   f"{s[loop]['tokens_per_s']:,.0f} | {ratio} |")
  identical = all(res["summary"]["losses_identical"] for res in report["results"])
  lines += ["", f"Per-step losses bitwise identical across the runs of each batch size: {identical}.", "",
            "- sync: the loop before issue 12 item 5: after dispatching step N the host waits for its loss "
            "(`float(loss)`), then reads batch N+1 and stages it (`sharding.global_batch`), so host work and "
            "device work alternate. It is the trainer's own loop with `trainer._WAIT_EACH_STEP = True`.",
            "- async: the trainer's loop: step N is dispatched, batch N+1 read and staged while it runs; losses "
            "stay on the devices until the next log step, where one `jax.device_get` reads them all (NaN guard "
            "included).",
            "- The switch flips in the trainer's evaluation hook, called at every log step (eval.every = "
            "log_every; the hook evaluates nothing), so a window's steps all run one loop and adjacent windows "
            "see the same machine load. sync / async: the median over adjacent window pairs of the step-time "
            "ratio (> 1: the asynchronous loop is faster), and the ratio of the two medians.",
            "- step ms: the trainer's `train/step_time_s`, wall time between two synced log steps / steps in "
            "between (one step's time is not observable without a sync). tokens/s: real tokens "
            "(attention_mask) per second over the same windows.", ""]
  return "\n".join(lines)


def loop_main(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
  """Runs the loop benchmark; returns the report written to <out>/bench_train_loop_<device>.json."""
  import tempfile  # pylint: disable=g-import-not-at-top
  console = Console() if sys.stdout.isatty() else Console(width=170)
  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  device = jax.devices()[0]
  n_devices = args.devices or jax.device_count()
  preset = args.preset or ("tiny" if on_cpu else "bench-1b")
  sizes, _ = _batch_plan(args.batch_sizes or ("2,8" if on_cpu else "8"), n_devices)
  windows = 2 * args.windows  # per run: --windows of each loop
  steps = args.log_every * (LOOP_WARMUP_WINDOWS - 1 + windows)  # log steps 1, K, 2K, ..., steps
  note = ""
  if on_cpu:
    note = (f"CPU run ({os.cpu_count()} cores, shared with other work): the device computation and the host "
            "loop share the same cores, so overlap has little to gain here; on an accelerator the host's "
            "per-step fetch, staging and dispatch are what the asynchronous loop hides.")
  results: list[dict] = []
  with tempfile.TemporaryDirectory(prefix="bench_train_loop_") as tmp:
    shards = args.shards or build_shards(tmp)
    for batch in sizes:
      config = loop_config(shards, preset, args.dtype, batch, steps, args.log_every, n_devices)
      config.eval.every = args.log_every
      runs = []
      for r in range(args.repeats):
        first = LOOPS[r % 2]
        run = {"repeat": r, "log_every": args.log_every,
               **run_loop(config, os.path.join(tmp, f"b{batch}_run{r}"), first)}
        for loop in LOOPS:
          times = " ".join(f"{1e3 * w['step_s']:.0f}" for w in run["windows"] if w["loop"] == loop)
          console.print(f"  batch {batch} run {r} ({first} first) {loop}: windows {times} ms/step")
        runs.append(run)
      results.append(dict(batch=batch, summary=loop_summary(runs),
                          runs=[{k: v for k, v in run.items() if k != "losses"} for run in runs]))
  command = "python -m experiments.bench_train " + " ".join(sys.argv[1:] if argv is None else argv)
  if on_cpu:
    command = "JAX_PLATFORMS=cpu " + command
  machine = (f"{platform_lib.machine()} {platform_lib.processor() or ''}".strip()
             + f", {os.cpu_count()} CPU cores, {jax.device_count()} {device.device_kind} device(s)")
  report = dict(
      command=command.strip(), backend=backend, device=device.device_kind, n_devices=n_devices,
      machine=machine, mesh={"data": n_devices}, note=note,
      versions=dict(jax=jax.__version__, jaxlib=_jaxlib_version(), flax=flax.__version__,
                    optax=optax.__version__, python=platform_lib.python_version()),
      time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), preset=preset, dtype=args.dtype,
      seq_len=LOOP_SEQ_LEN, log_every=args.log_every, windows_per_loop=args.windows, repeats=args.repeats,
      steps_per_run=steps, train_loop="medcg.train.trainer.train", results=results)
  table = Table(title=f"medcg train loop: {preset} on {device.device_kind}")
  for name in ("batch", "loop", "step ms (median)", "min", "max", "windows", "sync / async"):
    table.add_column(name, justify="right")
  for res in results:
    s = res["summary"]
    for loop in LOOPS:
      table.add_row(str(res["batch"]), loop,
                    *(f"{1e3 * s[loop][k]:.1f}" for k in ("step_s", "step_s_min", "step_s_max")),
                    str(s[loop]["windows"]), f"{s['ratio_sync_over_async']:.3f}" if loop == "async" else "")
  console.print(table)
  console.print("losses bitwise identical across runs: "
                f"{all(res['summary']['losses_identical'] for res in results)}")
  _write_report(console, args.out, "bench_train_loop_" + _device_slug(backend, device.device_kind), report,
                loop_markdown(report))
  return report


def _jaxlib_version() -> str | None:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__
  except ImportError:
    return None


if __name__ == "__main__":
  main()
