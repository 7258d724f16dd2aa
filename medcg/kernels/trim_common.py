"""What TRIM's XLA reference (`trim.py`) and its Pallas kernels (`trim_pallas.py`) share: the scores, the
IQR rule and the keep counts K. Both import this module, so neither needs the other for it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("iqr_batch", "iqr_example", "ratio")
IQR_FACTOR = 1.5


def probs(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """p = softmax(-image_embeds . text) over tokens, float32, (B, N)."""
  scores = jnp.einsum("bne,be->bn", image_embeds.astype(jnp.float32),
                      text_embeds.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jax.nn.softmax(-scores, axis=-1)


def iqr_upper_bound(p: jax.Array, axis=None) -> jax.Array:
  """Q3 + 1.5 (Q3 - Q1) with NumPy's default linear interpolation (the released rule)."""
  q1 = jnp.percentile(p, 25.0, axis=axis, keepdims=axis is not None)
  q3 = jnp.percentile(p, 75.0, axis=axis, keepdims=axis is not None)
  return q3 + IQR_FACTOR * (q3 - q1)


def static_ratio_k(n: int, ratio: float) -> int:
  """K = int(N * ratio), as the released code does for a positive reduce parameter."""
  return int(n * ratio)


def keep_counts(p: jax.Array, mode: str, ratio: float | None = None) -> jax.Array:
  """Number of tokens TRIM wants to keep per example (before the k_max cap), int32 (B,)."""
  b, n = p.shape
  if mode == "iqr_batch":
    above = jnp.sum(p > iqr_upper_bound(p), dtype=jnp.int32)
    return jnp.full((b,), above // b, jnp.int32)
  if mode == "iqr_example":
    return jnp.sum(p > iqr_upper_bound(p, axis=-1), axis=-1, dtype=jnp.int32)
  if mode == "ratio":
    return jnp.full((b,), static_ratio_k(n, ratio), jnp.int32)
  raise ValueError(f"trim: unknown mode {mode!r}; expected one of {MODES}")
