"""The Qwen2-VL / Qwen2.5-VL vision tower and its 2x2 PatchMerger (Flax NNX), laid out like HF's so weights map 1:1.

Qwen2-VL: a Conv3d patch embedding (temporal patch 2 x 14 x 14; a still image is the same frame twice, as
`Qwen2VLImageProcessor` stacks it), 2D rotary embeddings over the patch grid, pre-LayerNorm blocks (fused qkv,
quick_gelu MLP), then `PatchMerger`: LayerNorm, every 2x2 block of patches concatenated, an MLP to the LLM width.
Qwen2.5-VL: RMSNorm, a SwiGLU MLP with biases, and window attention (windows of `window_size` pixels) in every
block except `fullatt_block_indexes`.

Static shapes: one square grid per config (`image_size` = S, a multiple of patch x merge = 28), so the patch
count is fixed and train / eval steps compile once. Patches are ordered as HF orders them: grouped by 2x2 merge
block (block-major), which the merger's reshape relies on. For window attention the merge blocks are reordered
window by window (HF's `window_index`), the windowed blocks attend within a block-diagonal mask, and the inverse
permutation restores the merge-block order at the tower's output.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medcg.model import clip
from medcg.model import layers as L

NORMS = ("layernorm", "rmsnorm")
MLPS = ("fc", "swiglu")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
  """Vision tower shapes (HF `Qwen2VLVisionConfig` / `Qwen2_5_VLVisionConfig`) plus the static image size."""
  image_size: int = 448              # static square side S: (S/14)^2 patches, (S/28)^2 merged tokens
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  hidden_size: int = 1280            # HF embed_dim (Qwen2-VL) / hidden_size (Qwen2.5-VL)
  intermediate_size: int = 5120      # MLP width (Qwen2-VL: embed_dim * mlp_ratio)
  num_layers: int = 32               # HF depth
  num_heads: int = 16
  hidden_act: str = "quick_gelu"
  norm: str = "layernorm"            # layernorm (Qwen2-VL) | rmsnorm (Qwen2.5-VL)
  mlp: str = "fc"                    # fc: fc2(act(fc1 x)) (Qwen2-VL) | swiglu: down(act(gate x) * up x) (Qwen2.5-VL)
  window_size: int = 0               # window attention side in pixels (Qwen2.5-VL 112); 0: full attention
  fullatt_block_indexes: tuple = ()  # blocks with full attention when window_size > 0
  out_hidden_size: int = 3584        # the merger's output width = the LLM's hidden size
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any] | Any, where: str = "model.vision") -> "QwenVisionConfig":
    cfg = clip._from_mapping(cls, cfg, where)
    validate(cfg, where)
    return cfg

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def merged_grid(self) -> int:
    """Merged (LLM) tokens per side."""
    return self.grid // self.spatial_merge_size

  @property
  def num_tokens(self) -> int:
    """Image tokens the LLM sees."""
    return self.merged_grid ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
  """`Qwen2VLImageProcessor`'s target size: multiples of `factor` closest to (h, w) within the pixel budget.

  medcg fixes one grid per config: `image_size` is `smart_resize(S, S, ...)` of the square it is given, so
  `min_pixels` / `max_pixels` of a HF preprocessor_config.json map to a static side (see `static_image_size`).
  """
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image {height}x{width}: aspect ratio above 200 is not supported")
  h = max(factor, round(height / factor) * factor)
  w = max(factor, round(width / factor) * factor)
  if h * w > max_pixels:
    beta = np.sqrt(height * width / max_pixels)
    h = max(factor, int(np.floor(height / beta / factor)) * factor)
    w = max(factor, int(np.floor(width / beta / factor)) * factor)
  elif h * w < min_pixels:
    beta = np.sqrt(min_pixels / (height * width))
    h = int(np.ceil(height * beta / factor)) * factor
    w = int(np.ceil(width * beta / factor)) * factor
  return h, w


def static_image_size(side: int, *, min_pixels: int | None = None, max_pixels: int | None = None,
                      factor: int = 28) -> int:
  """The static square side for a requested `side` under a HF processor's pixel budget (multiples of 28)."""
  kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
  h, _ = smart_resize(side, side, factor, **kw)
  return h


def validate(cfg: QwenVisionConfig, where: str = "model.vision") -> None:
  """Raises naming the key when the config cannot describe a Qwen vision tower."""
  unit = cfg.patch_size * cfg.spatial_merge_size
  if cfg.image_size <= 0 or cfg.image_size % unit:
    raise ValueError(f"{where}.image_size={cfg.image_size} must be a positive multiple of patch_size x "
                     f"spatial_merge_size = {unit} (Qwen2-VL resizes to multiples of 28)")
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(f"{where}.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
  if cfg.head_dim % 4:
    raise ValueError(f"{where}: head_dim {cfg.head_dim} must be a multiple of 4 (2D rotary over height and width)")
  if cfg.norm not in NORMS:
    raise ValueError(f"{where}.norm={cfg.norm!r}: expected one of {NORMS}")
  if cfg.mlp not in MLPS:
    raise ValueError(f"{where}.mlp={cfg.mlp!r}: expected one of {MLPS}")
  activation(cfg.hidden_act)
  bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.num_layers]
  if bad:
    raise ValueError(f"{where}.fullatt_block_indexes {bad} are outside the {cfg.num_layers} blocks")
  if cfg.window_size:
    window = cfg.window_size // unit
    if window < 1 or cfg.window_size % unit:
      raise ValueError(f"{where}.window_size={cfg.window_size} must be a positive multiple of {unit} pixels")
  L.check_remat_policy(cfg.remat)


def activation(name: str):
  """HF `hidden_act` of the vision MLP: CLIP's names plus silu (Qwen2.5-VL)."""
  if name == "silu":
    return jax.nn.silu
  return clip.activation(name)


# --------------------------------------------------------------------------------------------------------------
# Static layout: patch order, 2D rotary angles, windows
# --------------------------------------------------------------------------------------------------------------
def patch_positions(cfg: QwenVisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) of each patch in HF's merge-block-major order (`get_vision_position_ids`)."""
  g, m = cfg.grid, cfg.spatial_merge_size
  rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  block = lambda a: a.reshape(g // m, m, g // m, m).transpose(0, 2, 1, 3).reshape(-1)
  return block(rows), block(cols)


def window_order(cfg: QwenVisionConfig) -> np.ndarray | None:
  """Merge blocks reordered window by window (HF `get_vision_window_index`), or None without windows.

  Windows of `window_size // 28` merge blocks per side tile the merged grid from the top left (the last row /
  column of windows may be partial); windows are taken row-major and blocks row-major within each.
  """
  if not cfg.window_size:
    return None
  g, w = cfg.merged_grid, cfg.window_size // (cfg.patch_size * cfg.spatial_merge_size)
  rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  key = np.stack([(cols % w).ravel(), (rows % w).ravel(), (cols // w).ravel(), (rows // w).ravel()])
  return np.lexsort(key)  # sorts by window row, window column, row in window, column in window


def _window_ids(cfg: QwenVisionConfig, order: np.ndarray) -> np.ndarray:
  """The window of each patch, in the window-reordered patch order."""
  g, w = cfg.merged_grid, cfg.window_size // (cfg.patch_size * cfg.spatial_merge_size)
  block_window = (np.arange(g * g) // g // w) * g + (np.arange(g * g) % g) // w
  return np.repeat(block_window[order], cfg.spatial_merge_size ** 2)


def _token_order(cfg: QwenVisionConfig, block_order: np.ndarray) -> np.ndarray:
  """A permutation of merge blocks as a permutation of their patches (each block's patches stay together)."""
  unit = cfg.spatial_merge_size ** 2
  return (block_order[:, None] * unit + np.arange(unit)[None]).reshape(-1)


def rope_angles(cfg: QwenVisionConfig) -> np.ndarray:
  """(N, head_dim / 2) rotary angles: head_dim/4 frequencies for the row, the same for the column."""
  dim = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  rows, cols = patch_positions(cfg)
  return np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], -1).astype(np.float32)


def patchify(images: jax.Array, cfg: QwenVisionConfig) -> jax.Array:
  """(B, S, S, C) normalised images -> (B, N, C, P, P) patches in merge-block-major order."""
  b, h, w, c = images.shape
  if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.in_channels:
    raise ValueError(f"images of shape {images.shape}: this Qwen vision tower takes (B, {cfg.image_size}, "
                     f"{cfg.image_size}, {cfg.in_channels}) (model.vision.image_size is static)")
  p, m, g = cfg.patch_size, cfg.spatial_merge_size, cfg.grid
  x = images.reshape(b, g // m, m, p, g // m, m, p, c)
  x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # (B, block row, block col, row in block, col in block, C, P, P)
  return x.reshape(b, g * g, c, p, p)


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------
def _kw(cfg) -> dict:
  return dict(dtype=L.canonical_dtype(cfg.dtype), param_dtype=L.canonical_dtype(cfg.param_dtype))


def _norm(cfg: QwenVisionConfig, features: int, rngs: nnx.Rngs):
  cls = L.LayerNorm if cfg.norm == "layernorm" else L.RMSNorm
  return cls(features, eps=cfg.norm_eps, rngs=rngs, **_kw(cfg))


class VisionAttention(nnx.Module):
  """Self-attention with a fused qkv projection (HF `qkv`: [3 x heads x head_dim, dim]) and 2D rotary."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
    e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    kw = dict(use_bias=True, rngs=rngs, **_kw(cfg))
    self.qkv = L.Dense((e,), (3, h, d), in_names=("embed",), out_names=(None, "heads", "head_dim"), **kw)
    self.proj = L.Dense((h, d), (e,), in_names=("heads", "head_dim"), out_names=("embed",), **kw)

  def __call__(self, x: jax.Array, angles: jax.Array, mask: jax.Array | None) -> jax.Array:
    qkv = self.qkv(x)
    names = ("act_batch", "act_len", "act_heads", None)
    q = L.constrain(L.apply_rope_angles(qkv[:, :, 0], angles), names)
    k = L.constrain(L.apply_rope_angles(qkv[:, :, 1], angles), names)
    v = L.constrain(qkv[:, :, 2], names)
    return self.proj(L.attention(q, k, v, mask))


class VisionMLP(nnx.Module):
  """fc2(act(fc1 x)) (Qwen2-VL) or down(act(gate x) * up x) with biases (Qwen2.5-VL)."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=True, rngs=rngs, **_kw(cfg))
    up = dict(in_names=("embed",), out_names=("mlp",), **kw)
    down = dict(in_names=("mlp",), out_names=("embed",), **kw)
    self.kind, self.act = cfg.mlp, cfg.hidden_act
    if cfg.mlp == "fc":
      self.fc1, self.fc2 = L.Dense((e,), (m,), **up), L.Dense((m,), (e,), **down)
    else:
      self.gate, self.up = L.Dense((e,), (m,), **up), L.Dense((e,), (m,), **up)
      self.down = L.Dense((m,), (e,), **down)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation(self.act)
    if self.kind == "fc":
      return self.fc2(L.constrain(act(self.fc1(x)), ("act_batch", "act_len", "act_mlp")))
    h = act(self.gate(x)) * self.up(x)
    return self.down(L.constrain(h, ("act_batch", "act_len", "act_mlp")))


class VisionBlock(nnx.Module):
  """Pre-norm block: x + attn(norm1 x), then x + mlp(norm2 x)."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, cfg.hidden_size, rngs)
    self.attn = VisionAttention(cfg, rngs=rngs)
    self.norm2 = _norm(cfg, cfg.hidden_size, rngs)
    self.mlp = VisionMLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, angles: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = x + self.attn(self.norm1(x), angles, mask)
    x = x + self.mlp(self.norm2(x))
    return L.constrain(x, ("act_batch", "act_len", "act_embed"))


class QwenVisionTower(nnx.Module):
  """`tower(images (B, S, S, 3)) -> (B, N, hidden)` patch states, in merge-block-major order (before the merger)."""

  def __init__(self, cfg: QwenVisionConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
    cfg = QwenVisionConfig.from_dict(cfg)
    self.cfg = cfg
    c, t, p, e = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.hidden_size
    init = nnx.initializers.normal(1.0 / np.sqrt(c * t * p * p))
    # HF's Conv3d weight (E, C, T, P, P) as (C, T, P, P, E); no bias (as HF).
    self.patch_embed = nnx.Param(L.sharded(init, (None, None, None, "patch", "embed"))(
        rngs.params(), (c, t, p, p, e), L.canonical_dtype(cfg.param_dtype)))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return VisionBlock(cfg, rngs=rngs)

    self.blocks = make(rngs)

  def embed(self, images: jax.Array) -> jax.Array:
    """Patch embeddings (B, N, hidden). The T frames of a still image are equal, so the kernel is summed over T."""
    cfg = self.cfg
    dt = L.canonical_dtype(cfg.dtype)
    x = patchify(images.astype(dt), cfg)
    embed = lambda x, k: jnp.einsum("bncpq,ctpqe->bne", x, k)
    x = L.with_weight(embed, x, self.patch_embed[...], (None, None, None, "patch", "embed"), dt)
    return L.constrain(x, ("act_batch", "act_len", "act_embed"))

  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    x = self.embed(images)
    angles = rope_angles(cfg)
    blocks = window_order(cfg)
    window_mask, full = None, np.ones((cfg.num_layers,), bool)
    if blocks is not None:
      order = _token_order(cfg, blocks)  # a static permutation of the patches
      x, angles = x[:, order], angles[order]
      ids = _window_ids(cfg, blocks)
      window_mask = jnp.asarray(ids[:, None] == ids[None, :])[None, None]  # block-diagonal (1, 1, N, N)
      full = np.isin(np.arange(cfg.num_layers), cfg.fullatt_block_indexes)
    angles = jnp.asarray(angles)[None]
    graphdef, state = nnx.split(self.blocks)

    def body(h, xs):
      layer_state, is_full = xs
      mask = None if window_mask is None else window_mask | is_full
      return nnx.merge(graphdef, layer_state)(h, angles, mask), None

    x, _ = jax.lax.scan(L.remat(body, cfg.remat), x, (state, jnp.asarray(full)), unroll=L.scan_unroll())
    if blocks is not None:
      x = x[:, np.argsort(order)]  # back to merge-block order
    return x


class PatchMerger(nnx.Module):
  """HF `PatchMerger`: norm, each 2x2 merge block's patches concatenated, Linear-GELU-Linear to the LLM width."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
    self.unit = cfg.spatial_merge_size ** 2
    wide = cfg.hidden_size * self.unit
    kw = dict(use_bias=True, rngs=rngs, **_kw(cfg))
    self.ln_q = _norm(cfg, cfg.hidden_size, rngs)
    self.fc1 = L.Dense((wide,), (wide,), in_names=("embed",), out_names=("mlp",), **kw)
    self.fc2 = L.Dense((wide,), (cfg.out_hidden_size,), in_names=("mlp",), out_names=("embed",), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, e = x.shape
    x = self.ln_q(x).reshape(b, n // self.unit, self.unit * e)
    h = functools.partial(jax.nn.gelu, approximate=False)(self.fc1(x))
    return self.fc2(L.constrain(h, ("act_batch", "act_len", "act_mlp")))


def encoder_flops(cfg: QwenVisionConfig) -> float:
  """Forward FLOPs of one image: patch embedding, blocks (window blocks attend within their window), merger."""
  n, e, m = cfg.grid ** 2, cfg.hidden_size, cfg.intermediate_size
  mlp = 3 * e * m if cfg.mlp == "swiglu" else 2 * e * m
  per_block = 2 * n * (4 * e * e + mlp)
  full = len(cfg.fullatt_block_indexes) if cfg.window_size else cfg.num_layers
  window = (cfg.window_size // cfg.patch_size) ** 2 if cfg.window_size else n
  attn = 4 * n * e * (full * n + (cfg.num_layers - full) * min(window, n))
  embed = 2 * n * cfg.in_channels * cfg.patch_size ** 2 * e  # the kernel summed over T: one frame's worth
  wide = e * cfg.spatial_merge_size ** 2
  merger = 2 * cfg.num_tokens * (wide * wide + wide * cfg.out_hidden_size)
  return float(embed + cfg.num_layers * per_block + attn + merger)


__all__ = ["PatchMerger", "QwenVisionConfig", "QwenVisionTower", "encoder_flops", "patch_positions", "patchify",
           "rope_angles", "smart_resize", "static_image_size", "window_order"]
