"""Qwen2-VL and Qwen2.5-VL: the Qwen vision tower -> 2x2 PatchMerger -> the Qwen2 decoder with M-RoPE.

The same model interface as the LLaVA family (`medcg.model.vlm.VLM`), so the trainer, evaluation (generation and
option likelihood), sharding rules, checkpoints and the compile tool take either family:

  feats, slot_mask = model.image_features(images, text_ids=None)     # (B, num_image_tokens, E), None
  logits, cache, mask = model.language_forward(feats, slot_mask, input_ids, attention_mask, cache=None)
  logits = model(images, input_ids, attention_mask)                  # the training forward
  logits, cache, mask = model.prefill(images, input_ids, attention_mask, cache)

Each prompt holds exactly `num_image_tokens` `<|image_pad|>` ids (one image, static grid); the M-RoPE positions
follow from the ids (`medcg.model.mrope.rope_index`), and after prefill the cache continues every row at its
largest position + 1, as HF's rope deltas do. TRIM does not apply: it scores CLIP patches against CLIP text.

The `model` config section: family "qwen2_vl" (both generations; Qwen2.5-VL differs in `vision` keys: norm
rmsnorm, mlp swiglu, window attention), `vision` (`qwen_vision.QwenVisionConfig`), `llm` (`medcg.model.llm`, with
`mrope_section`), `image_token_id`, `vision_start_token_id`, `vision_end_token_id`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import ml_collections
from flax import nnx

from medcg.model import hf
from medcg.model import image_slots
from medcg.model import llm as llm_lib
from medcg.model import mrope
from medcg.model import qwen_vision

FAMILY = "qwen2_vl"
ARCHITECTURES = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}
# The Qwen2 vocabulary's multimodal ids (every Qwen2-VL / Qwen2.5-VL checkpoint).
IMAGE_PAD_ID, VISION_START_ID, VISION_END_ID = 151655, 151652, 151653
IM_END_ID, ENDOFTEXT_ID = 151645, 151643


def _get(cfg: Any, key: str, default=None):
  if cfg is None:
    return default
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def validate_config(cfg: ml_collections.ConfigDict, trim: Any = None) -> ml_collections.ConfigDict:
  """Checks what must agree across the towers; raises naming the key."""
  if _get(trim, "enabled", False):
    raise ValueError("trim.enabled=True with model.family='qwen2_vl': TRIM scores CLIP patch embeddings against the "
                     "CLIP text embedding of the question, which only the LLaVA family (CLIP vision tower) has; set "
                     "trim.enabled=False or use a LLaVA preset")
  vision = qwen_vision.QwenVisionConfig.from_dict(cfg.vision, "model.vision")
  llm_lib.validate_config(cfg.llm)
  if not cfg.llm.get("mrope_section"):
    raise ValueError("model.llm.mrope_section is not set: the Qwen2-VL decoder uses M-RoPE (e.g. [16, 24, 24])")
  if vision.out_hidden_size != cfg.llm.hidden_size:
    raise ValueError(f"model.vision.out_hidden_size={vision.out_hidden_size} != model.llm.hidden_size="
                     f"{cfg.llm.hidden_size}: the merger feeds the decoder")
  return cfg


def num_image_tokens(cfg: Any) -> int:
  """Merged image tokens per prompt: (image_size / 28)^2."""
  return qwen_vision.QwenVisionConfig.from_dict(cfg.vision).num_tokens


class QwenVLM(nnx.Module):
  """`model(images, input_ids, attention_mask) -> logits (B, L, V)` (float32); see the module docstring."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, trim: Any = None):
    validate_config(cfg, trim)
    self.cfg = ml_collections.FrozenConfigDict(cfg)
    self.trim_cfg = None
    vision = qwen_vision.QwenVisionConfig.from_dict(cfg.vision)
    self.vision = qwen_vision.QwenVisionTower(vision, rngs=rngs)
    self.merger = qwen_vision.PatchMerger(vision, rngs=rngs)  # outside `vision`: trained when the tower is frozen
    self.llm = llm_lib.LLM(cfg.llm, rngs=rngs)
    self.image_token_id = int(cfg.image_token_id)
    self.num_image_tokens = vision.num_tokens
    self.grid = (vision.merged_grid, vision.merged_grid)

  def image_features(self, images: jax.Array, text_ids: jax.Array | None = None):
    """(B, S, S, 3) normalised images -> (merged features (B, num_image_tokens, E), None: every slot valid)."""
    del text_ids  # no TRIM
    return self.merger(self.vision(images)), None

  def positions(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(3, B, L) M-RoPE positions of a prompt batch."""
    return mrope.rope_index(input_ids, attention_mask, image_token_id=self.image_token_id, grid=self.grid)

  def language_forward(self, feats: jax.Array, slot_mask: jax.Array | None, input_ids: jax.Array,
                       attention_mask: jax.Array, cache: llm_lib.KVCache | None = None):
    """Image features spliced into the prompt, through the decoder: (logits, cache or None, effective mask)."""
    embeds, mask = image_slots.splice(self.llm.embed, self.image_token_id, self.num_image_tokens, feats, slot_mask,
                                      input_ids, attention_mask)
    logits, cache = self.llm(inputs_embeds=embeds, attention_mask=mask, positions=self.positions(input_ids, mask),
                             cache=cache)
    return logits, cache, mask

  def __call__(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               text_ids: jax.Array | None = None) -> jax.Array:
    image_slots.check_placeholders(input_ids, self.image_token_id, self.num_image_tokens)
    return self.language_forward(*self.image_features(images), input_ids, attention_mask)[0]

  def prefill(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, cache: llm_lib.KVCache,
              text_ids: jax.Array | None = None):
    """Runs the prompt into `cache`: (logits (B, L, V), cache, effective mask)."""
    image_slots.check_placeholders(input_ids, self.image_token_id, self.num_image_tokens)
    return self.language_forward(*self.image_features(images), input_ids, attention_mask, cache)


def model_flops(cfg: ml_collections.ConfigDict, seq_len: int, *, training: bool = False,
                train_vision: bool = False) -> float:
  """Model FLOPs per example for MFU: vision tower, merger, decoder (trained parts 3x forward when `training`)."""
  vision = qwen_vision.QwenVisionConfig.from_dict(cfg.vision)
  tower = qwen_vision.encoder_flops(vision)
  wide = vision.hidden_size * vision.spatial_merge_size ** 2
  merger = 2.0 * vision.num_tokens * (wide * wide + wide * vision.out_hidden_size)
  decoder = seq_len * llm_lib.model_flops_per_token(cfg.llm, seq_len)
  trained = merger + decoder + (tower - merger if train_vision else 0.0)
  fixed = 0.0 if train_vision else tower - merger
  return float(fixed + (3 * trained if training else trained))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face configs and weights
# ---------------------------------------------------------------------------------------------------------------
def config_from_hf(hf_config: Mapping[str, Any], *, image_size: int = 448, **overrides) -> ml_collections.ConfigDict:
  """The `model` section for a Qwen2VL / Qwen2_5_VL ForConditionalGeneration config.json.

  `image_size`: the static square side (a multiple of 28; see `qwen_vision.static_image_size` for a HF
  preprocessor's min/max pixels). `overrides` (dtype, param_dtype, remat) apply to both towers.
  """
  archs = hf_config.get("architectures") or [hf_config.get("model_type", "?")]
  where = f"{archs[0]} config.json"
  if archs[0] not in ARCHITECTURES:
    raise hf.CheckpointError(f"{where}: architecture {archs[0]!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)}")
  unknown = sorted(set(overrides) - {"dtype", "param_dtype", "remat"})
  if unknown:
    raise TypeError(f"unknown override(s) {unknown}; allowed: dtype, param_dtype, remat")
  generation = ARCHITECTURES[archs[0]]
  # transformers >= 4.5x nests the decoder in text_config; older config.json files keep it at the top level.
  text = dict(hf_config)
  text.pop("vision_config", None)
  text.update(hf_config.get("text_config") or {})
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
  section = rope.pop("mrope_section", None)
  if section is None:
    raise hf.CheckpointError(f"{where}: no mrope_section in rope_scaling / rope_parameters (Qwen2-VL uses M-RoPE)")
  if rope.get("rope_type", rope.get("type", "default")) in ("mrope", "default"):
    rope = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
  text["rope_parameters" if "rope_parameters" in text else "rope_scaling"] = rope or None
  text["architectures"] = ["Qwen2ForCausalLM"]
  try:
    llm_cfg = llm_lib.from_hf_config(text, mrope_section=[int(n) for n in section], **overrides)
  except ValueError as e:
    raise hf.CheckpointError(f"{where}: {e}") from e

  v = dict(hf_config.get("vision_config") or {})
  is_25 = generation == "qwen2_5_vl"
  hidden = v.get("hidden_size" if is_25 else "embed_dim", 1280)
  vision = dict(
      image_size=int(image_size), patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
      temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
      in_channels=v.get("in_channels", v.get("in_chans", 3)), hidden_size=hidden,
      intermediate_size=v["intermediate_size"] if is_25 else int(hidden * v.get("mlp_ratio", 4)),
      num_layers=v.get("depth", 32), num_heads=v.get("num_heads", 16),
      hidden_act=v.get("hidden_act", "silu" if is_25 else "quick_gelu"),
      norm="rmsnorm" if is_25 else "layernorm", mlp="swiglu" if is_25 else "fc",
      window_size=v.get("window_size", 112) if is_25 else 0,
      fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())) if is_25 else (),
      out_hidden_size=v.get("out_hidden_size", llm_cfg.hidden_size) if is_25 else v.get("hidden_size"),
      **{k: overrides[k] for k in ("dtype", "param_dtype", "remat") if k in overrides})
  try:
    vision_cfg = qwen_vision.QwenVisionConfig.from_dict(vision, f"{where} vision_config")
  except ValueError as e:
    raise hf.CheckpointError(str(e)) from e
  ids = {k: hf_config.get(k, text.get(k, default)) for k, default in (
      ("image_token_id", IMAGE_PAD_ID), ("vision_start_token_id", VISION_START_ID),
      ("vision_end_token_id", VISION_END_ID))}
  return ml_collections.ConfigDict(dict(
      family=FAMILY, generation=generation, vision=ml_collections.ConfigDict(dataclasses.asdict(vision_cfg)),
      llm=llm_cfg, **{k: int(v) for k, v in ids.items()}))


def checkpoint_prefixes(checkpoint: hf.Checkpoint) -> dict[str, str]:
  """Where the vision tower and the decoder live; two layouts exist.

    Hub Qwen/Qwen2-VL-*, Qwen2.5-VL-* (transformers < 4.52): visual.*, model.*, lm_head.weight
    transformers >= 4.52 save:                           model.visual.*, model.language_model.*, lm_head.weight
  """
  heads = [k for k in checkpoint.keys() if k.endswith("lm_head.weight")]
  return dict(vision=hf.unique_prefix(checkpoint, "patch_embed.proj.weight", "vision tower"),
              lm=hf.unique_prefix(checkpoint, "embed_tokens.weight", "decoder"),
              lm_head=heads[0] if len(heads) == 1 else "lm_head.weight")


def vision_table(cfg: qwen_vision.QwenVisionConfig, hf_prefix: str) -> hf.MappingTable:
  """HF Qwen2VisionTransformerPretrainedModel / Qwen2_5_VisionTransformerPretrainedModel -> `vision.` + `merger.`."""
  h, block = hf_prefix, f"{hf_prefix}blocks.{{i}}."
  linear = lambda ours, theirs: [(f"{ours}.kernel", f"{theirs}.weight", hf.LINEAR),
                                 (f"{ours}.bias", f"{theirs}.bias", hf.IDENTITY)]
  norm = lambda ours, theirs: [(f"{ours}.scale", f"{theirs}.weight", hf.IDENTITY)] + (
      [(f"{ours}.bias", f"{theirs}.bias", hf.IDENTITY)] if cfg.norm == "layernorm" else [])
  mlp = (("fc1", "fc1"), ("fc2", "fc2")) if cfg.mlp == "fc" else (
      ("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
  entries = [("vision.patch_embed", f"{h}patch_embed.proj.weight", hf.CONV3D),
             *norm("vision.blocks.norm1", block + "norm1"), *norm("vision.blocks.norm2", block + "norm2"),
             *linear("vision.blocks.attn.qkv", block + "attn.qkv"), *linear("vision.blocks.attn.proj", block + "attn.proj"),
             *[e for ours, theirs in mlp for e in linear(f"vision.blocks.mlp.{ours}", block + f"mlp.{theirs}")],
             *norm("merger.ln_q", f"{h}merger.ln_q"), *linear("merger.fc1", f"{h}merger.mlp.0"),
             *linear("merger.fc2", f"{h}merger.mlp.2")]
  return hf.named_table(entries)


def hf_table(cfg: ml_collections.ConfigDict, prefixes: Mapping[str, str]) -> hf.MappingTable:
  """The whole model: vision tower + merger + decoder (one table per family; the decoder's is Qwen2's)."""
  vision = vision_table(qwen_vision.QwenVisionConfig.from_dict(cfg.vision), prefixes["vision"])
  lm = hf.llm_table(cfg.llm).prefixed("llm.", {"model.": prefixes["lm"], "lm_head.weight": prefixes["lm_head"]})
  return vision + lm


def load_qwen_vl(path: str, *, image_size: int = 448, trim: Any = None, mesh=None, rules=None,
                 **overrides) -> QwenVLM:
  """Imports a HF Qwen2VL / Qwen2_5_VL ForConditionalGeneration safetensors checkpoint as a `QwenVLM`.

  With `mesh` every param is created with its NamedSharding (logical axes -> `rules`) and each host reads only
  its slices. Missing / unused tensors and shape mismatches are named in one `hf.CheckpointError`.
  """
  ckpt = hf.open_checkpoint(path)
  hf.check_architecture(ckpt, tuple(ARCHITECTURES))
  cfg = config_from_hf(ckpt.config, image_size=image_size, **overrides)
  validate_config(cfg, trim)
  from medcg.train import sharding as sharding_lib
  with sharding_lib.no_mesh():  # shapes only; shardings come from the rules table below
    abstract = nnx.eval_shape(lambda: QwenVLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = None
  if mesh is not None:
    shardings = sharding_lib.param_shardings(state, mesh, rules or sharding_lib.RULES)
  loaded = hf.load_params(state, ckpt, hf_table(cfg, checkpoint_prefixes(ckpt)), shardings=shardings)
  return nnx.merge(graphdef, loaded)


__all__ = ["ARCHITECTURES", "FAMILY", "QwenVLM", "checkpoint_prefixes", "config_from_hf", "hf_table", "load_qwen_vl",
           "model_flops", "num_image_tokens", "validate_config", "vision_table"]
