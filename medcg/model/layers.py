"""Shared Flax NNX building blocks: sharded params, dense/embed/norm layers, RoPE, attention, remat.

Every param is created through `sharded(init, names)`: it carries logical axis names (DEVELOPING.md)
and is *not* eagerly sharded, so models build without a mesh (CPU tests) and are placed on a mesh
by `jax.jit(init, out_shardings=sharding.param_shardings(...))` from the rules table.
Activations are constrained with `constrain(x, ("act_batch", ...))`, a no-op outside a mesh.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medcg.train import sharding

Initializer = Callable[..., jax.Array]
DType = Any


def sharded(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """`init` whose params carry logical axis `names` (resolved by the active rules, not eagerly)."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical activation names (medcg.train.sharding's rules table).

  A no-op outside `sharding.use_mesh(...)`, so the same model code runs unsharded in tests and on one device.
  """
  return sharding.constrain(x, names)


def with_weight(fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, value: jax.Array,
                names: Sequence[str | None], dtype: DType) -> jax.Array:
  """`fn(x, w)` with `w` the param `value` cast to `dtype`, in the layout it is used in under a mesh.

  The layout is `sharding.constrain_weight`'s: gathered over the FSDP axes at the point of use, so each layer
  all-gathers its weights and reduce-scatters their gradients inside the layer scan (without it, libtpu splits
  every matmul into a windowed loop of collective-permutes). The gather is rematerialised (`jax.checkpoint`
  around the gather and `fn`): the backward pass gathers again instead of keeping every layer's gathered
  weights alive from the forward pass, which with remat "none" would hold the whole unsharded model.
  Values are unchanged; outside a mesh this is `fn(x, value.astype(dtype))`.
  """
  if sharding.current_mesh() is None:
    return fn(x, value.astype(dtype))

  def apply(x, value):
    return fn(x, sharding.constrain_weight(value.astype(dtype), names))

  # Inside lax.scan CSE cannot merge the backward's gather with the forward's; unrolled it could.
  return jax.checkpoint(apply, prevent_cse=_UNROLL_SCANS.get())(x, value)


def canonical_dtype(name: str | DType) -> DType:
  """'bfloat16' / 'float32' / a dtype -> a jnp dtype, with a clear error."""
  if not isinstance(name, str):
    return jnp.dtype(name)
  try:
    return jnp.dtype({"bf16": "bfloat16", "f32": "float32", "fp32": "float32",
                      "f16": "float16", "fp16": "float16"}.get(name, name))
  except TypeError as e:
    raise ValueError(f"unknown dtype {name!r}") from e


class Dense(nnx.Module):
  """`x[..., *in_shape] -> y[..., *out_shape]` (a DenseGeneral): kernel shape in_shape + out_shape.

  Multi-axis shapes keep heads explicit, e.g. q: (embed,) -> (heads, head_dim) and
  o: (heads, head_dim) -> (embed,), so heads can be sharded by name.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *,
               in_names: Sequence[str], out_names: Sequence[str], use_bias: bool = False,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               kernel_init: Initializer | None = None, rngs: nnx.Rngs):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    self.dtype = dtype
    self.kernel_names = tuple(in_names) + tuple(out_names)  # logical axes, for the compute layout
    fan_in = int(np.prod(self.in_shape))
    kernel_init = kernel_init or nnx.initializers.normal(1.0 / math.sqrt(fan_in))
    self.kernel = nnx.Param(sharded(kernel_init, tuple(in_names) + tuple(out_names))(
        rngs.params(), self.in_shape + self.out_shape, param_dtype))
    self.bias = nnx.Param(sharded(nnx.initializers.zeros_init(), tuple(out_names))(
        rngs.params(), self.out_shape, param_dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    y = with_weight(lambda x, k: jnp.tensordot(x.astype(self.dtype), k, axes=n_in), x, self.kernel[...],
                    self.kernel_names, self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table (vocab, embed); `attend` is the tied output projection."""

  def __init__(self, vocab_size: int, features: int, *, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = nnx.Param(sharded(nnx.initializers.normal(0.02), ("vocab", "embed"))(
        rngs.params(), (vocab_size, features), param_dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return with_weight(lambda x, w: jnp.einsum("...e,ve->...v", x.astype(self.dtype), w), x,
                       self.embedding[...], ("vocab", "embed"), self.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm in float32 (as LLaMA/Qwen2 do), scale applied after casting back."""

  def __init__(self, features: int, *, eps: float = 1e-6, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(sharded(nnx.initializers.ones_init(), ("norm",))(
        None, (features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (CLIP), computed in float32."""

  def __init__(self, features: int, *, eps: float = 1e-5, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(sharded(nnx.initializers.ones_init(), ("norm",))(
        None, (features,), param_dtype))
    self.bias = nnx.Param(sharded(nnx.initializers.zeros_init(), ("norm",))(
        None, (features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
            ).astype(self.dtype)


# ------------------------------------------------------------------------------------------------
# Rotary position embeddings (HF "rotate_half" layout, as in LlamaForCausalLM checkpoints)
# ------------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
  """Inverse frequencies (head_dim // 2,) for RoPE, with LLaMA-2/3 static scaling applied.

  `scaling` is the HF `rope_scaling` dict (`rope_type`/`type`: default, linear, dynamic, llama3).
  "dynamic" depends on the sequence length and is applied in `apply_rope`.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  kind = rope_type(scaling)
  if kind == "linear":
    inv_freq = inv_freq / float(scaling["factor"])
  elif kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_type(scaling: dict | None) -> str:
  """The RoPE scaling kind of an HF `rope_scaling` dict; raises naming unsupported kinds."""
  if not scaling:
    return "default"
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"unsupported RoPE scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
  return kind


def rope_angles(positions: jax.Array, inv_freq: jax.Array, mrope_section=None) -> jax.Array:
  """RoPE angles (B, T, D/2) for positions (B, T), or multimodal positions (3, B, T) (M-RoPE).

  M-RoPE (Qwen2-VL): frequency j takes its position from component c(j) (temporal, height, width), where
  `mrope_section` (e.g. (16, 24, 24), summing to D/2) splits the frequencies into consecutive runs. Text tokens
  carry equal components, so for them M-RoPE is plain RoPE; (B, T) positions are used for every component.
  """
  inv_freq = inv_freq.astype(jnp.float32)
  positions = positions.astype(jnp.float32)
  if positions.ndim == 2 or not mrope_section:
    if positions.ndim == 3:
      raise ValueError("multimodal positions (3, B, T) need an LLM config with mrope_section")
    return positions[..., None] * inv_freq
  component = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)  # (D/2,) which of t, h, w
  per_freq = jnp.moveaxis(positions[component], 0, -1)  # (B, T, D/2)
  return per_freq * inv_freq


def apply_rope_angles(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates x (B, T, heads, head_dim) by angles (B, T, head_dim/2), rotate_half layout, in float32."""
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x (B, T, heads, head_dim) by positions (B, T), rotate_half layout, in float32."""
  return apply_rope_angles(x, rope_angles(positions, inv_freq))


def dynamic_ntk_inv_freq(inv_freq: jax.Array, head_dim: int, theta: float, scaling: dict,
                         max_positions: int, seq_len: jax.Array) -> jax.Array:
  """HF "dynamic" NTK scaling: a larger base once the sequence exceeds the trained length."""
  factor = float(scaling["factor"])
  seq_len = jnp.asarray(seq_len, jnp.float32)
  base = theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
  dyn = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return jnp.where(seq_len > max_positions, dyn, inv_freq)


# ------------------------------------------------------------------------------------------------
# Attention and rematerialisation
# ------------------------------------------------------------------------------------------------


ATTENTION_IMPLS = ("auto", "xla", "cudnn")  # None is accepted as "auto"


def _cudnn_fits(q: jax.Array, k: jax.Array) -> bool:
  """Whether cuDNN fused attention is worth trying: GPU, half precision, a full (uncached)
  sequence, and a head size cuDNN's flash kernels take."""
  head_dim = q.shape[-1]
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[1] == k.shape[1] and head_dim % 8 == 0 and head_dim <= 128)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              implementation: str | None = "auto") -> jax.Array:
  """Multi-head / grouped-query attention: q (B,T,N,D), k/v (B,S,K,D), mask bool (B,1|N,T,S).

  `jax.nn.dot_product_attention` with `implementation=None` always runs XLA (jax 0.10-0.12), so
  "auto" (or None) here picks: cuDNN fused attention on GPU when `_cudnn_fits` (falling back to
  XLA if cuDNN rejects the call while tracing), XLA elsewhere. "xla" / "cudnn" force one.
  K must divide N (GQA is native in both).
  """
  implementation = implementation or "auto"
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"choose one of {ATTENTION_IMPLS}")
  if implementation == "auto" and _cudnn_fits(q, k):
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):
      pass  # e.g. no cuDNN, or a shape its kernels do not take
  impl = "xla" if implementation == "auto" else implementation
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


_UNROLL_SCANS = contextvars.ContextVar("medcg_unroll_scans", default=False)


@contextlib.contextmanager
def unrolled_scans():
  """Trace the layer scans fully unrolled (XLA's cost analysis counts a loop body once; medcg.aot counts FLOPs
  of small unrolled models this way). Read at trace time: wrap the lowering, not the call of a cached jit."""
  token = _UNROLL_SCANS.set(True)
  try:
    yield
  finally:
    _UNROLL_SCANS.reset(token)


def scan_unroll() -> bool | int:
  """The `unroll` argument of the layer scans: 1 (a loop), or True inside `unrolled_scans()`."""
  return True if _UNROLL_SCANS.get() else 1


def check_remat_policy(policy: str) -> str:
  """Returns `policy` if it names a remat policy ("none" or a `REMAT_POLICIES` key), else raises."""
  if policy != "none" and policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; choose none, {', '.join(REMAT_POLICIES)}")
  return policy


def remat(fn: Callable, policy: str) -> Callable:
  """Wraps a per-layer function with `jax.checkpoint` under a named policy ("none" = no remat).

  prevent_cse=False is safe (and faster) because the wrapped function runs inside `lax.scan`; unrolled
  (`unrolled_scans`), XLA would merge the recompute with the forward, so it is prevented there.
  """
  if check_remat_policy(policy) == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=_UNROLL_SCANS.get())
