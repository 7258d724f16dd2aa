"""Deviceless GPU compilation (medcg.aot.gpu_target).

The compile tests need the CUDA plugin and ptxas (about 575 MB, which CI does not install) and skip without
them; the error and configuration tests run everywhere.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import pytest

from medcg import errors
from medcg.aot import gpu_target

_HAVE_BACKEND = gpu_target._plugin() is not None and gpu_target.ptxas_path() is not None
needs_cuda_plugin = pytest.mark.skipif(
    not _HAVE_BACKEND,
    reason="the CUDA plugin or ptxas is not installed (about 575 MB, not in CI): "
           + gpu_target.INSTALL.format(v=jax.__version__))

MiB = 2 ** 20


def _mesh(devices):
  return jax.make_mesh((len(devices),), ("data",), (jax.sharding.AxisType.Auto,), devices=devices)


def _compile_matmul(devices):
  """tanh(x @ w).sum() with x (8192, 4096) split over the devices and w (4096, 4096) replicated, bf16."""
  mesh = _mesh(devices)
  x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P("data", None)))
  w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  return jax.jit(lambda x, w: jnp.tanh(x @ w).astype(jnp.float32).sum()).lower(x, w).compile()


@needs_cuda_plugin
def test_sharded_matmul_compiles_for_8_h100():
  devices = gpu_target.gpu_devices("h100", 8)
  assert len(devices) == 8 and len({d.id for d in devices}) == 8
  assert all("H100" in d.device_kind for d in devices)
  assert gpu_target.gpu_devices("h100", 8) == devices  # the same devices each call
  compiled = _compile_matmul(devices)
  m = compiled.memory_analysis()
  # Per device: a 1024-row shard of x (8 MiB) and all of w (32 MiB); a f32 scalar out.
  assert m.argument_size_in_bytes == (1024 * 4096 + 4096 * 4096) * 2
  assert m.output_size_in_bytes == 4
  assert m.alias_size_in_bytes == 0
  assert 0 < m.temp_size_in_bytes < 64 * MiB  # at most the (1024, 4096) product, in f32
  peak = gpu_target.peak_bytes(compiled)
  assert 40 * MiB < peak < gpu_target.usable_bytes("h100")
  hlo = compiled.as_text()
  assert "num_partitions=8" in hlo and "all-reduce" in hlo  # the partial sums meet across devices


@needs_cuda_plugin
def test_one_h200():
  (device,) = gpu_target.gpu_devices("h200", 1)
  assert "H200" in device.device_kind
  m = _compile_matmul([device]).memory_analysis()
  assert m.argument_size_in_bytes == (8192 * 4096 + 4096 * 4096) * 2


def test_check_available_names_the_missing_plugin(monkeypatch):
  monkeypatch.setattr(gpu_target, "_plugin", lambda: None)
  with pytest.raises(errors.UserError) as e:
    gpu_target.check_available()
  msg = errors.one_line(e.value)
  assert "\n" not in msg
  v = jax.__version__
  assert f"jax-cuda12-plugin=={v}" in msg and f"jax-cuda12-pjrt=={v}" in msg
  assert f'pip install "jax-cuda12-plugin=={v}" nvidia-cuda-nvcc-cu12' in msg
  assert errors.as_user_error(e.value) is e.value  # command lines print it as one line


@pytest.mark.skipif(gpu_target._plugin() is not None, reason="the CUDA plugin is installed here")
def test_check_available_without_the_plugin_installed():
  with pytest.raises(errors.UserError, match="jax-cuda12-plugin"):
    gpu_target.check_available()
  with pytest.raises(errors.UserError, match="pip install"):
    gpu_target.gpu_devices("h100", 8)


def test_check_available_names_missing_ptxas_and_a_mismatched_plugin(monkeypatch):
  monkeypatch.setattr(gpu_target, "_plugin", lambda: ("jax-cuda12-plugin", "0.0.1", "jax-cuda12-pjrt"))
  monkeypatch.setattr(gpu_target, "ptxas_path", lambda: None)
  with pytest.raises(errors.UserError) as e:
    gpu_target.check_available()
  msg = str(e.value)
  assert "\n" not in msg
  assert "found 0.0.1" in msg and "ptxas (nvidia-cuda-nvcc-cu12)" in msg


def test_target_config_and_memory():
  for gpu in gpu_target.GPUS:
    text = gpu_target.target_config(gpu)
    assert f"device_memory_size: {gpu_target.HBM_BYTES[gpu]}" in text
    assert "major: 9" in text and 'platform_name: "CUDA"' in text
  assert gpu_target.HBM_BYTES["h200"] == 141 * 2 ** 30
  assert gpu_target.HBM_BYTES["h100"] > 79 * 2 ** 30


def test_memory_fraction(monkeypatch):
  for var in gpu_target.MEM_FRACTION_VARS:
    monkeypatch.delenv(var, raising=False)
  assert gpu_target.default_memory_fraction() == 0.75
  assert gpu_target.usable_bytes("h100") == int(gpu_target.HBM_BYTES["h100"] * 0.75)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
  assert gpu_target.default_memory_fraction() == 0.9
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", ".5")  # the new name wins
  assert gpu_target.default_memory_fraction() == 0.5
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "lots")
  with pytest.raises(errors.UserError, match="XLA_CLIENT_MEM_FRACTION"):
    gpu_target.default_memory_fraction()


def test_topology_and_names():
  assert gpu_target.topology(1) == "1x1x1"
  assert gpu_target.topology(8) == "1x1x8"
  assert gpu_target.topology(16) == "1x2x8"
  for bad in (0, 12):
    with pytest.raises(errors.UserError, match="GPUs"):
      gpu_target.topology(bad)
  with pytest.raises(errors.UserError, match="unknown GPU"):
    gpu_target.gpu_devices("a100", 8)
