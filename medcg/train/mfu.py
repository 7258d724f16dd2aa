"""Peak FLOP/s per device for MFU: model FLOPs per step / (step time x peak x devices)."""
from __future__ import annotations

import jax

# Dense bf16 peaks (no sparsity), FLOP/s per device as JAX counts devices (a TPU v4/v5p chip is one device).
PEAK_BF16 = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "B200": 2250e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of the device, or None when unknown (CPU): MFU is then not reported."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak
  return None


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, device: jax.Device | None = None) -> float | None:
  peak = peak_flops(device)
  if peak is None or step_time_s <= 0:
    return None
  return flops_per_step / (step_time_s * peak * n_devices)
