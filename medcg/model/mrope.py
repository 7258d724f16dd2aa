"""Multimodal RoPE position ids (Qwen2-VL's M-RoPE), derived from the token ids inside the jitted step.

HF's `get_rope_index` gives every real token a (temporal, height, width) position: text tokens count up by one
(all three equal); the `gh x gw` merged tokens of an image sit at `(s, s + row, s + col)`, where `s` is the
position the image starts at, and the text after it resumes at `s + max(gh, gw)`. Padding is skipped (its
positions are arbitrary; here 0). A still image has one temporal step.

medcg's batches hold exactly `num_image_tokens = gh * gw` image placeholders per image, in one run, with the
grid static per config, so the positions follow from `input_ids` and the mask by cumulative sums: no host-side
loop, and the pipeline ships nothing beyond `input_ids` (what HF computes in its Python loop, vectorised).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_index(input_ids: jax.Array, attention_mask: jax.Array | None, *, image_token_id: int,
               grid: tuple[int, int]) -> jax.Array:
  """(3, B, T) int32 M-RoPE positions for token ids (B, T) holding runs of `grid[0] * grid[1]` image ids.

  `grid` is the merged-token grid (height, width) of one image. Any padding (mask 0) on either side.
  """
  gh, gw = int(grid[0]), int(grid[1])
  n, span = gh * gw, max(gh, gw)
  mask = jnp.ones_like(input_ids, bool) if attention_mask is None else attention_mask.astype(bool)
  is_image = (input_ids == image_token_id) & mask
  is_text = mask & ~is_image
  images_seen = jnp.cumsum(is_image, axis=1, dtype=jnp.int32)  # inclusive
  text_seen = jnp.cumsum(is_text, axis=1, dtype=jnp.int32)      # inclusive
  # Text: its rank among text tokens, shifted by `span` per image completed before it.
  text_pos = text_seen - 1 + (images_seen // n) * span
  # Image token k of image i: start s = text before it + span per earlier image; (s, s + k // gw, s + k % gw).
  k = jnp.maximum(images_seen - 1, 0) % n
  start = text_seen + (jnp.maximum(images_seen - 1, 0) // n) * span
  image_pos = jnp.stack([start, start + k // gw, start + k % gw])
  pos = jnp.where(is_image[None], image_pos, text_pos[None])
  return jnp.where(mask[None], pos, 0).astype(jnp.int32)


__all__ = ["rope_index"]
