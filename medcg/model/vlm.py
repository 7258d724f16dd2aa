"""The LLaVA-1.5 vision-language model: CLIP vision tower -> (TRIM) -> mlp2x_gelu projector -> decoder LLM.

The image features of `vision_select_layer` (-2: the penultimate layer, as LLaVA-1.5) go through the projector
and replace, in order, the `image_token_id` placeholders of each prompt; every example holds exactly
`num_image_tokens` of them wherever its prompt puts them, so shapes stay static and prompts of different
lengths batch together. With TRIM (`medcg.kernels.trim`), the patch features are reduced before the projector to
`k_max + 1` slots per image; slots beyond an example's count are masked out of attention, and positions are
`cumsum(mask) - 1`, so the decoder sees exactly the compacted sequence the released TRIM code builds.

This module is also the front door for every model family (`model.family`: "llava" here, "qwen2_vl" in
medcg.model.qwen_vl): `build`, `num_image_tokens`, `validate_config`, `model_flops`, `config_from_hf`, `load_vlm`,
and the family-agnostic `generate` / `score_options` (DEVELOPING.md "Model families").
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from medcg.model import clip
from medcg.model import generate as generate_lib
from medcg.model import hf
from medcg.model import image_slots
from medcg.model import layers as L
from medcg.model import llm as llm_lib
from medcg.model import qwen_vl

SELECT_FEATURES = ("patch", "full")
# model.family values; "llava" when the key is absent (configs written before Qwen2-VL).
FAMILIES = ("llava", qwen_vl.FAMILY)


def _get(cfg: Any, key: str, default=None):
  if cfg is None:
    return default
  if hasattr(cfg, "get"):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def trim_enabled(trim: Any) -> bool:
  """Whether a `trim` config section (ConfigDict / dict / None) turns TRIM on."""
  return bool(_get(trim, "enabled", False))


def family(cfg: Any) -> str:
  """The model family of a `model` config section: "llava" (CLIP + projector + LLaMA/Qwen2) or "qwen2_vl"."""
  name = _get(cfg, "family", None) or "llava"
  if name not in FAMILIES:
    raise ValueError(f"model.family={name!r}: expected one of {FAMILIES}")
  return name


def num_image_tokens(cfg: Any, trim: Any = None) -> int:
  """Placeholder tokens per image in the prompt: patches (+1 with the class token), or k_max + 1 with TRIM;
  for Qwen2-VL the merged tokens of the static grid."""
  if family(cfg) == qwen_vl.FAMILY:
    return qwen_vl.num_image_tokens(cfg)
  if trim_enabled(trim):
    return int(_get(trim, "k_max")) + 1
  vision = clip.CLIPVisionConfig.from_dict(cfg.vision)
  return vision.num_patches + (1 if cfg.vision_select_feature == "full" else 0)


def validate_config(cfg: ml_collections.ConfigDict, trim: Any = None) -> ml_collections.ConfigDict:
  """Checks the keys that must agree across towers; raises naming the key."""
  if family(cfg) == qwen_vl.FAMILY:
    return qwen_vl.validate_config(cfg, trim)
  vision = clip.CLIPVisionConfig.from_dict(cfg.vision, "model.vision")
  llm_lib.validate_config(cfg.llm)
  if cfg.vision_select_feature not in SELECT_FEATURES:
    raise ValueError(f"model.vision_select_feature={cfg.vision_select_feature!r}: expected one of "
                     f"{SELECT_FEATURES}")
  n = vision.num_hidden_layers
  if not -(n + 1) <= cfg.vision_select_layer <= n:
    raise ValueError(f"model.vision_select_layer={cfg.vision_select_layer} is out of range for a {n}-layer "
                     "vision tower")
  clip.activation(cfg.projector_hidden_act)
  if trim_enabled(trim):
    if cfg.get("text") is None:
      raise ValueError("trim.enabled needs model.text (the CLIP text tower that embeds the question)")
    text = clip.CLIPTextConfig.from_dict(cfg.text, "model.text")
    if not vision.projection_dim:
      raise ValueError("trim.enabled needs model.vision.projection_dim > 0 (CLIP's visual_projection)")
    if text.projection_dim != vision.projection_dim:
      raise ValueError(f"model.text.projection_dim={text.projection_dim} != model.vision.projection_dim="
                       f"{vision.projection_dim}: TRIM scores patches against the text in one space")
    if cfg.vision_select_feature != "patch":
      raise ValueError("trim.enabled needs model.vision_select_feature='patch' (TRIM reduces patch tokens)")
    k_max = _get(trim, "k_max")
    if k_max is None or not 0 <= int(k_max) <= vision.num_patches:
      raise ValueError(f"trim.k_max={k_max!r} must be in [0, {vision.num_patches}] (the patch count)")
  return cfg


class Projector(nnx.Module):
  """LLaVA-1.5 `mlp2x_gelu`: linear_1 (vision width -> LLM width), GELU, linear_2."""

  def __init__(self, din: int, dout: int, *, act: str, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = L.Dense((din,), (dout,), in_names=("embed",), out_names=("mlp",), **kw)
    self.linear_2 = L.Dense((dout,), (dout,), in_names=("mlp",), out_names=("embed",), **kw)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(clip.activation(self.act)(self.linear_1(x)))


class VLM(nnx.Module):
  """`vlm(images, input_ids, attention_mask, text_ids=None) -> logits (B, L, V)` (float32).

  cfg: the `model` config section (`configs/models.py`); trim: the `trim` section, or None (TRIM off).
  With TRIM on, the model also holds the CLIP text tower and `text_ids` (B, <=77) are the CLIP-tokenized
  question texts (`clip.CLIPTokenizer`).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, trim: Any = None):
    validate_config(cfg, trim)
    self.cfg = ml_collections.FrozenConfigDict(cfg)
    self.trim_cfg = ml_collections.FrozenConfigDict(trim) if trim_enabled(trim) else None
    vision = clip.CLIPVisionConfig.from_dict(cfg.vision)
    self.vision = clip.CLIPVisionTower(vision, rngs=rngs)
    self.text = clip.CLIPTextTower(cfg.text, rngs=rngs) if self.trim_cfg is not None else None
    self.projector = Projector(
        vision.hidden_size, cfg.llm.hidden_size, act=cfg.projector_hidden_act, use_bias=cfg.projector_bias,
        dtype=L.canonical_dtype(cfg.llm.dtype), param_dtype=L.canonical_dtype(cfg.llm.param_dtype), rngs=rngs)
    self.llm = llm_lib.LLM(cfg.llm, rngs=rngs)
    self.image_token_id = int(cfg.image_token_id)
    self.num_image_tokens = num_image_tokens(cfg, trim)

  # ---------------------------------------------------------------------------------------------- pieces
  def image_features(self, images: jax.Array, text_ids: jax.Array | None = None):
    """(B, H, W, 3) images -> (projected features (B, S, E), slot mask (B, S) bool or None).

    S = num_image_tokens. Without TRIM every slot is valid (mask None).
    """
    h = self.vision(images, layer=self.cfg.vision_select_layer)
    if self.cfg.vision_select_feature == "patch":
      h = h[:, 1:]
    mask = None
    if self.trim_cfg is not None:
      h, mask = self.reduce_tokens(h, text_ids)
    return self.projector(h), mask

  def reduce_tokens(self, patches: jax.Array, text_ids: jax.Array | None):
    """TRIM hook: (B, N, D) patch features -> (B, k_max + 1, D) kept + mean token, and the slot mask.

    Under the trainer's mesh (`sharding.use_mesh`) the Pallas kernels run per batch shard (`trim.trim` wraps them
    in shard_map over the act_batch axes), so mode "iqr_batch" pools each shard's examples there.
    """
    from medcg.kernels import trim as trim_lib  # only models with TRIM on need the kernels
    if text_ids is None:
      raise ValueError("TRIM is on: pass text_ids (the CLIP-tokenized question) to the VLM; batches carry "
                       "them when data.clip_text.enabled (medcg.data.pipeline.with_clip_text)")
    # The scores only pick tokens (the released code runs this under torch.no_grad): no gradient through them.
    text_embeds = jax.lax.stop_gradient(self.text(text_ids))
    image_embeds = jax.lax.stop_gradient(self.vision.project_patches(patches))
    tokens, _, mask = trim_lib.trim_features(self.trim_cfg, patches, image_embeds, text_embeds)
    return tokens.astype(patches.dtype), mask

  def embed_inputs(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                   text_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Prefill hook: (inputs_embeds (B, L, E), attention_mask (B, L) int32) for `self.llm`.

    The k-th image placeholder of each row receives the k-th image slot; TRIM's unused slots get mask 0.
    """
    image_slots.check_placeholders(input_ids, self.image_token_id, self.num_image_tokens)
    feats, slot_mask = self.image_features(images, text_ids)
    return self.splice(feats, slot_mask, input_ids, attention_mask)

  def splice(self, feats: jax.Array, slot_mask: jax.Array | None, input_ids: jax.Array,
             attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`embed_inputs` from features `image_features` already computed (so option scoring encodes once)."""
    return image_slots.splice(self.llm.embed, self.image_token_id, self.num_image_tokens, feats, slot_mask,
                              input_ids, attention_mask)

  def language_forward(self, feats: jax.Array, slot_mask: jax.Array | None, input_ids: jax.Array,
                       attention_mask: jax.Array, cache: llm_lib.KVCache | None = None):
    """Image features spliced into the prompt, through the decoder: (logits, cache or None, effective mask).

    The family interface the shared decoding and scoring code uses (`medcg.model.qwen_vl.QwenVLM` has the same).
    """
    embeds, mask = self.splice(feats, slot_mask, input_ids, attention_mask)
    logits, cache = self.llm(inputs_embeds=embeds, attention_mask=mask, cache=cache)
    return logits, cache, mask

  # ---------------------------------------------------------------------------------------------- forward
  def __call__(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               text_ids: jax.Array | None = None) -> jax.Array:
    embeds, mask = self.embed_inputs(images, input_ids, attention_mask, text_ids)
    logits, _ = self.llm(inputs_embeds=embeds, attention_mask=mask)
    return logits

  def prefill(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
              cache: llm_lib.KVCache, text_ids: jax.Array | None = None):
    """Runs the prompt into `cache` (see llm.KVCache): (logits (B, L, V), cache, effective mask)."""
    embeds, mask = self.embed_inputs(images, input_ids, attention_mask, text_ids)
    logits, cache = self.llm(inputs_embeds=embeds, attention_mask=mask, cache=cache)
    return logits, cache, mask




def answer_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
  """Next-token cross-entropy on answer tokens only (DEVELOPING.md loss_mask contract).

  The loss of `logits[:, t-1]` against `input_ids[:, t]` is weighted by `loss_mask[:, t]`; returns the
  weighted mean and {"loss", "accuracy", "tokens"}.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = jnp.clip(input_ids[:, 1:], 0, logits.shape[-1] - 1)  # placeholders past the vocab carry weight 0
  weights = loss_mask[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  tokens = weights.sum()
  denom = jnp.maximum(tokens, 1.0)
  loss = jnp.sum(ce * weights) / denom
  accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / denom
  return loss, {"loss": loss, "accuracy": accuracy, "tokens": tokens}


# -------------------------------------------------------------------------------------------------- FLOPs
def _encoder_flops(tokens: int, layers: int, width: int, mlp: int, *, causal: bool) -> float:
  """Forward FLOPs of `layers` transformer layers (2 x matmul params per token + attention scores)."""
  matmul = 2 * tokens * layers * (4 * width * width + 2 * width * mlp)
  attn = layers * 2 * 2 * tokens * tokens * width * (0.5 if causal else 1.0)
  return float(matmul + attn)


def model_flops(cfg: ml_collections.ConfigDict, seq_len: int, *, training: bool = False, trim: Any = None,
                train_vision: bool = False) -> float:
  """Model FLOPs per example for MFU: vision tower (+ TRIM's text tower and projection), projector, LLM.

  `training`: backward counts 2x forward for the trained parts (LLM, projector, and the vision tower only
  with `train_vision`; LLaVA-1.5 freezes it, so it costs one forward). Layers past `vision_select_layer` are
  never run, so they are not counted. Attention FLOPs are halved for causal masks (MaxText convention).
  Qwen2-VL: `qwen_vl.model_flops` (the merger is trained like the projector).
  """
  if family(cfg) == qwen_vl.FAMILY:
    return qwen_vl.model_flops(cfg, seq_len, training=training, train_vision=train_vision)
  v = clip.CLIPVisionConfig.from_dict(cfg.vision)
  layers = v.num_hidden_layers + 1 + cfg.vision_select_layer if cfg.vision_select_layer < 0 \
      else cfg.vision_select_layer
  tokens = v.num_patches + 1
  vision = 2 * v.num_patches * v.patch_size ** 2 * v.num_channels * v.hidden_size
  vision += _encoder_flops(tokens, layers, v.hidden_size, v.intermediate_size, causal=False)
  frozen = 0.0
  if trim_enabled(trim):
    t = clip.CLIPTextConfig.from_dict(cfg.text)
    frozen += _encoder_flops(t.max_position_embeddings, t.num_hidden_layers, t.hidden_size, t.intermediate_size,
                             causal=True) + 2 * t.hidden_size * t.projection_dim
    frozen += 2 * v.num_patches * v.hidden_size * v.projection_dim
  slots = num_image_tokens(cfg, trim)
  projector = 2 * slots * (v.hidden_size * cfg.llm.hidden_size + cfg.llm.hidden_size ** 2)
  decoder = seq_len * llm_lib.model_flops_per_token(cfg.llm, seq_len)
  trained = projector + decoder + (vision if train_vision else 0.0)
  fixed = frozen + (0.0 if train_vision else vision)
  return float(fixed + (3 * trained if training else trained))




# -------------------------------------------------------------------------------------------------- decoding
@functools.partial(jax.jit, static_argnames=("max_new_tokens", "eos_ids", "pad_id", "temperature", "top_p"))
def _generate(model, images, input_ids, attention_mask, text_ids, rng, *, max_new_tokens, eos_ids, pad_id,
              temperature, top_p):
  ids, mask = generate_lib.left_pad(input_ids, attention_mask, pad_id)
  batch, length = ids.shape
  cache = llm_lib.init_cache(model.llm.cfg, batch, length + max_new_tokens)
  logits, cache, _ = model.prefill(images, ids, mask, cache, text_ids)
  ones = jnp.ones((batch, 1), jnp.int32)

  def step_fn(token, cache):
    return model.llm(token, attention_mask=ones, cache=cache)

  return generate_lib.decode(step_fn, logits[:, -1], cache, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                             pad_id=pad_id, temperature=temperature, top_p=top_p, rng=rng)


def build(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, trim: Any = None):
  """The model of a `model` config section, whichever family (`VLM` for LLaVA, `qwen_vl.QwenVLM`)."""
  if family(cfg) == qwen_vl.FAMILY:
    return qwen_vl.QwenVLM(cfg, rngs=rngs, trim=trim)
  return VLM(cfg, rngs=rngs, trim=trim)


def generate(model: VLM, images, input_ids, attention_mask=None, *, text_ids=None, max_new_tokens: int,
             eos_ids: int | Sequence[int] | None = None, pad_id: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Batched generation from a VLM of either family (image prefill + `generate.decode`); any padding.

  Returns (tokens (B, max_new_tokens), lengths (B,)) as `medcg.model.generate.generate` does.
  """
  cfg = model.llm.cfg
  eos = generate_lib._eos_tuple(cfg.eos_token_id if eos_ids is None else eos_ids)
  pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  image_slots.check_placeholders(input_ids, model.image_token_id, model.num_image_tokens)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, jnp.asarray(images), input_ids, mask, text_ids, rng,
                   max_new_tokens=int(max_new_tokens), eos_ids=eos, pad_id=int(pad),
                   temperature=float(temperature), top_p=float(top_p))


@jax.jit
def score_options(model: VLM, images, prompt_ids, prompt_mask, option_ids, option_mask, text_ids=None):
  """Multiple choice by option log-likelihood: (sum, mean) log-prob (B, O) of each option given image + prompt.

  The vision tower (and TRIM) runs once per example; its features are repeated for the O option rows.
  """
  num_options = option_ids.shape[1]
  image_slots.check_placeholders(prompt_ids, model.image_token_id, model.num_image_tokens)
  rep = lambda x: None if x is None else jnp.repeat(x, num_options, axis=0)
  feats, slot_mask = model.image_features(images, text_ids)
  feats, slot_mask = rep(feats), rep(slot_mask)

  def forward(ids, mask):
    return model.language_forward(feats, slot_mask, ids, mask)[0]

  return generate_lib.score_options(forward, prompt_ids, prompt_mask, option_ids, option_mask)


# -------------------------------------------------------------------------------------------------- HF import
_LLAVA_TEXT_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ARCHITECTURES = (("LlavaForConditionalGeneration",) + tuple(qwen_vl.ARCHITECTURES) + ("CLIPModel",)
                           + hf.LLM_ARCHITECTURES)
VLM_ARCHITECTURES = SUPPORTED_ARCHITECTURES[:3]


def config_from_llava(hf_config: Mapping[str, Any], clip_config: Mapping[str, Any] | None = None,
                      **overrides) -> ml_collections.ConfigDict:
  """The `model` section for a HF LlavaForConditionalGeneration config.json.

  `clip_config`: a CLIPModel config.json whose text tower and visual_projection TRIM uses (None: no TRIM).
  `overrides` (dtype, param_dtype, remat) apply to every tower.
  """
  where = "LlavaForConditionalGeneration config.json"
  unknown = sorted(set(overrides) - {"dtype", "param_dtype", "remat"})
  if unknown:
    raise TypeError(f"unknown override(s) {unknown}; allowed: dtype, param_dtype, remat")
  text = dict(hf_config.get("text_config") or {})
  model_type = text.get("model_type", "llama")
  if not text.get("architectures"):
    if model_type not in _LLAVA_TEXT_ARCHS:
      raise hf.CheckpointError(f"{where}: language model type {model_type!r} is not supported; supported: "
                               f"{', '.join(_LLAVA_TEXT_ARCHS)}")
    text["architectures"] = [_LLAVA_TEXT_ARCHS[model_type]]
  layer = hf_config.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise hf.CheckpointError(f"{where}: vision_feature_layer={layer!r}; only a single layer is supported")
  strategy = hf_config.get("vision_feature_select_strategy", "default")
  if strategy not in ("default", "full"):
    raise hf.CheckpointError(f"{where}: vision_feature_select_strategy={strategy!r} is not default/full")
  tower_overrides = {k: overrides[k] for k in ("dtype", "param_dtype", "remat") if k in overrides}
  llm_cfg = llm_lib.from_hf_config(text, **tower_overrides)
  vision_hf = dict(hf_config.get("vision_config") or {})
  if vision_hf.get("model_type", "clip_vision_model") != "clip_vision_model":
    raise hf.CheckpointError(f"{where}: vision tower {vision_hf.get('model_type')!r} is not supported "
                             "(CLIP only)")
  proj = 0 if clip_config is None else clip_config.get("projection_dim", 512)
  vision = clip.CLIPVisionConfig.from_hf(vision_hf, projection_dim=proj, **tower_overrides)
  text_tower = None
  if clip_config is not None:
    text_tower = ml_collections.ConfigDict(dataclasses.asdict(clip.CLIPTextConfig.from_hf(
        clip_config.get("text_config") or {}, projection_dim=proj, **tower_overrides)))
  image_token = hf_config.get("image_token_index", hf_config.get("image_token_id", 32000))
  return ml_collections.ConfigDict(dict(
      vision=ml_collections.ConfigDict(dataclasses.asdict(vision)), text=text_tower, llm=llm_cfg,
      projector_hidden_act=hf_config.get("projector_hidden_act", "gelu"),
      projector_bias=bool(hf_config.get("multimodal_projector_bias", True)),
      vision_select_layer=layer, vision_select_feature="patch" if strategy == "default" else "full",
      image_token_id=int(image_token)))


def llava_prefixes(checkpoint: hf.Checkpoint) -> dict[str, str]:
  """Where each part of a LLaVA checkpoint lives; three layouts exist in the wild.

    Hub llava-hf (transformers < 4.52): vision_tower.vision_model.*, multi_modal_projector.*,
                                        language_model.model.*, language_model.lm_head.weight
    transformers 4.52 - 4.x save:       model.vision_tower.vision_model.*, model.multi_modal_projector.*,
                                        model.language_model.*, lm_head.weight
    transformers 5 save:                vision_tower.* (no vision_model.), multi_modal_projector.*,
                                        language_model.model.*, language_model.lm_head.weight
  """
  prefix = lambda suffix, what: hf.unique_prefix(checkpoint, suffix, what)
  out = dict(vision=prefix("embeddings.class_embedding", "vision tower"),
             projector=prefix("multi_modal_projector.linear_1.weight", "projector") + "multi_modal_projector.",
             lm=prefix("embed_tokens.weight", "language model"))
  heads = [k for k in checkpoint.keys() if k.endswith("lm_head.weight")]
  out["lm_head"] = heads[0] if len(heads) == 1 else "lm_head.weight"
  return out


def llava_table(cfg: ml_collections.ConfigDict, prefixes: Mapping[str, str]) -> hf.MappingTable:
  """HF LlavaForConditionalGeneration -> VLM params (without TRIM's text tower and visual_projection)."""
  vision = clip.vision_hf_table(prefixes["vision"], projection=None, param_prefix="vision.")
  names = ("linear_1", "linear_2")
  proj = [(f"projector.{n}.kernel", f"{prefixes['projector']}{n}.weight", hf.LINEAR) for n in names]
  if cfg.projector_bias:
    proj += [(f"projector.{n}.bias", f"{prefixes['projector']}{n}.bias", hf.IDENTITY) for n in names]
  lm = hf.llm_table(cfg.llm).prefixed("llm.", {"model.": prefixes["lm"], "lm_head.weight": prefixes["lm_head"]})
  return vision + hf.named_table(proj) + lm


def _split_state(state: nnx.State, predicate) -> tuple[nnx.State, nnx.State]:
  flat = list(nnx.to_flat_state(state))
  dotted = lambda path: ".".join(str(k) for k in path)
  yes = [(p, v) for p, v in flat if predicate(dotted(p))]
  no = [(p, v) for p, v in flat if not predicate(dotted(p))]
  return nnx.from_flat_state(yes), nnx.from_flat_state(no)


def load_llava(path: str, *, clip_path: str | None = None, trim: Any = None, mesh=None, rules=None,
               **overrides) -> VLM:
  """Imports a HF LlavaForConditionalGeneration safetensors checkpoint as a `VLM`.

  TRIM (`trim.enabled`) also needs CLIP's text tower and visual_projection, which LLaVA checkpoints do not
  hold: pass `clip_path`, the CLIPModel checkpoint of the same vision tower (openai/clip-vit-large-patch14-336).
  """
  ckpt = hf.open_checkpoint(path)
  hf.check_architecture(ckpt, ("LlavaForConditionalGeneration",))
  clip_ckpt = None
  if clip_path is not None:
    clip_ckpt = hf.open_checkpoint(clip_path)
    hf.check_architecture(clip_ckpt, ("CLIPModel",))
  elif trim_enabled(trim):
    raise ValueError("trim.enabled with a LLaVA checkpoint needs clip_path: the CLIPModel checkpoint that "
                     "provides TRIM's text tower and visual_projection")
  cfg = config_from_llava(ckpt.config, None if clip_ckpt is None else clip_ckpt.config, **overrides)
  from medcg.train import sharding as sharding_lib
  with sharding_lib.no_mesh():  # shapes only; shardings come from the rules table below
    abstract = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0), trim=trim))
  graphdef, state = nnx.split(abstract)
  shardings = None
  if mesh is not None:
    shardings = sharding_lib.param_shardings(state, mesh, rules or sharding_lib.RULES)
  from_clip = lambda p: p.startswith("text.") or p.startswith("vision.visual_projection.")
  clip_state, llava_state = _split_state(state, from_clip)
  clip_shardings, llava_shardings = (None, None) if shardings is None else _split_state(shardings, from_clip)
  loaded = [hf.load_params(llava_state, ckpt, llava_table(cfg, llava_prefixes(ckpt)), shardings=llava_shardings)]
  if clip_ckpt is not None:
    others = hf.named_table([], ignore=(r"vision_model\..*", "logit_scale"))
    table = (clip.text_hf_table(param_prefix="text.") + others if trim_enabled(trim) else
             hf.named_table([], ignore=(r"text_model\..*", r"text_projection\..*", "logit_scale",
                                        r"vision_model\..*")))
    table += hf.named_table([("vision.visual_projection.kernel", "visual_projection.weight", hf.LINEAR)])
    loaded.append(hf.load_params(clip_state, clip_ckpt, table, shardings=clip_shardings))
  return nnx.merge(graphdef, *loaded)


def config_from_hf(hf_config: Mapping[str, Any], clip_config: Mapping[str, Any] | None = None, *,
                   image_size: int | None = None, **overrides) -> ml_collections.ConfigDict:
  """The `model` section of a LLaVA or Qwen2-VL checkpoint's config.json, by its `architectures` entry."""
  arch = (hf_config.get("architectures") or ["?"])[0]
  if arch in qwen_vl.ARCHITECTURES:
    if clip_config is not None:
      raise ValueError(f"{arch}: a CLIP checkpoint (train.init_from_clip) serves TRIM, which Qwen2-VL does not use")
    return qwen_vl.config_from_hf(hf_config, **({} if image_size is None else {"image_size": image_size}),
                                  **overrides)
  if arch != "LlavaForConditionalGeneration":
    raise hf.CheckpointError(f"config.json architecture {arch!r} is not a vision-language model medcg trains; "
                             f"supported: {', '.join(VLM_ARCHITECTURES)}")
  return config_from_llava(hf_config, clip_config, **overrides)


def load_vlm(path: str, *, image_size: int | None = None, clip_path: str | None = None, trim: Any = None, mesh=None,
             rules=None, **overrides):
  """A vision-language checkpoint of either family (`VLM_ARCHITECTURES`), for the trainer and the judge.

  `image_size`: Qwen2-VL's static side (default 448); `clip_path`: LLaVA + TRIM's CLIP checkpoint.
  """
  arch = hf.check_architecture(hf.open_checkpoint(path), VLM_ARCHITECTURES)
  if arch in qwen_vl.ARCHITECTURES:
    if clip_path:
      raise ValueError(f"{path} is a {arch}: train.init_from_clip (TRIM's CLIP towers) applies to LLaVA only")
    kw = {} if image_size is None else {"image_size": image_size}
    return qwen_vl.load_qwen_vl(path, trim=trim, mesh=mesh, rules=rules, **kw, **overrides)
  return load_llava(path, clip_path=clip_path, trim=trim, mesh=mesh, rules=rules, **overrides)


def load_hf(path: str, **kwargs):
  """Imports a local Hugging Face safetensors checkpoint directory by its `architectures` entry.

    LlavaForConditionalGeneration -> VLM  (kwargs: clip_path, trim, mesh, rules, dtype, param_dtype, remat)
    Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration -> qwen_vl.QwenVLM
                                     (kwargs: image_size, trim, mesh, rules, dtype, param_dtype, remat)
    CLIPModel                     -> (CLIPVisionTower, CLIPTextTower)
    LlamaForCausalLM / Qwen2ForCausalLM -> llm.LLM

  With `mesh` every param is created with its NamedSharding and each host reads only its slices.
  Anything else raises `hf.CheckpointError` naming the architecture and the supported ones.
  """
  arch = hf.check_architecture(hf.open_checkpoint(path), SUPPORTED_ARCHITECTURES)
  if arch == "LlavaForConditionalGeneration":
    return load_llava(path, **kwargs)
  if arch in qwen_vl.ARCHITECTURES:
    return qwen_vl.load_qwen_vl(path, **kwargs)
  if arch == "CLIPModel":
    return clip.load_clip(path, **kwargs)
  return llm_lib.load_hf(path, **kwargs)


__all__ = ["FAMILIES", "Projector", "SUPPORTED_ARCHITECTURES", "VLM", "VLM_ARCHITECTURES", "answer_loss", "build",
           "config_from_hf", "config_from_llava", "family", "generate",
           "llava_table", "load_hf", "load_llava", "load_vlm", "model_flops", "num_image_tokens", "score_options",
           "trim_enabled", "validate_config"]
