"""Compile the trainer's real step (and the evaluation step) for a target, from abstract shapes only.

The program is the trainer's: `medcg.train.state.model_parts` + `train_setup` build the same jitted step with the
same shardings, lowered here with `jax.ShapeDtypeStruct` inputs on a mesh of the target's devices. Nothing is
allocated and no data is read. What comes back is what a researcher needs before renting the hardware: the
per-device memory by part against the device's usable memory (a fit verdict, or by how much it misses and
which knob helps), compile time, FLOPs from the compiler reconciled with `model_flops`, the collectives of the
optimised HLO and the custom calls (the TRIM kernels).

FLOPs and `lax.scan`: XLA's cost analysis counts a while-loop body once, and both towers run their layers
under `lax.scan`, so the raw figure is roughly (embeddings + head + one vision layer + one LLM layer). With
`flops=True` two small extra compiles at the target's mesh (the model cut to 1 and 2 layers per tower, scans
unrolled: `medcg.model.layers.unrolled_scans`) give each tower's per-layer FLOPs, and the full model's hardware
FLOPs are extrapolated linearly in depth, which is exact for stacked identical layers. Hardware FLOPs include
remat's recompute; `model_flops` (MFU's numerator) does not, so the two are reported apart with their ratio.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medcg import compile_cache
from medcg import configlib
from medcg.aot import targets as targets_lib
from medcg.errors import ConfigError, UserError
from medcg.train import sharding as shd
from medcg.train import state as state_lib

GiB = targets_lib.GiB
CLIP_TEXT_LEN = 77
EVAL_OPTIONS = 4          # options per multiple-choice question in the scoring step (Med-MAT has 2-4)
EVAL_OPTION_LEN = 16      # option token bucket (medcg.eval.runner pads option ids to power-of-two buckets)


class DoesNotFitError(UserError):
  """Raised by the command line only when asked (--fail_if_no_fit); the report itself says it."""


# ---------------------------------------------------------------------------------------------------------
# Config -> mesh, model, abstract batch.
# ---------------------------------------------------------------------------------------------------------
def target_mesh(config, devices) -> jax.sharding.Mesh:
  """config.mesh on the target's devices; a product that differs from the device count is a ConfigError."""
  axes = dict(config.mesh.to_dict())
  axes.pop("num_devices", None)
  try:
    return shd.make_mesh(axes, devices=devices)
  except ValueError as e:
    raise ConfigError(f"{e} (the target has {len(devices)} devices)") from None


def check_batch(config, mesh) -> None:
  dp = shd.data_parallel_size(mesh)
  b, acc = config.data.batch_size, config.train.accum_steps
  if b % dp:
    raise ConfigError(f"config.data.batch_size={b} is not divisible by the data-parallel size {dp} "
                      f"(config.mesh={dict(mesh.shape)})")
  if acc < 1 or (b // dp) % acc:
    raise ConfigError(f"config.train.accum_steps={acc} must divide the per-shard batch {b // dp}")


def model_config(config) -> ml_collections.ConfigDict:
  """The model the trainer would build (no tokenizer here: the preset's vocabulary and ids stand)."""
  from medcg.train import trainer
  return trainer.model_config(config, tokenizer=None)


def abstract_batch(config, model_cfg, mesh, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The pipeline's model inputs (DEVELOPING.md, batch contract) as sharded ShapeDtypeStructs."""
  b = batch_size or config.data.batch_size
  seq, size = config.data.seq_len, model_cfg.vision.image_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, ndim=len(shape)))
  batch = {"image": spec((b, size, size, 3), jnp.float32), "input_ids": spec((b, seq), jnp.int32),
           "attention_mask": spec((b, seq), jnp.int32), "loss_mask": spec((b, seq), jnp.float32)}
  if config.trim.enabled:
    batch["text_ids"] = spec((b, CLIP_TEXT_LEN), jnp.int32)
  return batch


set_remat = configlib.set_remat


def remat_of(config) -> str:
  if config.train.init_from_hf and config.model_overrides.get("remat"):
    return config.model_overrides.remat
  return config.model.llm.get("remat", "none") if config.model else "none"


# ---------------------------------------------------------------------------------------------------------
# Memory accounting.
# ---------------------------------------------------------------------------------------------------------
def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, for uneven splits)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(total)


def memory_stats(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")
  out = {k.removesuffix("_size_in_bytes"): int(getattr(m, k, 0) or 0) for k in keys}
  # Live at once: inputs, outputs not aliased to (donated) inputs, XLA's temporaries and the program.
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  return out


def cost_flops(compiled) -> float | None:
  """Per-device FLOPs of the compiled (partitioned) program; None where the backend has no cost model."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (GPU: not implemented)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


_OOM_NEEDED = (r"HLO temporaries \(([\d.]+)([KMGT])\)", r"required[^(]*\(([\d.]+)([KMGT])\)")


def parse_oom(message: str) -> dict[str, int] | None:
  """{'needed', 'available'} bytes from libtpu's CompileTimeHbmOom / RESOURCE_EXHAUSTED message."""
  available = targets_lib.parse_available_hbm(message)
  if available is None:
    return None
  needed = None
  for pattern in _OOM_NEEDED:
    m = re.search(pattern, message)
    if m:
      needed = int(float(m.group(1)) * targets_lib._UNITS[m.group(2)])  # pylint: disable=protected-access
      break
  return {"needed": needed, "available": available}


# ---------------------------------------------------------------------------------------------------------
# One compile.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepCompile:
  """What one lower + compile of a step produced (compiled is None when the compiler ran out of memory)."""
  name: str
  compile_s: float
  compiled: Any = None
  oom: dict[str, int] | None = None
  error: str = ""


def _compile(name: str, lower) -> StepCompile:
  t0 = time.perf_counter()
  try:
    lowered = lower()
    with compile_cache.not_written():  # a deviceless executable cannot be read back from the cache
      compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    oom = parse_oom(message)
    if oom is None and "RESOURCE_EXHAUSTED" not in message:
      raise
    return StepCompile(name, time.perf_counter() - t0, oom=oom or {}, error=message.splitlines()[0][:400])
  return StepCompile(name, time.perf_counter() - t0, compiled=compiled)


def _eval_fn(graphdef):
  from flax import nnx
  from medcg.model import vlm as vlm_lib

  def score(params, frozen, rest, batch, option_ids, option_mask):
    model = nnx.merge(graphdef, params, frozen, rest)
    return vlm_lib.score_options(model, batch["image"], batch["input_ids"], batch["attention_mask"], option_ids,
                                 option_mask, batch.get("text_ids"))
  return score


@dataclasses.dataclass
class Built:
  config: Any
  model_cfg: Any
  mesh: Any
  parts: state_lib.ModelParts
  setup: state_lib.TrainSetup
  batch: dict


def build(config, devices) -> Built:
  """Mesh, model parts, train setup and abstract batch of `config` on `devices`: the trainer's construction."""
  from medcg.train import trainer
  mesh = target_mesh(config, devices)
  check_batch(config, mesh)
  model_cfg = model_config(config)
  parts = state_lib.model_parts(config, model_cfg, mesh)
  setup = state_lib.train_setup(config, parts, mesh, max(trainer.total_train_steps(config), 1))
  return Built(config, model_cfg, mesh, parts, setup, abstract_batch(config, model_cfg, mesh))


def compile_train(built: Built) -> StepCompile:
  params_frozen_rest = built.parts.abstract_sharded
  with shd.use_mesh(built.mesh):
    return _compile("train", lambda: built.setup.step.lower(built.setup.abstract_state, *params_frozen_rest[1:],
                                                            built.batch))


def compile_eval(built: Built, batch_size: int) -> StepCompile:
  """The multiple-choice scoring step (medcg.eval's likelihood mode) at the eval batch size."""
  batch = abstract_batch(built.config, built.model_cfg, built.mesh, batch_size)
  batch.pop("loss_mask")
  sh = shd.batch_sharding(built.mesh, ndim=3)
  opt = jax.ShapeDtypeStruct((batch_size, EVAL_OPTIONS, EVAL_OPTION_LEN), jnp.int32, sharding=sh)
  fn = jax.jit(_eval_fn(built.parts.graphdef))
  with shd.use_mesh(built.mesh):
    return _compile("eval", lambda: fn.lower(*built.parts.abstract_sharded, batch, opt, opt))


# ---------------------------------------------------------------------------------------------------------
# FLOPs with the layer scans accounted for.
# ---------------------------------------------------------------------------------------------------------
def _vision_depth_key(model_cfg) -> str:
  from medcg.model import vlm as vlm_lib
  return "num_hidden_layers" if vlm_lib.family(model_cfg) == "llava" else "num_layers"  # CLIP vs Qwen ViT


def _with_depth(config, vision_layers: int, llm_layers: int):
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.vision[_vision_depth_key(c.model)] = vision_layers
  if c.model.vision.get("fullatt_block_indexes"):  # Qwen2.5-VL: keep the full-attention blocks that remain
    c.model.vision.fullatt_block_indexes = tuple(i for i in c.model.vision.fullatt_block_indexes if i < vision_layers)
  c.model.llm.num_layers = llm_layers
  c.train.accum_steps = 1  # the micro-batch scan would be counted once too; the FLOPs of a step do not change
  if c.model.get("text") is not None and c.trim.enabled:
    c.model.text.num_hidden_layers = 1
  return c


def _vision_layers_run(model_cfg) -> int:
  v = model_cfg.vision
  if "vision_select_layer" not in model_cfg:  # Qwen2-VL runs every block
    return v[_vision_depth_key(model_cfg)]
  sel = model_cfg.vision_select_layer
  return v.num_hidden_layers + 1 + sel if sel < 0 else sel


def hardware_flops(config, devices, full_flops: float | None) -> dict[str, Any] | None:
  """Per-step hardware FLOPs (all devices) extrapolated from unrolled 1- and 2-layer compiles; None without a
  cost model. Vision layers count as run (vision_select_layer drops the last), the text tower is ignored (TRIM
  scores once per example, a small share)."""
  if full_flops is None or not config.model or config.train.init_from_hf:
    return None
  from medcg.model import layers as L
  model_cfg = model_config(config)
  sel = model_cfg.get("vision_select_layer", -1)
  # The vision tower runs num_hidden_layers + 1 + sel layers: cut it to give 1 (and 2) of them.
  base_v = 1 - (1 + sel) if sel < 0 else 1
  probes = {}
  with L.unrolled_scans():
    for key, (v, l) in {"base": (base_v, 1), "vision": (base_v + 1, 1), "llm": (base_v, 2)}.items():
      built = build(_with_depth(config, v, l), devices)
      result = compile_train(built)
      f = cost_flops(result.compiled) if result.compiled is not None else None
      if f is None:
        return None
      probes[key] = f * len(devices)
  per_vision = probes["vision"] - probes["base"]
  per_llm = probes["llm"] - probes["base"]
  n_v, n_l = _vision_layers_run(model_cfg), model_cfg.llm.num_layers
  total = probes["base"] + (n_v - 1) * per_vision + (n_l - 1) * per_llm
  return {"hardware_flops": total, "per_vision_layer": per_vision, "per_llm_layer": per_llm,
          "one_layer_each": probes["base"], "scan_counted_once": full_flops * len(devices)}


# ---------------------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
  import importlib.metadata as md
  out = {"jax": jax.__version__}
  for pkg in ("jaxlib", "libtpu", "jax-cuda12-plugin", "flax"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


def knobs(config, mesh, peak: int, usable: int) -> list[str]:
  """What would bring a step that misses its memory under it, most effective first."""
  out = []
  remat = remat_of(config)
  if remat != "full":
    out.append(f"remat={remat} -> full (recompute each layer in the backward: --config.model.llm.remat=full "
               "and the vision tower's)")
  dp = shd.data_parallel_size(mesh)
  per_shard = config.data.batch_size // dp
  acc = config.train.accum_steps
  if per_shard // acc > 1:
    out.append(f"--config.train.accum_steps={acc * 2} (per-device micro-batch {per_shard // acc} -> "
               f"{per_shard // (acc * 2)}: activations halve)")
  if mesh.shape.get("data", 1) > 1:
    out.append("move the data axis into fsdp (--config.mesh.data=1 --config.mesh.fsdp=-1): params, grads and "
               "moments shard over every device")
  if mesh.shape.get("tensor", 1) == 1:
    out.append("--config.mesh.tensor=2 (tensor parallelism splits the widest activations and weights)")
  out.append(f"a target with more devices or memory (needs {peak / GiB:.1f} GiB of {usable / GiB:.1f} GiB per "
             "device here)")
  return out


def run(config, target_name: str, *, with_eval: bool = True, with_flops: bool = True,
        devices=None) -> dict[str, Any]:
  """Compile `config`'s train (and eval) step for `target_name`; the JSON-ready report."""
  from medcg.aot import hlo
  from medcg.model import vlm as vlm_lib
  target = targets_lib.get(target_name)
  devices = devices or targets_lib.devices(target)
  built = build(config, devices)
  mesh = built.mesh
  usable = targets_lib.usable_bytes(target)
  env = dict(config.get("hardware", {}).get("env", {}) or {})
  fraction = env.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or env.get("XLA_CLIENT_MEM_FRACTION")
  if target.platform == "gpu" and fraction:  # the recipe's launch environment raises JAX's preallocation
    usable = int(target.hbm_bytes * float(fraction))
  abstract_state = built.setup.abstract_state
  params, frozen, rest = built.parts.abstract_sharded
  parts_bytes = {
      "params": per_device_bytes(abstract_state["params"]),
      "optimizer": per_device_bytes(abstract_state["opt_state"]),
      "frozen_params": per_device_bytes(frozen),
      "other_state": per_device_bytes(rest),
      "batch": per_device_bytes(built.batch),
  }
  del params
  state_total = parts_bytes["params"] + parts_bytes["optimizer"] + parts_bytes["frozen_params"]
  if usable and state_total > usable:  # no compile can fix this: say so at once
    train = StepCompile("train", 0.0, oom={"needed": state_total, "available": usable},
                        error=f"the train state alone (params + optimizer + frozen) needs {state_total / GiB:.2f} GiB "
                              f"per device, {usable / GiB:.2f} GiB usable; not compiled")
  else:
    train = compile_train(built)
  report: dict[str, Any] = {
      "target": target.name, "platform": target.platform, "devices": len(devices),
      "device_kind": getattr(devices[0], "device_kind", ""), "versions": versions(),
      "mesh": dict(mesh.shape), "model": _model_name(config), "remat": remat_of(config),
      "global_batch": config.data.batch_size, "accum_steps": config.train.accum_steps,
      "per_device_batch": config.data.batch_size // shd.data_parallel_size(mesh),
      "seq_len": config.data.seq_len, "trim": bool(config.trim.enabled),
      "trim_impl": config.trim.get("impl", "") if config.trim.enabled else "",
      "hbm_bytes": target.hbm_bytes, "usable_bytes": usable, "state_bytes": parts_bytes, "env": env,
      "notes": _notes(target),
      "train": {"compile_s": round(train.compile_s, 2)},
  }
  if train.compiled is None:
    needed = (train.oom or {}).get("needed")
    available = (train.oom or {}).get("available") or usable
    report["train"].update(fits=False, error=train.error, needed_bytes=needed, available_bytes=available,
                           knobs=knobs(config, mesh, needed or 0, available))
  else:
    mem = memory_stats(train.compiled)
    peak = mem.get("peak", 0)
    fits = bool(usable) and peak <= usable if target.platform != "cpu" else None
    report["train"].update(memory=mem, peak_bytes=peak, fits=fits,
                           headroom_bytes=(usable - peak) if usable else None)
    if fits is False:
      report["train"]["knobs"] = knobs(config, mesh, peak, usable)
    report["train"]["hlo"] = hlo.audit(train.compiled.as_text())
    flops = cost_flops(train.compiled)
    model_flops = vlm_lib.model_flops(built.model_cfg, config.data.seq_len, training=True,
                                      trim=config.trim if config.trim.enabled else None) * config.data.batch_size
    report["flops"] = {"model_flops": model_flops,
                       "compiler_flops_scan_once": None if flops is None else flops * len(devices)}
    if with_flops and flops is not None:
      hw = hardware_flops(config, devices, flops)
      if hw:
        report["flops"].update(hw)
        report["flops"]["hardware_over_model"] = hw["hardware_flops"] / model_flops
  if with_eval and train.compiled is not None:
    ev = compile_eval(built, int(config.eval.get("batch_size", 0) or config.data.batch_size))
    entry: dict[str, Any] = {"compile_s": round(ev.compile_s, 2)}
    if ev.compiled is None:
      entry.update(fits=False, error=ev.error, **{f"{k}_bytes": v for k, v in (ev.oom or {}).items()})
    else:
      mem = memory_stats(ev.compiled)
      entry.update(memory=mem, peak_bytes=mem.get("peak", 0),
                   fits=(mem.get("peak", 0) <= usable) if usable else None,
                   hlo=hlo.audit(ev.compiled.as_text()))
    report["eval"] = entry
  return report


def _notes(target) -> list[str]:
  if target.platform != "gpu":
    return []
  return ["GPU: attention compiles as XLA's (cuDNN's fused attention needs cuDNN and a device to build its "
          "graph), which holds more temporaries than the cuDNN kernel 'auto' picks on the card: the peak is an "
          "upper bound there. XLA's GPU compiler has no cost model (no FLOPs) and never fails for memory itself: "
          "the verdict compares its memory analysis with the card x JAX's preallocated fraction. GEMMs compile "
          "as cuBLAS calls (Triton GEMM fusion off: without a device to autotune on, XLA's tiling fails on some "
          "dots)."]


def _model_name(config) -> str:
  if config.train.init_from_hf:
    return f"hf:{config.train.init_from_hf}"
  m = config.model.llm
  return f"{m.num_layers}L x {m.hidden_size} LLM"
