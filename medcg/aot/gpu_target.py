"""Compile for NVIDIA H100 / H200 on a host with no GPU (deviceless ahead-of-time compilation).

Why: a GPU run's memory fit and its Triton kernels (TRIM's `impl="pallas_gpu"`) can be checked from a CPU
machine, before renting the cards. XLA's CUDA PJRT plugin (`jax-cuda12-plugin` + `jax-cuda12-pjrt`) makes a
compile-only topology from a `GpuTargetConfigProto`, the device description XLA would otherwise ask the driver
for. `jax.jit(f).lower(args on a mesh of its devices).compile()` then runs the whole GPU pipeline: SPMD
partitioning, the HLO passes and scheduler, Triton (Pallas Triton kernels included), LLVM to PTX and `ptxas`
to sm_90a code. Nothing runs: the devices cannot hold arrays.

How (the API; checked on jax 0.10.2):
  jax.experimental.topologies.get_topology_desc(
      platform="cuda", topology_name=..., target_config=<GpuTargetConfigProto text>,
      topology="<partitions>x<hosts per partition>x<devices per host>").devices
The plugin parses `target_config` as a text proto. It ships no spec files, so `target_config(gpu)` writes one
from XLA's own specs (`xla/backends/gpu/target_config/specs/h100_sxm.txtpb` and `h200.txtpb`, formerly
`xla/tools/hlo_opt/gpu_specs/`). The H200 is the H100's sm_90 chip (132 SMs, same clocks and caches) with
141 GiB HBM3e at 4.8 TB/s; XLA's H200 spec differs from the H100 one only in memory size, bandwidth and clock
and the name, and so does ours. `collective_memory_granularity` (newer than jax 0.10.2's proto, which rejects
unknown fields) is left out.

What a compile tells, and what it does not:
  - `compiled.memory_analysis()` is per device; `peak_bytes` sums it. The GPU compiler never fails for lack of
    memory (the card's size only steers scheduling) and `cost_analysis()` is None, so compare `peak_bytes`
    with `usable_bytes(gpu)`: HBM times the fraction JAX preallocates (0.75 unless
    XLA_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_MEM_FRACTION say otherwise; docs "GPU memory allocation").
  - cuDNN fused attention: `medcg.model.layers.attention("auto")` picks XLA attention here (the default
    backend is the CPU), so a train step's memory is that of XLA attention unless the model is configured with
    `attention_impl="cudnn"`, which a GPU run would use. That compiles only with `nvidia-cudnn-cu12` installed
    too (about 2.1 GB with the cuBLAS and NVRTC it pulls; else "cuDNN not found"), and even then the cuDNN
    graph is not built (that needs a device): its workspace counts as 0 bytes, and a shape cuDNN rejects fails
    only on the card.
  - No autotuning: GEMM tilings are XLA's defaults.

Setup done here, so the user needs only the packages (`INSTALL`): the wheel's `ptxas` is named through
`--xla_gpu_cuda_data_dir` (XLA also finds it next to the plugin, or on PATH), and on a host with no CUDA
driver the plugin's CUDA-runtime version check, which would stop it registering, is skipped
(JAX_SKIP_CUDA_CONSTRAINTS_CHECK). Both must happen before jax starts its backends: import this module first,
or run with JAX_PLATFORMS=cpu (the check is then skipped by the plugin itself).
"""
from __future__ import annotations

import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import shutil

import jax

from medcg.errors import UserError

GPUS = ("h100", "h200")
DEVICES_PER_HOST = 8  # an HGX / DGX node
DEFAULT_MEM_FRACTION = 0.75  # JAX preallocates 75% of a GPU's memory (docs: "GPU memory allocation")
MEM_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")  # new name, deprecated one

# Per-card memory: the device_memory_size of XLA's specs, in bytes.
HBM_BYTES = {
    "h100": 84_942_979_072,   # "80 GB" H100 SXM: 79.1 GiB
    "h200": 151_397_597_184,  # "141 GB" H200: 141 GiB
}
_MEMORY_BANDWIDTH = {"h100": 3_352_320_000_000, "h200": 4_800_000_000_000}  # bytes/s
_MEM_CLOCK_KHZ = {"h100": 2_619_000, "h200": 3_750_000}
_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200 141GB HBM3e"}

# Throughput tables of the sm_90 spec, keyed by xla.PrimitiveType number (S8=2, S32=4, U8=6, U32=8, F16=10,
# F32=11, F64=12, BF16=16, 8-bit and narrower floats 19+): (key, clock GHz, units per SM, ops per clock).
_SCALAR_RATES = tuple((k, 1.98, u, o) for k, u, o in
                      ((4, 64, 1), (8, 64, 1), (10, 128, 2), (11, 128, 1), (12, 64, 1), (16, 128, 2)))
_MATRIX_RATES = ((12, 1.98, 4, 32),) + tuple(
    (k, 1.8295201, 4, o) for k, o in ((2, 1024), (6, 1024), (10, 512), (11, 256), (16, 512), (19, 1024),
                                     (20, 1024), (23, 1024), (24, 1024), (25, 1024), (28, 1024), (29, 1024),
                                     (33, 1024), (35, 1024), (36, 1024)))

_PLUGINS = (("jax-cuda12-plugin", "jax_cuda12_plugin", "jax-cuda12-pjrt", "jax_plugins.xla_cuda12"),
            ("jax-cuda13-plugin", "jax_cuda13_plugin", "jax-cuda13-pjrt", "jax_plugins.xla_cuda13"))
INSTALL = 'pip install "jax-cuda12-plugin=={v}" nvidia-cuda-nvcc-cu12'  # 575 MB installed; pulls jax-cuda12-pjrt


# ----------------------------------------------------------------------------- spec

def _rates(rows) -> str:
  return "".join(f"    rate_infos {{ key: {k} value {{ clock_rate_ghz: {c} units_per_core: {u} "
                 f"ops_per_clock: {o} }} }}\n" for k, c, u, o in sorted(rows))


def target_config(gpu: str) -> str:
  """The `GpuTargetConfigProto` text of one card (`gpu` in GPUS)."""
  _check_gpu(gpu)
  mem = HBM_BYTES[gpu]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {_MEMORY_BANDWIDTH[gpu]}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {mem}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  scalar_unit_description {{
{_rates(_SCALAR_RATES)}  }}
  matrix_unit_description {{
{_rates(_MATRIX_RATES)}  }}
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  model_str: "sm_9.0a with {mem}B RAM, 132 cores, 1980000KHz clock, {_MEM_CLOCK_KHZ[gpu]}KHz mem clock, 52428800B L2$"
  device_address_bits: 64
  pcie_bandwidth: 34359738368
  ecc_enabled: true
  name: "{_NAMES[gpu]}"
  driver_version: "13.0.0"
  runtime_version: "12.8.0"
  compile_time_toolkit_version: "12.8.0"
  dnn_version: "9.10.0"
  device_interconnect_info {{ active_links: 18 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{_NAMES[gpu]}"
"""


def _check_gpu(gpu: str) -> None:
  if gpu not in GPUS:
    raise UserError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")


# ----------------------------------------------------------------------------- memory

def default_memory_fraction() -> float:
  """The fraction of a card JAX's allocator takes: XLA_CLIENT_MEM_FRACTION (or the deprecated
  XLA_PYTHON_CLIENT_MEM_FRACTION) when set here, else 0.75."""
  for var in MEM_FRACTION_VARS:
    value = os.environ.get(var, "").strip()
    if value:
      try:
        fraction = float(value)
      except ValueError:
        raise UserError(f"{var}={value!r} is not a number; use e.g. {var}=.75") from None
      if not 0.0 < fraction <= 1.0:
        raise UserError(f"{var}={value!r} must be in (0, 1]")
      return fraction
  return DEFAULT_MEM_FRACTION


def usable_bytes(gpu: str) -> int:
  """Bytes per card a program may use under JAX's allocator: HBM_BYTES times `default_memory_fraction()`."""
  _check_gpu(gpu)
  return int(HBM_BYTES[gpu] * default_memory_fraction())


def peak_bytes(compiled) -> int:
  """Per-device peak of a compiled program: arguments + outputs - aliased (donated) + temporaries + code."""
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError("this compiled program has no memory analysis")
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
          + m.generated_code_size_in_bytes)


# ----------------------------------------------------------------------------- packages

def _plugin():
  """(plugin distribution, its version, pjrt distribution or None) of the installed CUDA plugin, or None."""
  for dist, module, pjrt_dist, pjrt_module in _PLUGINS:
    if importlib.util.find_spec(module) is None:
      continue
    try:
      version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      continue
    return dist, version, pjrt_dist if importlib.util.find_spec(pjrt_module) is not None else None
  return None


def _nvcc_wheel_dir() -> pathlib.Path | None:
  """site-packages/nvidia/cuda_nvcc of the nvidia-cuda-nvcc-cu12 wheel (bin/ptxas, nvvm/libdevice)."""
  try:
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
  except (ImportError, ValueError):
    return None
  for root in (spec.submodule_search_locations or []) if spec else []:
    if (pathlib.Path(root) / "bin" / "ptxas").is_file():
      return pathlib.Path(root)
  return None


def _flag_value(flags: str, name: str) -> str | None:
  for token in flags.split():
    if token.startswith(f"--{name}="):
      return token.split("=", 1)[1]
  return None


def ptxas_path() -> str | None:
  """The ptxas XLA will run: --xla_gpu_cuda_data_dir's, the nvcc wheel's, PATH's or /usr/local/cuda's."""
  data_dir = _flag_value(os.environ.get("XLA_FLAGS", ""), "xla_gpu_cuda_data_dir")
  wheel = _nvcc_wheel_dir()
  candidates = [pathlib.Path(data_dir) / "bin" / "ptxas" if data_dir else None,
                wheel / "bin" / "ptxas" if wheel else None,
                pathlib.Path(p) if (p := shutil.which("ptxas")) else None,
                pathlib.Path("/usr/local/cuda/bin/ptxas")]
  for c in candidates:
    if c is not None and c.is_file() and os.access(c, os.X_OK):
      return str(c)
  return None


def check_available() -> None:
  """Raises a one-line UserError naming what deviceless GPU compilation lacks and the install line."""
  jax_version = jax.__version__
  missing = []
  plugin = _plugin()
  if plugin is None:
    missing += [f"jax-cuda12-plugin=={jax_version}", f"jax-cuda12-pjrt=={jax_version}"]
  else:
    dist, version, pjrt = plugin
    if version.split("+")[0] != jax_version.split("+")[0]:
      missing.append(f"{dist}=={jax_version} (found {version}, which does not match jax {jax_version})")
    if pjrt is None:
      missing.append(f"{dist.replace('-plugin', '-pjrt')}=={jax_version}")
  if ptxas_path() is None:
    missing.append("ptxas (nvidia-cuda-nvcc-cu12)")
  if missing:
    raise UserError(f"compiling for NVIDIA GPUs on this host needs {', '.join(missing)}: "
                    f"{INSTALL.format(v=jax_version)} (no GPU or CUDA driver needed)")


# ----------------------------------------------------------------------------- environment

def _has_cuda_driver() -> bool:
  return ctypes.util.find_library("cuda") is not None


def prepare_environment() -> None:
  """Points XLA at the wheel's ptxas and, with no CUDA driver here, lets the plugin register without the
  CUDA runtime libraries. Only acts when the plugin is installed; effective before jax starts its backends."""
  if _plugin() is None:
    return
  wheel = _nvcc_wheel_dir()
  flags = os.environ.get("XLA_FLAGS", "")
  if wheel is not None and _flag_value(flags, "xla_gpu_cuda_data_dir") is None:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_cuda_data_dir={wheel}".strip()
  if not _has_cuda_driver():
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


prepare_environment()


# ----------------------------------------------------------------------------- devices

def topology(count: int) -> str:
  """The plugin's topology string for `count` GPUs: one host up to 8, then hosts of 8."""
  if count < 1 or (count > DEVICES_PER_HOST and count % DEVICES_PER_HOST):
    raise UserError(f"{count} GPUs: use 1 to {DEVICES_PER_HOST} (one host) or a multiple of "
                    f"{DEVICES_PER_HOST} (hosts of {DEVICES_PER_HOST})")
  if count <= DEVICES_PER_HOST:
    return f"1x1x{count}"
  return f"1x{count // DEVICES_PER_HOST}x{DEVICES_PER_HOST}"


@functools.cache
def _devices(gpu: str, count: int) -> tuple:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="cuda", topology_name=f"{gpu}x{count}",
                                        target_config=target_config(gpu), topology=topology(count))
  except (NotImplementedError, RuntimeError) as e:
    if "not implemented for cuda" in str(e) or "Unknown backend" in str(e):
      raise UserError(
          "the CUDA plugin is installed but did not register with jax (its CUDA version check failed when jax "
          "started): run with JAX_PLATFORMS=cpu, or import medcg.aot.gpu_target before jax's first "
          "computation") from e
    raise
  return tuple(desc.devices)


def gpu_devices(gpu: str, count: int) -> list[jax.Device]:
  """`count` compile-only devices of `gpu` ("h100" | "h200") for `jax.make_mesh(..., devices=...)`.

  The same call returns the same devices. Up to 8 GPUs are one host; more are hosts of 8 (devices of later
  hosts have process_index 1, 2, ...), which compiles a multi-host program from this one process.
  """
  _check_gpu(gpu)
  check_available()
  return list(_devices(gpu, count))
