"""Model presets (the `model` config section): CLIP vision tower, CLIP text tower (TRIM), projector, decoder LLM.

  tiny            trains on CPU in minutes: 32 px, patch 8, width 128, 2+2 layers, byte-level ids by default
  llava-1.5-7b    CLIP ViT-L/14-336 + Vicuna-7B (llava-hf/llava-1.5-7b-hf shapes, 576 image tokens)
  llava-1.5-13b   CLIP ViT-L/14-336 + Vicuna-13B
  bench-1b        CLIP ViT-L/14-336 + a 1.1B LLaMA-shaped decoder (TinyLlama shapes), for GPU benchmarks
  tiny-qwen2vl    the Qwen2-VL architecture at CPU size, from scratch: 112 px (8 x 8 patches of 14 -> 16 merged
                  tokens), width 64 + 128, 2 + 2 layers, M-RoPE sections (4, 6, 6)
  qwen2-vl-7b     Qwen/Qwen2-VL-7B-Instruct shapes: 675M ViT (full attention) + Qwen2-7B with M-RoPE; 448 px -> 256
  qwen2.5-vl-7b   Qwen/Qwen2.5-VL-7B-Instruct: RMSNorm / SwiGLU ViT with window attention + Qwen2.5-7B
  qwen2.5-vl-3b   Qwen/Qwen2.5-VL-3B-Instruct: the same ViT + Qwen2.5-3B (tied embeddings)

The Qwen presets are `model.family = "qwen2_vl"` (medcg.model.qwen_vl); their image grid is static: change
`model.vision.image_size` (a multiple of 28) to change it, e.g. 336 -> 144 image tokens.

Use from an experiment config: `c.model = models.get("tiny")`, or on the command line
`--config configs/models.py:llava-1.5-7b` to print one. Random init works for every preset without any file;
real weights come from `medcg.model.load_hf(path)`, which builds the config from the checkpoint instead.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from medcg.model import clip
from medcg.model import llm as llm_lib
from medcg.model import qwen_vision
from medcg.model import qwen_vl

PRESETS = ("tiny", "llava-1.5-7b", "llava-1.5-13b", "bench-1b", "tiny-qwen2vl", "qwen2-vl-7b", "qwen2.5-vl-7b",
           "qwen2.5-vl-3b")
# Presets trained from scratch on CPU (the corpus BPE tokenizer, a short schedule); the rest are pretrained sizes.
FROM_SCRATCH = ("tiny", "tiny-qwen2vl")

# ByteTokenizer ids (medcg.data.tokenizer): bytes 0..255, then pad, bos, eos, image; vocab 264.
_BYTE = dict(vocab_size=264, pad_token_id=256, bos_token_id=257, eos_token_id=258, image_token_id=259)


def _vision(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(clip.CLIPVisionConfig(**overrides)))


def _text(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(clip.CLIPTextConfig(**overrides)))


# openai/clip-vit-large-patch14-336: both towers (the LLaVA-1.5 vision tower; TRIM's text tower).
# Its config.json keeps the pre-2023 eos_token_id = 2, which means "pool at the argmax id" (<|endoftext|>).
_VIT_L14_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=768)
_CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, projection_dim=768, eos_token_id=2)


def _model(vision, text, llm, image_token_id: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vision=vision,
      text=text,                      # CLIP text tower, built only when TRIM is on
      llm=llm,
      projector_hidden_act="gelu",    # LLaVA-1.5 mlp2x_gelu
      projector_bias=True,
      vision_select_layer=-2,         # HF hidden_states index: the penultimate layer
      vision_select_feature="patch",  # "patch" drops the class token (LLaVA "default"), "full" keeps it
      image_token_id=image_token_id,  # placeholder id in input_ids (may lie past the LLM vocab)
  ))


def _tiny() -> ml_collections.ConfigDict:
  # Sized for CPU (2 cores): a train step at batch 32 and ~110 positions takes a fraction of a second.
  vision = _vision(image_size=32, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=64)
  text = _text(vocab_size=_BYTE["vocab_size"], hidden_size=128, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
               eos_token_id=_BYTE["eos_token_id"])
  llm = llm_lib.make_config(
      vocab_size=_BYTE["vocab_size"], hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
      bos_token_id=_BYTE["bos_token_id"], eos_token_id=_BYTE["eos_token_id"], pad_token_id=_BYTE["pad_token_id"])
  return _model(vision, text, llm, _BYTE["image_token_id"])


def _vicuna(hidden: int, mlp: int, layers: int, heads: int) -> ml_collections.ConfigDict:
  # llava-hf pads the Vicuna vocab from 32000 to 32064; id 32000 is <image>.
  return llm_lib.make_config(
      vocab_size=32064, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=heads,
      num_kv_heads=heads, head_dim=hidden // heads, max_position_embeddings=4096, rope_theta=10000.0,
      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
      dtype="bfloat16", param_dtype="float32")


def _llava(hidden: int, mlp: int, layers: int, heads: int) -> ml_collections.ConfigDict:
  return _model(_vision(**_VIT_L14_336, dtype="bfloat16"), _text(**_CLIP_L14_TEXT, dtype="bfloat16"),
                _vicuna(hidden, mlp, layers, heads), image_token_id=32000)


def _bench_1b() -> ml_collections.ConfigDict:
  # TinyLlama-1.1B shapes (GQA 32/4, head_dim 64); the placeholder id sits just past its 32000-token vocab.
  llm = llm_lib.make_config(
      vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
      head_dim=64, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1,
      eos_token_id=2, pad_token_id=0, dtype="bfloat16", param_dtype="float32")
  return _model(_vision(**_VIT_L14_336, dtype="bfloat16"), _text(**_CLIP_L14_TEXT, dtype="bfloat16"), llm,
                image_token_id=32000)


def _qwen(vision: dict, llm: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      family=qwen_vl.FAMILY,
      vision=ml_collections.ConfigDict(dataclasses.asdict(qwen_vision.QwenVisionConfig(**vision))),
      llm=llm,
      image_token_id=qwen_vl.IMAGE_PAD_ID,           # <|image_pad|>
      vision_start_token_id=qwen_vl.VISION_START_ID,  # <|vision_start|>, in the chat template's text
      vision_end_token_id=qwen_vl.VISION_END_ID,
  ))


def _tiny_qwen2vl() -> ml_collections.ConfigDict:
  vision = dict(image_size=112, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                out_hidden_size=128)
  llm = llm_lib.make_config(
      vocab_size=_BYTE["vocab_size"], hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
      qkv_bias=True, mrope_section=[4, 6, 6], bos_token_id=_BYTE["bos_token_id"],
      eos_token_id=_BYTE["eos_token_id"], pad_token_id=_BYTE["pad_token_id"])
  cfg = _qwen(vision, llm)
  cfg.image_token_id = _BYTE["image_token_id"]
  return cfg


# The Qwen2-VL ViT (675M) and Qwen2.5-VL's (RMSNorm, SwiGLU, 112-px windows, full attention every 8th block).
_QWEN2_VIT = dict(image_size=448, hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16,
                  hidden_act="quick_gelu", dtype="bfloat16")
_QWEN25_VIT = dict(image_size=448, hidden_size=1280, intermediate_size=3420, num_layers=32, num_heads=16,
                   hidden_act="silu", norm="rmsnorm", mlp="swiglu", window_size=112,
                   fullatt_block_indexes=(7, 15, 23, 31), dtype="bfloat16")


def _qwen2_decoder(vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, *, tied: bool,
                   max_positions: int) -> ml_collections.ConfigDict:
  return llm_lib.make_config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=hidden // heads, rms_norm_eps=1e-6, rope_theta=1e6,
      max_position_embeddings=max_positions, tie_word_embeddings=tied, qkv_bias=True, mrope_section=[16, 24, 24],
      bos_token_id=None, eos_token_id=qwen_vl.IM_END_ID, pad_token_id=qwen_vl.ENDOFTEXT_ID,
      dtype="bfloat16", param_dtype="float32")


_BUILDERS = {
    "tiny": _tiny,
    "llava-1.5-7b": lambda: _llava(4096, 11008, 32, 32),
    "llava-1.5-13b": lambda: _llava(5120, 13824, 40, 40),
    "bench-1b": _bench_1b,
    "tiny-qwen2vl": _tiny_qwen2vl,
    "qwen2-vl-7b": lambda: _qwen(dict(_QWEN2_VIT, out_hidden_size=3584), _qwen2_decoder(
        152064, 3584, 18944, 28, 28, 4, tied=False, max_positions=32768)),
    "qwen2.5-vl-7b": lambda: _qwen(dict(_QWEN25_VIT, out_hidden_size=3584), _qwen2_decoder(
        152064, 3584, 18944, 28, 28, 4, tied=False, max_positions=128000)),
    "qwen2.5-vl-3b": lambda: _qwen(dict(_QWEN25_VIT, out_hidden_size=2048), _qwen2_decoder(
        151936, 2048, 11008, 36, 16, 2, tied=True, max_positions=128000)),
}


def get(name: str, *, dtype: str | None = None, param_dtype: str | None = None,
        remat: str | None = None) -> ml_collections.ConfigDict:
  """The `model` section of preset `name`; dtype / param_dtype / remat, when given, apply to every tower."""
  if name not in _BUILDERS:
    raise ValueError(f"unknown model preset {name!r}; presets are {', '.join(PRESETS)}")
  cfg = _BUILDERS[name]()
  for tower in (cfg.vision, cfg.get("text"), cfg.llm):
    if tower is None:
      continue
    for key, value in (("dtype", dtype), ("param_dtype", param_dtype), ("remat", remat)):
      if value is not None:
        tower[key] = value
  llm_lib.validate_config(cfg.llm)
  return cfg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ml_collections config-file entry point: `--config configs/models.py:<preset>` (default tiny)."""
  return get(arg or "tiny")
