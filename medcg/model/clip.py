"""CLIP vision and text towers (Flax NNX), laid out like Hugging Face `CLIPModel` so weights map 1:1.

LLaVA-1.5 feeds the decoder the patch tokens of the penultimate vision layer, and TRIM scores those same tokens
against the CLIP text embedding of the question through `visual_projection(post_layernorm(h))`. The vision tower
therefore returns the hidden states of any layer (running only the layers it needs) and exposes the per-patch
projection separately. Layers are stacked on a leading `layers` axis and run with `jax.lax.scan`, so compile
time does not grow with depth; a remat policy per layer trades memory for recompute.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medcg.model import hf
from medcg.model import layers as L

# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------
def _from_mapping(cls, cfg: Mapping[str, Any] | Any, where: str):
  """Build a frozen config dataclass from a mapping (ConfigDict, dict) naming any unknown key."""
  if isinstance(cfg, cls):
    return cfg
  items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(items) - known)
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
  return cls(**items)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """CLIP ViT shapes (HF `CLIPVisionConfig` names) plus compute options. Defaults: ViT-L/14-336."""
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  projection_dim: int = 768       # visual_projection width; 0 = none (LLaVA's bare CLIPVisionModel)
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  dtype: str = "float32"          # compute dtype
  param_dtype: str = "float32"    # master weights
  remat: str = "none"             # "none" or a name in layers.REMAT_POLICIES

  @classmethod
  def from_dict(cls, cfg, where: str = "model.vision") -> "CLIPVisionConfig":
    return _from_mapping(cls, cfg, where)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "CLIPVisionConfig":
    """From a HF `vision_config` dict (config.json); keys HF omits take HF's defaults for ViT-B/32."""
    d = dict(image_size=224, patch_size=32, num_channels=3, hidden_size=768, intermediate_size=3072,
             num_hidden_layers=12, num_attention_heads=12, projection_dim=512, layer_norm_eps=1e-5,
             hidden_act="quick_gelu")
    d.update({k: hf[k] for k in d if k in hf})
    d.update(overrides)
    return cls(**d)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """CLIP text transformer shapes (HF `CLIPTextConfig` names) plus compute options. Defaults: ViT-L/14 text."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  projection_dim: int = 768
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"

  @classmethod
  def from_dict(cls, cfg, where: str = "model.text") -> "CLIPTextConfig":
    return _from_mapping(cls, cfg, where)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "CLIPTextConfig":
    """From a HF `text_config` dict; keys HF omits take HF's defaults (eos 2: the pre-2023 argmax pooling)."""
    d = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=8, max_position_embeddings=77, projection_dim=512, layer_norm_eps=1e-5,
             hidden_act="quick_gelu", eos_token_id=2)
    d.update({k: hf[k] for k in d if k in hf and hf[k] is not None})
    d.update(overrides)
    return cls(**d)


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------
def activation(name: str):
  """The MLP nonlinearities CLIP checkpoints use (HF `hidden_act`)."""
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return functools.partial(jax.nn.gelu, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return functools.partial(jax.nn.gelu, approximate=True)
  raise ValueError(f"hidden_act {name!r} is not supported; use quick_gelu, gelu, gelu_new or gelu_pytorch_tanh")


def _kw(cfg) -> dict:
  return dict(dtype=L.canonical_dtype(cfg.dtype), param_dtype=L.canonical_dtype(cfg.param_dtype))


class Attention(nnx.Module):
  """Multi-head self-attention with biases (CLIP layout); heads kept as an explicit, shardable axis."""

  def __init__(self, dim: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
    hd = dim // heads
    init = nnx.initializers.normal(0.02)
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
    qkv = dict(in_names=("embed",), out_names=("heads", "head_dim"), **kw)
    self.q_proj = L.Dense((dim,), (heads, hd), **qkv)
    self.k_proj = L.Dense((dim,), (heads, hd), **qkv)
    self.v_proj = L.Dense((dim,), (heads, hd), **qkv)
    self.out_proj = L.Dense((heads, hd), (dim,), in_names=("heads", "head_dim"), out_names=("embed",), **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    names = ("act_batch", "act_len", "act_heads", None)
    q, k, v = (L.constrain(f(x), names) for f in (self.q_proj, self.k_proj, self.v_proj))
    return self.out_proj(L.attention(q, k, v, mask))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + fc2(act(fc1(ln2(x))))."""

  def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg)
    d, m = cfg.hidden_size, cfg.intermediate_size
    init = nnx.initializers.normal(0.02)
    self.layer_norm1 = L.LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
    self.self_attn = Attention(d, cfg.num_attention_heads, rngs=rngs, **kw)
    self.layer_norm2 = L.LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
    self.fc1 = L.Dense((d,), (m,), in_names=("embed",), out_names=("mlp",), use_bias=True, kernel_init=init,
                       rngs=rngs, **kw)
    self.fc2 = L.Dense((m,), (d,), in_names=("mlp",), out_names=("embed",), use_bias=True, kernel_init=init,
                       rngs=rngs, **kw)
    self.hidden_act = cfg.hidden_act  # a name, not a function: module statics must compare equal

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    h = activation(self.hidden_act)(self.fc1(self.layer_norm2(x)))
    h = L.constrain(h, ("act_batch", "act_len", "act_mlp"))
    return L.constrain(x + self.fc2(h), ("act_batch", "act_len", "act_embed"))


class Encoder(nnx.Module):
  """`num_hidden_layers` EncoderLayers stacked on a leading `layers` axis and run with lax.scan."""

  def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig, *, rngs: nnx.Rngs):
    self.num_layers = cfg.num_hidden_layers
    self.policy = cfg.remat
    L.remat(lambda x: x, cfg.remat)  # validate the name at construction

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return EncoderLayer(cfg, rngs=rngs)

    self.layers = make(rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, num_layers: int | None = None,
               return_all: bool = False):
    """Runs the first `num_layers` layers (all by default).

    Returns the final hidden states, and with `return_all` also every layer's output stacked as
    (num_layers, B, T, D) (HF `hidden_states[1:]`).
    """
    n = self.num_layers if num_layers is None else num_layers
    graphdef, state = nnx.split(self.layers)
    if n != self.num_layers:
      state = jax.tree.map(lambda a: a[:n], state)

    def body(h, layer_state):
      h = nnx.merge(graphdef, layer_state)(h, mask)
      return h, (h if return_all else None)

    if n == 0:
      return (x, x[None][:0]) if return_all else x
    h, ys = jax.lax.scan(L.remat(body, self.policy), x, state, unroll=L.scan_unroll())
    return (h, ys) if return_all else h


# --------------------------------------------------------------------------------------------------------------
# Position-embedding interpolation (torch bicubic, align_corners=False, A=-0.75)
# --------------------------------------------------------------------------------------------------------------
def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of torch's bicubic resampling (A=-0.75, align_corners=False, edge clamp).

  jax.image.resize's cubic kernel uses A=-0.5, which would not reproduce what HF CLIP does with
  `interpolate_pos_encoding=True`; the weights are static so this is one small matmul.
  """
  a = -0.75
  cc1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1        # |x| <= 1
  cc2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  w = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = scale * (i + 0.5) - 0.5
    x0 = int(np.floor(src))
    t = src - x0
    for off, c in zip((-1, 0, 1, 2), (cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t))):
      w[i, min(max(x0 + off, 0), n_in - 1)] += c
  return w


def interpolate_pos_embed(pos: jax.Array, grid_in: int, grid_hw: tuple[int, int]) -> jax.Array:
  """Resample (1 + grid_in**2, D) CLIP position embeddings to a (gh, gw) patch grid; the class slot is kept."""
  gh, gw = grid_hw
  if (gh, gw) == (grid_in, grid_in):
    return pos
  cls_pos, patch = pos[:1], pos[1:].reshape(grid_in, grid_in, -1)
  wh = jnp.asarray(_cubic_weights(grid_in, gh), jnp.float32)
  ww = jnp.asarray(_cubic_weights(grid_in, gw), jnp.float32)
  out = jnp.einsum("hi,wj,ijd->hwd", wh, ww, patch.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([cls_pos, out.reshape(gh * gw, -1).astype(pos.dtype)], axis=0)


# --------------------------------------------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------------------------------------------
class CLIPVisionTower(nnx.Module):
  """CLIP ViT: patchify, class token, position embeddings, pre-LN, encoder, post-LN, visual_projection."""

  def __init__(self, cfg: CLIPVisionConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
    cfg = CLIPVisionConfig.from_dict(cfg)
    self.cfg = cfg
    kw = _kw(cfg)
    pdt = kw["param_dtype"]
    d, p = cfg.hidden_size, cfg.patch_size
    init = nnx.initializers.normal(0.02)
    # The patch conv (stride = kernel = patch, no bias) in HWIO layout, applied as one einsum over patches.
    self.patch_embedding = nnx.Param(L.sharded(init, (None, None, "patch", "embed"))(
        rngs.params(), (p, p, cfg.num_channels, d), pdt))
    self.class_embedding = nnx.Param(L.sharded(init, ("embed",))(rngs.params(), (d,), pdt))
    self.position_embedding = nnx.Param(
        L.sharded(init, (None, "embed"))(rngs.params(), (cfg.num_patches + 1, d), pdt))
    self.pre_layrnorm = L.LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.post_layernorm = L.LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
    # LLaVA checkpoints hold a bare CLIPVisionModel (no projection): projection_dim = 0 leaves it out.
    self.visual_projection = L.Dense(
        (d,), (cfg.projection_dim,), in_names=("embed",), out_names=(None,), kernel_init=init, rngs=rngs,
        **kw) if cfg.projection_dim else None

  def _layer_count(self, layer: int) -> int:
    """HF hidden_states index (0 = embeddings, L = last layer, negatives from the end) -> layers to run."""
    n = self.cfg.num_hidden_layers
    if not -(n + 1) <= layer <= n:
      raise ValueError(f"vision layer {layer} out of range for a {n}-layer tower (use {-(n + 1)}..{n})")
    return layer % (n + 1)

  def embed(self, images: jax.Array) -> jax.Array:
    """(B, H, W, C) normalised images -> (B, 1 + gh*gw, D) embeddings after pre_layrnorm (hidden_states[0])."""
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
      raise ValueError(f"images must be (B, H, W, {cfg.num_channels}) NHWC, got shape {images.shape}")
    b, hgt, wid, c = images.shape
    p = cfg.patch_size
    gh, gw = hgt // p, wid // p
    if gh == 0 or gw == 0:
      raise ValueError(f"image {hgt}x{wid} is smaller than one {p}x{p} patch")
    dt = L.canonical_dtype(cfg.dtype)
    x = images[:, :gh * p, :gw * p].astype(dt)  # a strided conv drops the remainder too
    x = x.reshape(b, gh, p, gw, p, c)
    x = L.with_weight(lambda x, k: jnp.einsum("bhpwqc,pqcd->bhwd", x, k), x, self.patch_embedding[...],
                      (None, None, "patch", "embed"), dt).reshape(b, gh * gw, -1)  # gathered at use (FSDP)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + interpolate_pos_embed(self.position_embedding[...], cfg.grid, (gh, gw)).astype(dt)
    x = L.constrain(x, ("act_batch", "act_len", "act_embed"))
    return self.pre_layrnorm(x)

  def __call__(self, images: jax.Array, *, layer: int = -1) -> jax.Array:
    """Hidden states (B, 1 + N, D) of `layer` (HF `hidden_states[layer]`); only the layers needed are run."""
    return self.encoder(self.embed(images), num_layers=self._layer_count(layer))

  def all_hidden_states(self, images: jax.Array) -> jax.Array:
    """Every hidden state (L + 1, B, 1 + N, D), like HF `output_hidden_states=True`."""
    x = self.embed(images)
    _, ys = self.encoder(x, return_all=True)
    return jnp.concatenate([x[None], ys], axis=0)

  def project_patches(self, hidden: jax.Array) -> jax.Array:
    """`visual_projection(post_layernorm(h))` per token (TRIM's image side of the CLIP metric)."""
    if self.visual_projection is None:
      raise ValueError("this vision tower has no visual_projection (projection_dim=0, e.g. imported from a "
                       "LLaVA checkpoint); import the CLIPModel checkpoint too (load_hf(..., clip_path=...))")
    return self.visual_projection(self.post_layernorm(hidden))

  def image_embeds(self, images: jax.Array) -> jax.Array:
    """CLIP image embeddings (B, projection_dim) from the class token of the last layer (not normalised)."""
    return self.project_patches(self(images)[:, 0])


class CLIPTextTower(nnx.Module):
  """CLIP text transformer: causal, final LayerNorm, end-of-text pooling, text_projection."""

  def __init__(self, cfg: CLIPTextConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
    cfg = CLIPTextConfig.from_dict(cfg)
    self.cfg = cfg
    kw = _kw(cfg)
    pdt = kw["param_dtype"]
    d = cfg.hidden_size
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Param(
        L.sharded(init, ("vocab", "embed"))(rngs.params(), (cfg.vocab_size, d), pdt))
    self.position_embedding = nnx.Param(
        L.sharded(init, (None, "embed"))(rngs.params(), (cfg.max_position_embeddings, d), pdt))
    self.encoder = Encoder(cfg, rngs=rngs)
    self.final_layer_norm = L.LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
    self.text_projection = L.Dense((d,), (cfg.projection_dim,), in_names=("embed",), out_names=(None,),
                                   kernel_init=init, rngs=rngs, **kw)

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """(B, T) ids -> (B, T, D) states after final_layer_norm (HF `last_hidden_state`)."""
    cfg = self.cfg
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(f"text of {t} tokens exceeds CLIP's {cfg.max_position_embeddings}-token limit; "
                       "truncate it (CLIPTokenizer does)")
    dt = L.canonical_dtype(cfg.dtype)
    x = jnp.take(self.token_embedding[...], input_ids, axis=0).astype(dt)
    x = x + self.position_embedding[...][:t].astype(dt)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]                   # (1, 1, T, T) causal
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]          # and real keys only
    x = self.encoder(x, mask=mask)
    return self.final_layer_norm(x)

  def pool(self, hidden: jax.Array, input_ids: jax.Array) -> jax.Array:
    """End-of-text pooling with HF semantics: argmax id for old configs (eos_token_id == 2), else first eos."""
    if self.cfg.eos_token_id == 2:
      idx = jnp.argmax(input_ids, axis=-1)
    else:
      idx = jnp.argmax((input_ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """CLIP `text_embeds` (B, projection_dim), not normalised."""
    return self.text_projection(self.pool(self.hidden_states(input_ids, attention_mask), input_ids))


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------
class CLIPTokenizer:
  """CLIP BPE from a local `tokenizer.json` (the `tokenizers` library), truncated to 77 and padded to 77.

  Fixed-length padding keeps shapes static under jit; with the causal mask and end-of-text pooling the text
  embedding does not depend on the padding. The pad token is read from a sibling `tokenizer_config.json` when
  present (OpenAI checkpoints pad with `<|endoftext|>`, LAION ones with `!`).
  """

  def __init__(self, path: str, max_length: int = 77, pad_token: str | None = None):
    from tokenizers import Tokenizer  # runtime dependency, imported lazily to keep `import medcg.model` light
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise FileNotFoundError(f"CLIP tokenizer: {file} not found (need a tokenizer.json)")
    try:
      self.tok = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise ValueError(f"CLIP tokenizer: cannot parse {file}: {e}") from e
    if pad_token is None:
      conf = os.path.join(os.path.dirname(file), "tokenizer_config.json")
      if os.path.exists(conf):
        with open(conf) as f:
          pad_token = json.load(f).get("pad_token")
        if isinstance(pad_token, dict):
          pad_token = pad_token.get("content")
      pad_token = pad_token or "<|endoftext|>"
    pad_id = self.tok.token_to_id(pad_token)
    if pad_id is None:
      raise ValueError(f"CLIP tokenizer: pad token {pad_token!r} is not in the vocabulary of {file}")
    self.max_length, self.pad_id = max_length, pad_id
    self.eos_id = self.tok.token_to_id("<|endoftext|>")
    self.tok.enable_truncation(max_length)
    self.tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)

  def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids, attention_mask), both int32 (len(texts), max_length)."""
    enc = self.tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in enc], np.int32)
    mask = np.asarray([e.attention_mask for e in enc], np.int32)
    return ids, mask


# --------------------------------------------------------------------------------------------------------------
# Hugging Face import
# --------------------------------------------------------------------------------------------------------------
def _encoder_rules(param: str, hf_layer: str) -> list[tuple[str, str, hf.Transform]]:
  """Rules for one scanned Encoder at `param` whose HF layers are `hf_layer` (with `{i}`)."""
  out = []
  for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
              "mlp.fc2"):
    ours = sub.replace("mlp.", "")
    out += [(f"{param}.layers.{ours}.kernel", f"{hf_layer}.{sub}.weight", hf.LINEAR),
            (f"{param}.layers.{ours}.bias", f"{hf_layer}.{sub}.bias", hf.IDENTITY)]
  for ln in ("layer_norm1", "layer_norm2"):
    out += [(f"{param}.layers.{ln}.scale", f"{hf_layer}.{ln}.weight", hf.IDENTITY),
            (f"{param}.layers.{ln}.bias", f"{hf_layer}.{ln}.bias", hf.IDENTITY)]
  return out


def _ln_rules(param: str, hf_name: str) -> list[tuple[str, str, hf.Transform]]:
  return [(f"{param}.scale", f"{hf_name}.weight", hf.IDENTITY), (f"{param}.bias", f"{hf_name}.bias", hf.IDENTITY)]


def vision_hf_table(hf_prefix: str = "vision_model.", projection: str | None = "visual_projection.weight",
                    param_prefix: str = "") -> hf.MappingTable:
  """HF CLIPVisionTransformer (under `hf_prefix`) -> CLIPVisionTower params (under `param_prefix`).

  `projection`: the HF name of visual_projection (it sits outside the vision transformer in CLIPModel), or
  None for a tower without one. HF's `position_ids` buffer is not a weight and is ignored.
  """
  p, h = param_prefix, hf_prefix
  entries = [
      (f"{p}patch_embedding", f"{h}embeddings.patch_embedding.weight", hf.CONV),
      (f"{p}class_embedding", f"{h}embeddings.class_embedding", hf.IDENTITY),
      (f"{p}position_embedding", f"{h}embeddings.position_embedding.weight", hf.IDENTITY),
      *_ln_rules(f"{p}pre_layrnorm", f"{h}pre_layrnorm"),
      *_encoder_rules(f"{p}encoder", f"{h}encoder.layers.{{i}}"),
      *_ln_rules(f"{p}post_layernorm", f"{h}post_layernorm"),
  ]
  if projection:
    entries.append((f"{p}visual_projection.kernel", projection, hf.LINEAR))
  return hf.named_table(entries, ignore=(re.escape(f"{h}embeddings.position_ids"),))


def text_hf_table(hf_prefix: str = "text_model.", projection: str = "text_projection.weight",
                  param_prefix: str = "") -> hf.MappingTable:
  """HF CLIPTextTransformer (under `hf_prefix`) + text_projection -> CLIPTextTower params."""
  p, h = param_prefix, hf_prefix
  entries = [
      (f"{p}token_embedding", f"{h}embeddings.token_embedding.weight", hf.IDENTITY),
      (f"{p}position_embedding", f"{h}embeddings.position_embedding.weight", hf.IDENTITY),
      *_encoder_rules(f"{p}encoder", f"{h}encoder.layers.{{i}}"),
      *_ln_rules(f"{p}final_layer_norm", f"{h}final_layer_norm"),
      (f"{p}text_projection.kernel", projection, hf.LINEAR),
  ]
  return hf.named_table(entries, ignore=(re.escape(f"{h}embeddings.position_ids"),))


def clip_configs_from_hf(config: Mapping[str, Any], **overrides) -> tuple[CLIPVisionConfig, CLIPTextConfig]:
  """Vision and text configs of a HF CLIPModel config.json (CLIPModel's projection_dim wins over the towers')."""
  unknown = sorted(set(overrides) - {"dtype", "param_dtype", "remat"})
  if unknown:
    raise TypeError(f"unknown override(s) {unknown}; allowed: dtype, param_dtype, remat")
  proj = config.get("projection_dim", 512)
  vision = CLIPVisionConfig.from_hf(config.get("vision_config") or {}, projection_dim=proj, **overrides)
  text = CLIPTextConfig.from_hf(config.get("text_config") or {}, projection_dim=proj, **overrides)
  return vision, text


def load_state(factory, checkpoint: hf.Checkpoint, table: hf.MappingTable, *, mesh=None, rules=None):
  """Builds the module `factory()` abstractly and fills it from `checkpoint` (sharded on `mesh` if given)."""
  from medcg.train import sharding as sharding_lib
  with sharding_lib.no_mesh():  # under a jax mesh eval_shape would read the logical names as mesh axes
    abstract = nnx.eval_shape(factory)
  graphdef, state = nnx.split(abstract)
  shardings = None
  if mesh is not None:
    from medcg.train import sharding as sharding_lib  # only for sharded loads
    shardings = sharding_lib.param_shardings(state, mesh, rules or sharding_lib.RULES)
  return nnx.merge(graphdef, hf.load_params(state, checkpoint, table, shardings=shardings))


def load_clip(path: str, *, mesh=None, rules=None, **overrides) -> tuple[CLIPVisionTower, CLIPTextTower]:
  """Imports a HF `CLIPModel` safetensors checkpoint directory as (vision tower, text tower).

  `overrides` set compute options on both configs (dtype, param_dtype, remat).
  """
  ckpt = hf.open_checkpoint(path)
  hf.check_architecture(ckpt, ("CLIPModel",))
  vcfg, tcfg = clip_configs_from_hf(ckpt.config, **overrides)
  ignore = hf.named_table([], ignore=("logit_scale",))
  vision = load_state(lambda: CLIPVisionTower(vcfg, rngs=nnx.Rngs(0)), ckpt,
                      vision_hf_table() + ignore + _others(ckpt, ("vision_model.", "visual_projection.")),
                      mesh=mesh, rules=rules)
  text = load_state(lambda: CLIPTextTower(tcfg, rngs=nnx.Rngs(0)), ckpt,
                    text_hf_table() + ignore + _others(ckpt, ("text_model.", "text_projection.")),
                    mesh=mesh, rules=rules)
  return vision, text


def _others(ckpt: hf.Checkpoint, keep: tuple[str, ...]) -> hf.MappingTable:
  """Ignore-table for the tensors of a checkpoint that belong to another sub-model loaded separately."""
  prefixes = sorted({k.split(".")[0] + "." for k in ckpt.keys()} - set(keep))
  return hf.named_table([], ignore=tuple(re.escape(p) + ".*" for p in prefixes))
