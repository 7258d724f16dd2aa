"""Decoder-only LLM: the LLaMA family (LLaMA 1/2/3, Vicuna) and Qwen2, in Flax NNX.

One module covers both: RMSNorm, RoPE (none / linear / dynamic / llama3 scaling), grouped-query
attention through `jax.nn.dot_product_attention`, SwiGLU MLP, tied or untied embeddings; Qwen2 is
`qkv_bias=True`; Qwen2-VL's decoder adds `mrope_section` (multimodal RoPE over (3, B, T) positions). Layers are created stacked by `nnx.vmap` (leading `layers` axis) and run by
`jax.lax.scan`, so compile time does not grow with depth; each layer is rematerialised under the
config's `remat` policy.

Padding convention: any mix of left and right padding works for a full forward (positions are
`cumsum(attention_mask) - 1`). With a KV cache, slots are time steps: prefill writes slots
[0, T), each decode step the next slot; generation left-pads prompts (medcg.model.generate).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from medcg.model import hf
from medcg.model import layers as L

Dense = L.Dense


def make_config(**overrides) -> ml_collections.ConfigDict:
  """An LLM config with LLaMA-2-style defaults; keys documented inline."""
  defaults = dict(
      vocab_size=32000,
      hidden_size=4096,             # embed
      intermediate_size=11008,      # mlp
      num_layers=32,
      num_heads=32,
      num_kv_heads=32,              # < num_heads: grouped-query attention
      head_dim=128,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      rope_scaling=None,            # HF rope_scaling dict: linear / dynamic / llama3
      mrope_section=None,           # Qwen2-VL M-RoPE: frequencies per (temporal, height, width), sum head_dim/2
      max_position_embeddings=4096,
      tie_word_embeddings=False,
      qkv_bias=False,               # Qwen2
      o_bias=False,
      mlp_bias=False,
      bos_token_id=1,
      eos_token_id=2,               # int or list of ints
      pad_token_id=0,
      dtype="float32",              # compute dtype (bfloat16 for speed)
      param_dtype="float32",        # master weights
      remat="none",                 # none | full | dots_saveable | dots_with_no_batch_dims_saveable
      attention_impl="auto",        # auto (cuDNN on GPU in bf16, else XLA) | xla | cudnn
  )
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise KeyError(f"unknown LLM config keys {unknown}; known: {sorted(defaults)}")
  return validate_config(ml_collections.ConfigDict({**defaults, **overrides}))


def validate_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the config keys that must agree; raises naming the key."""
  if cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads="
                     f"{cfg.num_kv_heads}")
  if cfg.head_dim % 2:
    raise ValueError(f"head_dim={cfg.head_dim} must be even for RoPE")
  L.rope_type(cfg.rope_scaling)
  section = cfg.get("mrope_section")
  if section is not None:
    section = tuple(section)
    if not section or any(not isinstance(n, int) or n < 1 for n in section) or sum(section) != cfg.head_dim // 2:
      raise ValueError(f"mrope_section={list(section)} must be positive ints summing to head_dim/2="
                       f"{cfg.head_dim // 2} (one run of rotary frequencies per temporal / height / width position)")
    if L.rope_type(cfg.rope_scaling) != "default":
      raise ValueError(f"mrope_section with rope_scaling {cfg.rope_scaling!r}: M-RoPE takes unscaled frequencies")
  L.check_remat_policy(cfg.remat)
  if (cfg.attention_impl or "auto") not in L.ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={cfg.attention_impl!r}; choose one of {L.ATTENTION_IMPLS}")
  L.canonical_dtype(cfg.dtype)
  L.canonical_dtype(cfg.param_dtype)
  return cfg


def from_hf_config(hf_config: dict, **overrides) -> ml_collections.ConfigDict:
  """`config.json` of a LlamaForCausalLM / Qwen2ForCausalLM -> an LLM config."""
  archs = hf_config.get("architectures") or [hf_config.get("model_type", "?")]
  arch = archs[0]
  if arch not in hf.LLM_ARCHITECTURES:
    raise hf.CheckpointError(f"unsupported architecture {arch!r}; supported: "
                             f"{', '.join(hf.LLM_ARCHITECTURES)}")
  is_qwen = arch == "Qwen2ForCausalLM"
  if is_qwen and hf_config.get("use_sliding_window"):
    raise ValueError("Qwen2 config has use_sliding_window=true, which medcg does not implement")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf_config['hidden_act']!r} is not supported (silu only)")
  # transformers >= 5 nests theta and scaling in rope_parameters; older configs keep them flat.
  rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
  theta = rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
  if rope.get("rope_type", rope.get("type", "default")) == "default":
    rope = None
  heads = hf_config["num_attention_heads"]
  hidden = hf_config["hidden_size"]
  attention_bias = bool(hf_config.get("attention_bias", False))
  cfg = dict(
      vocab_size=hf_config["vocab_size"],
      hidden_size=hidden,
      intermediate_size=hf_config["intermediate_size"],
      num_layers=hf_config["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf_config.get("num_key_value_heads") or heads,
      head_dim=hf_config.get("head_dim") or hidden // heads,
      rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      rope_scaling=rope,
      max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      qkv_bias=True if is_qwen else attention_bias,
      o_bias=False if is_qwen else attention_bias,
      mlp_bias=bool(hf_config.get("mlp_bias", False)),
      bos_token_id=hf_config.get("bos_token_id"),
      eos_token_id=hf_config.get("eos_token_id"),
      pad_token_id=hf_config.get("pad_token_id"),
  )
  cfg.update(overrides)
  return make_config(**cfg)


class KVCache(NamedTuple):
  """Fixed-size decoding cache; slots are time steps shared by the batch.

  k, v: (layers, B, max_len, kv_heads, head_dim); key_mask: (B, max_len) bool, slots holding real
  tokens; index: () int32, the next slot to write; lengths: (B,) int32, the next position id (real tokens
  so far; after explicit positions, e.g. M-RoPE's, their largest + 1).
  """
  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  index: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(cfg, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for `batch_size` sequences of at most `max_len` tokens."""
  dtype = L.canonical_dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((batch_size, max_len), bool), jnp.zeros((), jnp.int32),
                 jnp.zeros((batch_size,), jnp.int32))


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dt, pdt = L.canonical_dtype(cfg.dtype), L.canonical_dtype(cfg.param_dtype)
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
    self.q = Dense((e,), (h, d), in_names=("embed",), out_names=("heads", "head_dim"),
                   use_bias=cfg.qkv_bias, **kw)
    self.k = Dense((e,), (k, d), in_names=("embed",), out_names=("kv_heads", "head_dim"),
                   use_bias=cfg.qkv_bias, **kw)
    self.v = Dense((e,), (k, d), in_names=("embed",), out_names=("kv_heads", "head_dim"),
                   use_bias=cfg.qkv_bias, **kw)
    self.o = Dense((h, d), (e,), in_names=("heads", "head_dim"), out_names=("embed",),
                   use_bias=cfg.o_bias, **kw)
    self.impl = cfg.attention_impl

  def __call__(self, x, *, mask, angles, kv=None, index=None):
    q = L.apply_rope_angles(self.q(x), angles)
    k = L.apply_rope_angles(self.k(x), angles)
    v = self.v(x)
    q = L.constrain(q, ("act_batch", "act_len", "act_heads", None))
    if kv is not None:  # write this step's keys/values into the cache slots [index, index + T)
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
      kv = (k, v)
    out = L.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.impl)
    return self.o(out), kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dt, pdt = L.canonical_dtype(cfg.dtype), L.canonical_dtype(cfg.param_dtype)
    e, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dt, param_dtype=pdt, use_bias=cfg.mlp_bias, rngs=rngs)
    self.gate = Dense((e,), (m,), in_names=("embed",), out_names=("mlp",), **kw)
    self.up = Dense((e,), (m,), in_names=("embed",), out_names=("mlp",), **kw)
    self.down = Dense((m,), (e,), in_names=("mlp",), out_names=("embed",), **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate(x)) * self.up(x)
    return self.down(L.constrain(h, ("act_batch", "act_len", "act_mlp")))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dt, pdt = L.canonical_dtype(cfg.dtype), L.canonical_dtype(cfg.param_dtype)
    norm = dict(eps=cfg.rms_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.input_norm = L.RMSNorm(cfg.hidden_size, **norm)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = L.RMSNorm(cfg.hidden_size, **norm)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, **attn_kw):
    h, kv = self.attn(self.input_norm(x), **attn_kw)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    return L.constrain(x, ("act_batch", "act_len", "act_embed")), kv


class LLM(nnx.Module):
  """Decoder-only LM. `llm(input_ids | inputs_embeds, attention_mask=...) -> (logits, cache)`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = validate_config(cfg)
    self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: part of the static graphdef
    dt, pdt = L.canonical_dtype(cfg.dtype), L.canonical_dtype(cfg.param_dtype)
    self.embed = L.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return DecoderLayer(cfg, rngs=rngs)

    self.layers = make_layers(rngs)
    self.final_norm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dt, param_dtype=pdt,
                                rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else Dense(
        (cfg.hidden_size,), (cfg.vocab_size,), in_names=("embed",), out_names=("vocab",),
        dtype=dt, param_dtype=pdt, rngs=rngs)
    # A constant of the config, not state: checkpoints and optimizers never see it.
    self.inv_freq = tuple(float(f) for f in L.rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                            cfg.rope_scaling))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final hidden states (already normed) -> float32 logits."""
    if self.lm_head is None:
      out = self.embed.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return L.constrain(out.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

  def _inv_freq(self, positions: jax.Array) -> jax.Array:
    cfg = self.cfg
    inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
    if L.rope_type(cfg.rope_scaling) == "dynamic":
      orig = cfg.rope_scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
      inv_freq = L.dynamic_ntk_inv_freq(inv_freq, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                        orig, jnp.max(positions) + 1)
    return inv_freq

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               cache: KVCache | None = None, return_hidden: bool = False):
    """Forward pass.

    input_ids (B, T) int or inputs_embeds (B, T, embed); attention_mask (B, T), 1 on real tokens
    (default all ones); positions (B, T) (default `cumsum(mask) - 1`, continuing from the cache), or (3, B, T)
    multimodal positions with `mrope_section` (Qwen2-VL; `medcg.model.mrope`). After explicit positions the
    cache continues each row at its largest position + 1 (HF's rope deltas).
    With `cache`, this step's keys/values go to slots [cache.index, cache.index + T) and queries
    attend to every earlier real slot. Returns (float32 logits (B, T, vocab), new cache or None);
    with `return_hidden`, the final-normed hidden states instead of logits.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.embed.dtype)
    b, t = x.shape[:2]
    x = L.constrain(x, ("act_batch", "act_len", "act_embed"))
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
    explicit = positions is not None
    if positions is None:
      positions = start[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    angles = L.rope_angles(positions, self._inv_freq(positions), self.cfg.get("mrope_section"))

    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      attn_mask = causal[None, None] & mask[:, None, None, :]
      index, kvs = None, None
    else:
      index = cache.index
      key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, index))
      slots = jnp.arange(cache.max_len)
      causal = slots[None, :] <= (index + jnp.arange(t))[:, None]          # (T, S)
      attn_mask = causal[None, None] & key_mask[:, None, None, :]
      kvs = (cache.k, cache.v)

    graphdef, state = nnx.split(self.layers)

    def layer_fn(x, layer_state, kv):
      layer = nnx.merge(graphdef, layer_state)
      return layer(x, mask=attn_mask, angles=angles, kv=kv, index=index)

    layer_fn = L.remat(layer_fn, self.cfg.remat)

    def body(x, xs):
      layer_state, kv = xs
      x, kv = layer_fn(x, layer_state, kv)
      return x, kv

    x, new_kvs = jax.lax.scan(body, x, (state, kvs), unroll=L.scan_unroll())
    x = self.final_norm(x)
    out = x if return_hidden else self.logits(x)
    new_cache = None
    if cache is not None:
      lengths = cache.lengths + mask.sum(axis=1, dtype=jnp.int32)
      if explicit:  # the next position follows the largest one given (M-RoPE images span fewer positions)
        per_token = positions.max(axis=0) if positions.ndim == 3 else positions
        last = jnp.max(jnp.where(mask, per_token, -1), axis=1).astype(jnp.int32)
        lengths = jnp.where(mask.any(axis=1), last + 1, cache.lengths)
      new_cache = KVCache(new_kvs[0], new_kvs[1], key_mask, index + t, lengths)
    return out, new_cache


def model_flops_per_token(cfg, seq_len: int, *, training: bool = False) -> float:
  """Model FLOPs per token for MFU: 2 x matmul params + attention (causal: half, as MaxText).

  Embedding lookups are free; the LM head counts. `training=True` is 3x forward (fwd + bwd).
  """
  e, h, k, d, m = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size)
  per_layer = e * h * d * 2 + e * k * d * 2 + 3 * e * m
  matmul = 2 * (cfg.num_layers * per_layer + e * cfg.vocab_size)
  # QK^T and AV: 2 matmuls x 2 FLOPs x seq_len x heads x head_dim, halved by the causal mask.
  attn = cfg.num_layers * 2 * 2 * seq_len * h * d * 0.5
  forward = float(matmul + attn)
  return 3 * forward if training else forward


def model_flops_per_example(cfg, seq_len: int, *, training: bool = False) -> float:
  """`model_flops_per_token` x `seq_len`: the FLOPs of one sequence of `seq_len` tokens."""
  return model_flops_per_token(cfg, seq_len, training=training) * seq_len


def abstract_model(cfg) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract params) without allocating anything."""
  from medcg.train import sharding as sharding_lib
  with sharding_lib.no_mesh():  # under a jax mesh eval_shape would read the logical names as mesh axes
    model = nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param)


def load_hf(path: str, *, mesh: jax.sharding.Mesh | None = None, rules=None, **overrides) -> LLM:
  """Loads a local HF LlamaForCausalLM / Qwen2ForCausalLM safetensors checkpoint into an `LLM`.

  `overrides` set config keys (dtype, param_dtype, remat, ...). With `mesh` (and a logical `rules`
  table, default medcg.train.sharding.RULES) every param is created with its NamedSharding and each host
  reads only its slices; without, params land on the default device.
  """
  ckpt = hf.open_checkpoint(path)
  hf.check_architecture(ckpt, hf.LLM_ARCHITECTURES)
  cfg = from_hf_config(ckpt.config, **overrides)
  graphdef, params = abstract_model(cfg)
  shardings = None
  if mesh is not None:
    from medcg.train import sharding as sharding_lib
    shardings = sharding_lib.param_shardings(params, mesh, rules or sharding_lib.RULES)
  loaded = hf.load_params(params, ckpt, hf.llm_table(cfg), shardings=shardings)
  return nnx.merge(graphdef, loaded)


__all__ = ["KVCache", "LLM", "from_hf_config", "init_cache", "load_hf", "make_config",
           "model_flops_per_example", "model_flops_per_token"]
