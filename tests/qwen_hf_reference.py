"""Hugging Face (PyTorch, CPU, float32) reference for the Qwen2-VL / Qwen2.5-VL parity tests.

Only tests import this module (it imports torch and transformers). It builds tiny random
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` checkpoints with `save_pretrained`
and computes, with transformers alone, everything medcg is compared against: the image processor's
`pixel_values`, the vision tower's merged features, M-RoPE position ids, logits and greedy continuations.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import transformers

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

VOCAB = 256
IMAGE_TOKEN_ID = 255
VISION_START_ID = 253
VISION_END_ID = 254
EOS_ID = 252
PAD_ID = 251
VIDEO_TOKEN_ID = 250  # must lie inside the vocabulary; never used in the prompts
TEXT_IDS = (0, 250)  # ordinary text ids are drawn from [0, 250)

IMAGE_SIDE = 112
PATCH, TEMPORAL, MERGE = 14, 2, 2
GRID = IMAGE_SIDE // PATCH // MERGE  # 4: the merged-token grid is 4 x 4
NUM_IMAGE_TOKENS = GRID * GRID  # 16
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
MROPE_SECTION = [2, 3, 3]  # sums to HEAD_DIM / 2
NEW_TOKENS = 16
QK_SCALE = 1.25


def text_config(family: str) -> dict:
  return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, hidden_act="silu",
              max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(MROPE_SECTION)},
              bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)


def vision_config(family: str) -> dict:
  if family == "qwen2_vl":
    return dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=HIDDEN, hidden_act="quick_gelu",
                patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, in_channels=3)
  if family == "qwen2_5_vl":
    return dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=HIDDEN,
                hidden_act="silu", patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE,
                in_channels=3, window_size=56, fullatt_block_indexes=[1], tokens_per_second=4)
  raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_config(family: str):
  cls = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig}[family]
  return cls(text_config=text_config(family), vision_config=vision_config(family), image_token_id=IMAGE_TOKEN_ID,
             video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
             vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)


def model_class(family: str):
  return getattr(transformers, ARCHITECTURES[family])


def _perturb(model: torch.nn.Module, seed: int) -> None:
  """Weights that make every branch matter and attention far from uniform.

  HF's init (std 0.02, unit norms, zero biases) leaves these tiny models' attention almost uniform and the
  attention / MLP branches ~1% of the residual stream, so a wrong rotary table or window would hide under
  the tolerances. Instead: Linear weights N(0, 1/fan_in) (variance preserving), embeddings N(0, 1), norm
  weights 1 + 0.1 N(0, 1), norm (LayerNorm) biases 0.05 N(0, 1), all other biases 0.05 N(0, 1), and the
  q / k projections (text q_proj / k_proj, the q and k thirds of the vision fused qkv) times QK_SCALE.
  """
  gen = torch.Generator().manual_seed(seed + 12345)
  randn = lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype)
  with torch.no_grad():
    for name, module in model.named_modules():
      kind = type(module).__name__
      if "Norm" in kind:  # RMSNorm (text, Qwen2.5 vision) and nn.LayerNorm (Qwen2 vision)
        module.weight.copy_(1.0 + 0.1 * randn(module.weight))
        if getattr(module, "bias", None) is not None:
          module.bias.copy_(0.05 * randn(module.bias))
      elif isinstance(module, torch.nn.Embedding):
        module.weight.copy_(randn(module.weight))
      elif isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(randn(module.weight) / fan_in**0.5)
        if module.bias is not None:
          module.bias.copy_(0.05 * randn(module.bias))
        if name.endswith(("q_proj", "k_proj")):
          module.weight.mul_(QK_SCALE)
        elif name.endswith("attn.qkv"):
          dim = module.weight.shape[0] // 3
          module.weight[: 2 * dim].mul_(QK_SCALE)
          module.bias[: 2 * dim].mul_(QK_SCALE)


def build_model(family: str, seed: int = 0):
  torch.manual_seed(seed)
  model = model_class(family)(make_config(family))
  _perturb(model, seed)
  return model.eval()


def make_checkpoint(tmp_dir, family: str, *, seed: int = 0, sharded: bool = False) -> str:
  """A tiny random checkpoint under `tmp_dir/<family>[-sharded]-s<seed>`; returns its path.

  `sharded=True` writes >= 2 safetensors shards plus model.safetensors.index.json (same weights for the seed).
  """
  path = os.path.join(os.fspath(tmp_dir), f"{family}{'-sharded' if sharded else ''}-s{seed}")
  model = build_model(family, seed)
  kwargs = dict(max_shard_size="200KB") if sharded else {}
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  if sharded:
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json")), os.listdir(path)
    assert sum(f.endswith(".safetensors") for f in os.listdir(path)) >= 2, os.listdir(path)
  else:
    assert os.path.exists(os.path.join(path, "model.safetensors")), os.listdir(path)
  return path


def load(path: str, family: str, attn_implementation: str = "eager"):
  model = model_class(family).from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
  return model.eval()


# ------------------------------------------------------------------------------------------ preprocessing

def image_processor():
  """The real Qwen2-VL image processor (the PIL backend: torchvision is not installed), no resizing."""
  cls = getattr(transformers, "Qwen2VLImageProcessor", None)
  try:
    import torchvision  # noqa: F401
  except ImportError:
    cls = transformers.Qwen2VLImageProcessorPil
  return cls(do_resize=False, patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE)


def preprocess(images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (B, H, W, 3) -> HF pixel_values (B*gh*gw, 3*T*P*P) float32, image_grid_thw (B, 3) int64."""
  out = image_processor()(images=list(images_uint8), return_tensors="np")
  return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def hf_patchify(images_float: np.ndarray) -> np.ndarray:
  """Float (B, H, W, 3) already-normalised images -> pixel_values, patchified by the HF processor itself."""
  proc = image_processor()
  out = proc(images=[np.asarray(x, np.float32) for x in images_float], do_rescale=False, do_normalize=False,
             input_data_format="channels_last", return_tensors="np")
  return np.asarray(out["pixel_values"], np.float32)


def unpatchify(pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
  """Inverse of the processor's patch reordering: pixel_values -> (B, H, W, 3) float32 (one temporal copy)."""
  images = []
  start = 0
  for t, gh, gw in grid_thw:
    assert t == 1, grid_thw
    n = gh * gw
    p = pixel_values[start:start + n].reshape(gh // MERGE, gw // MERGE, MERGE, MERGE, 3, TEMPORAL, PATCH, PATCH)
    start += n
    assert np.array_equal(p[:, :, :, :, :, 0], p[:, :, :, :, :, 1]), "temporal copies differ"
    p = p[:, :, :, :, :, 0]  # (gh/m, gw/m, mh, mw, C, ph, pw)
    chw = p.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * PATCH, gw * PATCH)
    images.append(chw.transpose(1, 2, 0))
  return np.stack(images).astype(np.float32)


def normalize_reference(images_uint8: np.ndarray) -> np.ndarray:
  """(x / 255 - mean) / std with the processor's own image_mean / image_std, HWC float32."""
  proc = image_processor()
  mean = np.asarray(proc.image_mean, np.float64)
  std = np.asarray(proc.image_std, np.float64)
  return ((images_uint8.astype(np.float64) * proc.rescale_factor - mean) / std).astype(np.float32)


# ---------------------------------------------------------------------------------------------- prompts

def prompt_rows(shapes: Sequence[tuple[int, int]], seed: int = 0) -> list[list[int]]:
  """Per example `[text]*a + <vision_start> + <image>*16 + <vision_end> + [text]*b` for (a, b) in shapes."""
  rng = np.random.default_rng(seed)
  rows = []
  for before, after in shapes:
    rows.append([*map(int, rng.integers(*TEXT_IDS, before)), VISION_START_ID, *[IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS,
                 VISION_END_ID, *map(int, rng.integers(*TEXT_IDS, after))])
  return rows


def pad_rows(rows: Sequence[Sequence[int]], *, left: bool = False, length: int | None = None):
  """-> input_ids, attention_mask (B, T) int64, padded with PAD_ID on the right (or left)."""
  length = length or max(map(len, rows))
  ids = np.full((len(rows), length), PAD_ID, np.int64)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    sl = slice(length - len(row), length) if left else slice(0, len(row))
    ids[i, sl], mask[i, sl] = row, 1
  return ids, mask


def mm_token_type_ids(input_ids: np.ndarray) -> np.ndarray:
  return (input_ids == IMAGE_TOKEN_ID).astype(np.int64)


# -------------------------------------------------------------------------------------------- reference

def attention_max_prob(model, input_ids, attention_mask, pixel_values, grid_thw, min_keys: int = 8) -> float:
  """The largest text-attention probability over queries that see >= `min_keys` real keys (eager attention)."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid_thw),
                mm_token_type_ids=torch.tensor(mm_token_type_ids(input_ids)), output_attentions=True)
  best = 0.0
  for attn in out.attentions:  # (B, H, T, T)
    a = attn.numpy()
    for b in range(a.shape[0]):
      n = int(attention_mask[b].sum())
      if n > min_keys:
        best = max(best, float(a[b, :, min_keys:n, :n].max()))
  return best


def reference(path: str, family: str, images_uint8: np.ndarray, rows: Sequence[Sequence[int]], *,
              new_tokens: int = NEW_TOKENS, check_attention: bool = True) -> dict[str, np.ndarray]:
  """Everything transformers computes for `images_uint8` (B, 112, 112, 3) and prompt `rows` (one per image).

  Keys: pixel_values, image_grid_thw, normalized (B,112,112,3), merged (B,16,64), input_ids / attention_mask
  (right-padded batch), mm_token_type_ids, rope_index (3,B,T), rope_deltas (B,1), logits (B,T,V),
  greedy (B, new_tokens) (each example generated alone, unpadded), greedy_margin (B, new_tokens)
  (HF's top-1 minus top-2 logit per step), attention_max_prob.
  """
  assert images_uint8.dtype == np.uint8 and images_uint8.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE, 3)
  assert len(rows) == len(images_uint8)
  model = load(path, family)
  pixel_values, grid_thw = preprocess(images_uint8)
  normalized = unpatchify(pixel_values, grid_thw)
  manual = normalize_reference(images_uint8)
  assert np.abs(normalized - manual).max() <= 1e-5, np.abs(normalized - manual).max()
  assert np.array_equal(hf_patchify(normalized), pixel_values)

  n_img = len(images_uint8)
  with torch.no_grad():
    vis = model.model.visual(torch.tensor(pixel_values), grid_thw=torch.tensor(grid_thw))
  merged = vis.pooler_output.numpy().reshape(n_img, NUM_IMAGE_TOKENS, -1)

  ids, mask = pad_rows(rows)
  types = mm_token_type_ids(ids)
  with torch.no_grad():
    pos, deltas = model.model.get_rope_index(torch.tensor(ids), mm_token_type_ids=torch.tensor(types),
                                             image_grid_thw=torch.tensor(grid_thw),
                                             attention_mask=torch.tensor(mask))
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid_thw),
                mm_token_type_ids=torch.tensor(types))
  result = dict(pixel_values=pixel_values, image_grid_thw=grid_thw, normalized=normalized, merged=merged,
                input_ids=ids, attention_mask=mask, mm_token_type_ids=types, rope_index=pos.numpy(),
                rope_deltas=deltas.numpy(), logits=out.logits.float().numpy())

  if check_attention:
    result["attention_max_prob"] = np.float32(attention_max_prob(model, ids, mask, pixel_values, grid_thw))

  per_image = pixel_values.shape[0] // n_img
  model.generation_config.eos_token_id = None  # exactly `new_tokens` tokens, nothing suppressed
  model.generation_config.pad_token_id = PAD_ID
  greedy, margins = [], []
  for i, row in enumerate(rows):
    row_ids = torch.tensor([list(row)])
    with torch.no_grad():
      gen = model.generate(input_ids=row_ids, attention_mask=torch.ones_like(row_ids),
                           pixel_values=torch.tensor(pixel_values[i * per_image:(i + 1) * per_image]),
                           image_grid_thw=torch.tensor(grid_thw[i:i + 1]),
                           mm_token_type_ids=torch.tensor(mm_token_type_ids(row_ids.numpy())),
                           do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=None,
                           pad_token_id=PAD_ID, return_dict_in_generate=True, output_scores=True)
    new = gen.sequences[0, len(row):].numpy()
    assert len(new) == new_tokens, new
    greedy.append(new)
    top2 = torch.stack(gen.scores)[:, 0].topk(2, dim=-1).values.numpy()  # (new_tokens, 2)
    margins.append(top2[:, 0] - top2[:, 1])
  result["greedy"] = np.stack(greedy).astype(np.int64)
  result["greedy_margin"] = np.stack(margins).astype(np.float32)  # top-1 minus top-2 logit at each step
  return result


def rope_index(path: str, family: str, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  """HF `get_rope_index` (3, B, T) for a batch of prompts with any padding, one 112 px image per row."""
  model = load(path, family)
  grid = np.tile([[1, IMAGE_SIDE // PATCH, IMAGE_SIDE // PATCH]], (len(input_ids), 1))
  with torch.no_grad():
    pos, _ = model.model.get_rope_index(torch.tensor(input_ids), mm_token_type_ids=torch.tensor(
        mm_token_type_ids(input_ids)), image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(attention_mask))
  return pos.numpy()


def merged_full_attention(path: str, family: str, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
  """Qwen2.5-VL's merged features with every block on full attention (to show window attention matters)."""
  model = load(path, family)
  model.model.visual.fullatt_block_indexes = list(range(len(model.model.visual.blocks)))
  with torch.no_grad():
    out = model.model.visual(torch.tensor(pixel_values), grid_thw=torch.tensor(grid_thw)).pooler_output
  return out.numpy().reshape(len(grid_thw), NUM_IMAGE_TOKENS, -1)


def random_images(n: int, seed: int = 0) -> np.ndarray:
  """Smooth-ish random uint8 images (a low-frequency pattern plus noise), (n, 112, 112, 3)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE] / IMAGE_SIDE
  out = []
  for _ in range(n):
    f = rng.uniform(1, 4, (3, 2))
    ph = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(2 * np.pi * (f[c, 0] * yy + f[c, 1] * xx) + ph[c]) for c in range(3)], -1)
    img = 127.5 + 90 * base + rng.normal(0, 25, base.shape)
    out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
  return np.stack(out)


def checkpoint_keys(path: str) -> dict[str, tuple[int, ...]]:
  from safetensors import safe_open
  keys = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(path, f), "np") as st:
        for k in st.keys():
          keys[k] = tuple(st.get_slice(k).get_shape())
  return keys
