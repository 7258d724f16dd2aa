"""TRIM's Mosaic kernels compiled by libtpu for real TPU targets, on this CPU host (no chips).

`jax.experimental.topologies.get_topology_desc` gives a TPU topology's devices compile-only; `jax.jit(f).lower(
ShapeDtypeStructs with NamedShardings on them).compile()` then runs the pod's own compiler: SPMD partitioning and
Mosaic's kernel compiler, with the target chip's VMEM and layout rules. `test_trim.py` only lowers the kernels
(Pallas -> Mosaic IR); this file checks that they compile, that the batch-sharded call runs per shard (trim wraps it
in shard_map: Mosaic refuses to be partitioned), that `impl="auto"` follows the mesh's TPU devices rather than the
CPU default backend, and that the kernels' cost estimates reach `compiled.cost_analysis()`.

The train step is the trainer's (`trainer.model_parts`, `medcg.train.state.train_setup`: `optimizer.make_optimizer`
+ `step.make_train_step` jitted with the state shardings) on an 8-chip v5e mesh. CI compiles bench-1b's widths with
each tower cut to 2 layers; the full bench-1b step is `@pytest.mark.slow`. Both take about 35 s to compile on two
idle cores (the towers run their layers under `lax.scan`, so depth hardly matters; the widths do).

Skipped, with the reason, when libtpu is not installed or gives no topology. JAX_PLATFORMS stays cpu (conftest):
libtpu is loaded compile-only; ALLOW_MULTIPLE_LIBTPU_LOAD keeps its process lock from failing a concurrent compile
(another pytest, medcg.compile) and TPU_WORKER_HOSTNAMES=localhost silences its worker lookup. Neither affects the
CPU backend the other tests in the process use.
"""
import functools
import importlib
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from medcg import compile_cache
from medcg.kernels import trim as trim_lib

B, N, D, E = 32, 576, 1024, 768  # LLaVA-1.5 at the released global batch: 576 patches, ViT-L width, CLIP space
K_MAX = 288                      # half the patches (experiments/bench_train.py)
TEXT_LEN = 77
_COST_FLOPS = re.compile(r'"cost_estimate"\s*:\s*\{\s*"flops"\s*:\s*"?(\d+)')


@pytest.fixture(autouse=True)
def _no_cache_entries():
  """TPU executables compiled here cannot be loaded back on this host: writing them only makes later reads warn."""
  with compile_cache.not_written():
    yield


@functools.cache
def _topology_devices(name: str, chip_config: str = ""):
  """The topology's devices, or a pytest skip saying why there are none."""
  try:
    importlib.import_module("libtpu")
  except ImportError as e:
    pytest.skip(f"libtpu is not installed ({e}); pip install 'jax[tpu]' to compile for TPU targets")
  from jax.experimental import topologies
  # Before libtpu first loads (conftest sets them too; medcg.aot.targets.devices does the same).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  kw = {"chip_config_name": chip_config} if chip_config else {}
  try:
    return tuple(topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's errors have no common type)
    pytest.skip(f"libtpu gives no {name} topology: {str(e).splitlines()[0][:200]}")


def _kernels(hlo: str) -> list[str]:
  return [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]


def _kernel_flops(hlo: str) -> list[int]:
  """The cost estimate (FLOPs) each Mosaic call carries in its backend config."""
  out = []
  for line in _kernels(hlo):
    m = _COST_FLOPS.search(line)
    out.append(int(m.group(1)) if m else 0)
  return out


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


# ---------------------------------------------------------------------------------------------------------------
# The kernel alone, batch-sharded over each topology's chips.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topology,chip_config,kind", [
    pytest.param("v5e:2x2", "", "TPU v5 lite", id="v5e"),
    pytest.param("v5p:2x2x1", "megacore", "TPU v5", id="v5p"),
    pytest.param("v6e:2x2", "", "TPU v6 lite", id="v6e"),
])
@pytest.mark.parametrize("mode,ratio", [("iqr_batch", None), ("iqr_example", None)], ids=["iqr_batch", "iqr_example"])
def test_mosaic_trim_compiles_for_tpu(topology, chip_config, kind, mode, ratio):
  devices = _topology_devices(topology, chip_config)
  assert devices[0].platform == "tpu" and devices[0].device_kind == kind, devices[0]
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  sh = NamedSharding(mesh, P("data"))
  args = (jax.ShapeDtypeStruct((B, N, D), jnp.bfloat16, sharding=sh),
          jax.ShapeDtypeStruct((B, N, E), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((B, E), jnp.float32, sharding=sh))
  # impl="auto" on a CPU host: the mesh's TPU devices must choose the Mosaic kernel.
  fn = jax.jit(functools.partial(trim_lib.trim, k_max=K_MAX, mode=mode, ratio=ratio, impl="auto"))
  with jax.set_mesh(mesh):
    assert trim_lib.resolve_impl("auto") == "pallas_tpu"
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
  print(f"{topology} {mode}: compiled in {time.perf_counter() - t0:.1f}s")
  hlo = compiled.as_text()
  # iqr_batch: probs kernel + select kernel (the batch quantile between them); otherwise one fused kernel.
  assert len(_kernels(hlo)) == (2 if mode == "iqr_batch" else 1), _kernels(hlo)
  # Per shard: nothing gathers the batch (XLA would, to run an unpartitioned custom call on every example).
  assert "all-gather" not in hlo
  assert re.search(rf"bf16\[{B // len(devices)},{K_MAX + 1},{D}\]", hlo), "the kernel's output is not per shard"
  # The estimates reach the compiler's per-device cost analysis (a Pallas call counts 0 FLOPs without one).
  kernel_flops = _kernel_flops(hlo)
  assert all(f > 0 for f in kernel_flops), kernel_flops
  local = B // len(devices)
  assert _flops(compiled) >= sum(kernel_flops) >= local * 2 * (K_MAX + 1) * N * D  # at least the compaction matmul


def test_mosaic_trim_gradient_compiles_per_shard():
  # The custom_vjp's backward (the XLA reference's transpose) runs inside the same shard_map as the kernel.
  devices = _topology_devices("v5e:2x4")
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  args = (jax.ShapeDtypeStruct((B, N, D), jnp.bfloat16, sharding=sh),
          jax.ShapeDtypeStruct((B, N, E), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((B, E), jnp.float32, sharding=sh))

  def loss(hidden, image_embeds, text_embeds):
    tokens, _ = trim_lib.trim(hidden, image_embeds, text_embeds, k_max=K_MAX, mode="iqr_batch", impl="pallas_tpu")
    return jnp.sum(tokens.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
  hlo = compiled.as_text()
  assert len(_kernels(hlo)) == 2 and "all-gather" not in hlo, _kernels(hlo)
  assert re.search(rf"bf16\[{B // 8},{N},{D}\]", hlo)  # the per-device program holds its shard of d_hidden


# ---------------------------------------------------------------------------------------------------------------
# Inside the trainer's sharded train step on a v5e-8.
# ---------------------------------------------------------------------------------------------------------------
def _bench_config(layers: int | None, *, freeze_vision: bool):
  """bench-1b with TRIM on (iqr_batch, the released rule; k_max 288; impl auto), global batch 32 on the mesh;
  `layers` cuts every tower to that depth (None: full size)."""
  from configs import models
  from medcg import configlib
  c = configlib.base_config()
  c.model = models.get("bench-1b")
  if layers is not None:
    c.model.vision.num_hidden_layers = layers
    c.model.text.num_hidden_layers = layers
    c.model.llm.num_layers = layers
  c.trim.update(dict(enabled=True, mode="iqr_batch", k_max=K_MAX, impl="auto"))
  c.data.batch_size = B
  c.data.seq_len = K_MAX + 1 + 128
  c.train.steps = 10
  # The text tower only scores (stop_gradient); a trainable vision tower keeps TRIM's backward in the step.
  c.train.freeze = ("vision/.*", "text/.*") if freeze_vision else ("text/.*",)
  return c


def _abstract_batch(config, model_cfg, mesh) -> dict:
  from medcg.train import sharding as shd
  b, seq, size = config.data.batch_size, config.data.seq_len, model_cfg.vision.image_size

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, ndim=len(shape)))

  return {"image": spec((b, size, size, 3), jnp.float32), "input_ids": spec((b, seq), jnp.int32),
          "attention_mask": spec((b, seq), jnp.int32), "loss_mask": spec((b, seq), jnp.float32),
          "text_ids": spec((b, TEXT_LEN), jnp.int32)}


def _compile_train_step(config):
  """The trainer's jitted step lowered from abstract shapes on a v5e-8 (data 2 x fsdp 4) and compiled."""
  from medcg.train import sharding as shd
  from medcg.train import state as state_lib
  from medcg.train import trainer
  devices = _topology_devices("v5e:2x4")
  mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, devices=devices)
  model_cfg = trainer.model_config(config)
  parts = trainer.model_parts(config, model_cfg, mesh)
  setup = state_lib.train_setup(config, parts, mesh, trainer.total_train_steps(config))
  _, frozen, rest = parts.abstract_sharded
  batch = _abstract_batch(config, model_cfg, mesh)
  t0 = time.perf_counter()
  with shd.use_mesh(mesh):
    lowered = setup.step.lower(setup.abstract_state, frozen, rest, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  print(f"train step: lowered in {t1 - t0:.1f}s, compiled in {t2 - t1:.1f}s")
  return compiled


def _check_train_step(compiled):
  hlo = compiled.as_text()
  kernels = _kernels(hlo)
  assert len(kernels) == 2, kernels  # iqr_batch: probs + select, once each (forward only; backward is XLA)
  per_shard = B // 8
  assert any(re.search(rf"bf16\[{per_shard},{K_MAX + 1},{D}\]", k) for k in kernels), kernels
  kernel_flops = _kernel_flops(hlo)
  assert all(f > 0 for f in kernel_flops), kernel_flops
  assert _flops(compiled) > sum(kernel_flops) > 0
  assert compiled.memory_analysis() is not None


def test_trim_train_step_compiles_on_v5e_8():
  # The vision tower frozen as in bench_train / LLaVA fine-tuning (its backward would double the compile time);
  # TRIM's backward under shard_map is compiled by test_mosaic_trim_gradient_compiles_per_shard.
  _check_train_step(_compile_train_step(_bench_config(2, freeze_vision=True)))


@pytest.mark.slow
def test_full_bench_1b_trim_train_step_compiles_on_v5e_8():
  _check_train_step(_compile_train_step(_bench_config(None, freeze_vision=True)))


def test_auto_takes_the_kernel_on_a_tpu_topology_mesh():
  devices = _topology_devices("v5e:2x4")
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
  with jax.set_mesh(mesh):
    assert trim_lib.target_platform() == "tpu"
    assert trim_lib.resolve_impl("auto") == "pallas_tpu"
  cpu = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=np.array(jax.devices()))
  with jax.set_mesh(cpu):
    assert trim_lib.resolve_impl("auto") == "xla"
