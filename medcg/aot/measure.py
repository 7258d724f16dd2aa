"""`medcg.compile --measure`: on the target itself, run the compiled step once and read the device's peak memory,
so the compiler's prediction is checked against the allocator (experiments/gpu_check.sh runs it on an H200)."""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medcg.aot import step_compile
from medcg.aot import targets as targets_lib
from medcg.train import sharding as shd


def local_devices(target: targets_lib.Target) -> list:
  """This host's devices, which must be the target's kind and count."""
  devs = jax.devices()
  platform = {"gpu": ("gpu", "cuda", "rocm")}.get(target.platform, (target.platform,))
  if devs[0].platform not in platform or len(devs) < target.num_devices:
    raise targets_lib.TargetError(
        f"--measure runs on the target itself: --target={target.name} needs {target.num_devices} "
        f"{target.platform} devices, this host has {len(devs)} {devs[0].platform} ({devs[0].device_kind})")
  return devs[:target.num_devices]


def _random_batch(abstract: dict, model_cfg, n_image_tokens: int, rng: np.random.Generator) -> dict:
  out = {}
  for k, x in abstract.items():
    if k == "image":
      v = rng.standard_normal(x.shape, dtype=np.float32)
    elif k == "loss_mask":
      v = np.zeros(x.shape, np.float32)
      v[:, -4:-1] = 1.0
    elif k == "attention_mask":
      v = np.ones(x.shape, np.int32)
    elif k == "text_ids":
      v = rng.integers(3, 1000, x.shape).astype(np.int32)
    else:
      ids = rng.integers(3, min(model_cfg.llm.vocab_size, model_cfg.image_token_id), x.shape).astype(np.int32)
      ids[:, 0] = model_cfg.llm.bos_token_id
      ids[:, 1:1 + n_image_tokens] = model_cfg.image_token_id
      v = ids
    out[k] = jax.device_put(v, x.sharding)
  return out


def measure(config, devices, report: dict[str, Any], steps: int = 3) -> dict[str, Any]:
  """Init the real state, run `steps` train steps; the device's peak bytes in use against the prediction."""
  from medcg.train import trainer
  built = step_compile.build(config, devices)
  with shd.use_mesh(built.mesh):
    params, frozen, rest = trainer.initial_params(config, built.parts, built.mesh, with_init_from=False)
    opt_state = jax.jit(built.setup.tx.init, out_shardings=built.setup.state_shardings["opt_state"])(params)
    state = {"params": params, "opt_state": opt_state,
             "step": jax.device_put(jnp.zeros((), jnp.int32), built.setup.replicated)}
    from medcg.model import vlm as vlm_lib
    n_image = vlm_lib.num_image_tokens(built.model_cfg, config.trim if config.trim.enabled else None)
    batch = _random_batch(built.batch, built.model_cfg, n_image, np.random.default_rng(0))
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = built.setup.step(state, frozen, rest, batch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t0)
  stats = devices[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  predicted = report.get("train", {}).get("peak_bytes")
  return {"peak_bytes_in_use": peak, "predicted_peak_bytes": predicted,
          "measured_over_predicted": (peak / predicted) if peak and predicted else None,
          "step_s": float(np.median(times[1:] if len(times) > 1 else times)),
          "loss": float(metrics["loss"]), "bytes_limit": stats.get("bytes_limit")}
