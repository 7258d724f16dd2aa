"""Hardware targets for ahead-of-time compilation on a host that has none of them.

A target names the devices a run will get (`v5p-8`, `h100x8`, ...). For TPUs, libtpu's compiler gives the
real topology's devices on a CPU-only host (`jax.experimental.topologies.get_topology_desc`), and
`jax.jit(f).lower(abstract inputs on a mesh of them).compile()` is the compile the pod would do: its memory
analysis and its compile-time HBM out-of-memory error are the pod's. GPU targets compile deviceless through the
CUDA PJRT plugin (`medcg.aot.gpu_target`). `cpu8` is 8 host devices (the test mesh).

TPU names follow Cloud TPU: v4 and v5p count TensorCores (two per chip, one JAX device per chip with megacore:
v5p-8 is 4 devices), v5e and v6e count chips (v5e-16 is 16 devices).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re

import jax

from medcg import compile_cache
from medcg.errors import UserError

GiB = 1024 ** 3


class TargetError(UserError, ValueError):
  """An unknown target, or one whose compiler backend is not installed here."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str               # "tpu" | "gpu" | "cpu"
  num_devices: int
  hbm_bytes: int              # per device, the chip's specification
  peak_bf16_flops: float      # per device, dense
  topology: str = ""          # TPU: get_topology_desc's topology_name
  chip_config: str = ""       # TPU: "megacore" for v4 / v5p
  gpu: str = ""               # GPU: the medcg.aot.gpu_target spec name

  @property
  def device_label(self) -> str:
    return {"tpu": f"TPU {self.name.split('-')[0]}", "gpu": self.gpu.upper(), "cpu": "CPU"}[self.platform]


def _tpu(name: str, topology: str, n: int, hbm_gib: float, peak: float, megacore: bool = False) -> Target:
  return Target(name, "tpu", n, int(hbm_gib * GiB), peak, topology, "megacore" if megacore else "")


# Dense bf16 peaks per JAX device (chip), from the Cloud TPU / NVIDIA spec sheets (medcg.train.mfu agrees).
# GPU memory is XLA's device description (medcg.aot.gpu_target.HBM_BYTES: H100 SXM 79.1 GiB, H200 141 GiB).
TARGETS: dict[str, Target] = {t.name: t for t in (
    _tpu("v4-8", "v4:2x2x1", 4, 32, 275e12, megacore=True),
    _tpu("v4-16", "v4:2x2x2", 8, 32, 275e12, megacore=True),
    _tpu("v4-32", "v4:2x2x4", 16, 32, 275e12, megacore=True),
    _tpu("v5e-4", "v5e:2x2", 4, 16, 197e12),
    _tpu("v5e-8", "v5e:2x4", 8, 16, 197e12),
    _tpu("v5e-16", "v5e:4x4", 16, 16, 197e12),
    _tpu("v5e-32", "v5e:4x8", 32, 16, 197e12),
    _tpu("v5p-8", "v5p:2x2x1", 4, 96, 459e12, megacore=True),
    _tpu("v5p-16", "v5p:2x2x2", 8, 96, 459e12, megacore=True),
    _tpu("v6e-4", "v6e:2x2", 4, 32, 918e12),
    _tpu("v6e-8", "v6e:2x4", 8, 32, 918e12),
    _tpu("v6e-16", "v6e:4x4", 16, 32, 918e12),
    Target("h100x1", "gpu", 1, 84_942_979_072, 989e12, gpu="h100"),
    Target("h100x8", "gpu", 8, 84_942_979_072, 989e12, gpu="h100"),
    Target("h200x1", "gpu", 1, 151_397_597_184, 989e12, gpu="h200"),
    Target("h200x8", "gpu", 8, 151_397_597_184, 989e12, gpu="h200"),
    Target("cpu8", "cpu", 8, 0, 0.0),
)}

TPU_INSTALL = 'pip install "jax[tpu]=={v}"  (brings the libtpu matching jax {v}; about 640 MB)'


def get(name: str) -> Target:
  if name not in TARGETS:
    raise TargetError(f"--target={name!r} is not a known target; known: {', '.join(TARGETS)}")
  return TARGETS[name]


def check_backend(target: Target) -> None:
  """A one-line error naming the package and its install line when the target's compiler is missing."""
  if target.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
    raise TargetError(f"--target={target.name} compiles with libtpu, which is not installed: "
                      + TPU_INSTALL.format(v=jax.__version__))
  if target.platform == "gpu":
    from medcg.aot import gpu_target
    gpu_target.check_available()


def devices(target: Target) -> list:
  """The target's devices: libtpu's topology, the deviceless GPU client's, or this host's CPU devices."""
  check_backend(target)
  if target.platform == "tpu":
    from jax.experimental import topologies
    # Compile-only on a host with no TPU: libtpu's process lock is for chips this process never opens (so a test
    # run and a compile may overlap), and naming this host as the only worker silences its worker-lookup error.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    kw = {"chip_config_name": target.chip_config} if target.chip_config else {}
    devs = list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kw).devices)
  elif target.platform == "gpu":
    from medcg.aot import gpu_target
    # Without a device XLA cannot autotune, and its Triton GEMM tiling then fails on some of our dots ("Couldn't
    # find output tile sizes", jax 0.10.2): compile GEMMs as cuBLAS calls, as autotuning often picks on the card.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()
    devs = list(gpu_target.gpu_devices(target.gpu, target.num_devices))
  else:
    devs = [d for d in jax.devices() if d.platform == "cpu"]
    if len(devs) < target.num_devices:
      raise TargetError(f"--target={target.name} needs {target.num_devices} CPU devices, this process has "
                        f"{len(devs)}: set XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices} "
                        "before jax starts (python -m medcg.compile does)")
    devs = devs[:target.num_devices]
  if len(devs) != target.num_devices:
    raise TargetError(f"--target={target.name}: expected {target.num_devices} devices, the backend gave {len(devs)}")
  return devs


_HBM_MESSAGE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def parse_available_hbm(message: str) -> int | None:
  """Bytes in libtpu's 'exceeds available HBM (15.75G)' message, or None."""
  m = _HBM_MESSAGE.search(message)
  return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


@functools.cache
def usable_bytes(target: Target) -> int:
  """Per-device bytes a program may use. TPU: what libtpu reserves less, read from its own out-of-memory message
  on a deliberately oversized program (the chip spec less runtime reservations: e.g. 15.75 GiB of a v5e's 16).
  GPU: the card times JAX's default preallocation fraction (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75)."""
  if target.platform == "gpu":
    from medcg.aot import gpu_target
    return int(target.hbm_bytes * gpu_target.default_memory_fraction())
  if target.platform != "tpu":
    return 0
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  devs = devices(target)[:1]
  mesh = jax.sharding.Mesh(devs, ("x",))
  huge = jax.ShapeDtypeStruct((1 << 18, 1 << 18), jnp.float32, sharding=NamedSharding(mesh, P()))  # 256 GiB
  try:
    with compile_cache.not_written():
      jax.jit(lambda a: a * 2).lower(huge).compile()
  except Exception as e:  # pylint: disable=broad-except
    found = parse_available_hbm(str(e))
    if found:
      return found
  return target.hbm_bytes
