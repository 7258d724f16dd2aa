"""Image placeholders in a prompt: the check that every row holds the expected count, and the splice that puts
image features in their place. Shared by every model family (medcg.model.vlm, medcg.model.qwen_vl)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_placeholders(input_ids: jax.Array, image_token_id: int, expected: int) -> None:
  """Every row must hold exactly `expected` placeholders; checked eagerly when the ids are concrete."""
  try:
    if isinstance(input_ids, jax.Array) and not input_ids.is_fully_addressable:
      return  # a multi-host global batch: not readable here
    with jax.transfer_guard_device_to_host("allow"):
      ids = np.asarray(input_ids)  # numpy, so the check also works on concrete ids inside an outer trace
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced: shapes are static, the count cannot be checked here
  counts = np.sum(ids == image_token_id, axis=1)
  bad = np.flatnonzero(counts != expected)
  if bad.size:
    raise ValueError(f"rows {bad.tolist()} hold {counts[bad].tolist()} image placeholders (id {image_token_id}); "
                     f"the model expects exactly {expected} per example (num_image_tokens)")


def splice(embed, image_token_id: int, num_slots: int, feats: jax.Array, slot_mask: jax.Array | None,
           input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(inputs_embeds (B, L, E), attention_mask (B, L) int32): `embed(ids)` with each row's k-th image placeholder
  replaced by feature slot k of `feats` (B, num_slots, E); slots off in `slot_mask` (TRIM) get mask 0."""
  is_image = input_ids == image_token_id
  slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, num_slots - 1)  # (B, L)
  spliced = jnp.take_along_axis(feats, slot[..., None], axis=1)
  text = embed(jnp.where(is_image, 0, input_ids))  # placeholder ids may lie past the vocab
  embeds = jnp.where(is_image[..., None], spliced.astype(text.dtype), text)
  mask = attention_mask.astype(bool)
  if slot_mask is not None:
    mask = mask & (~is_image | jnp.take_along_axis(slot_mask, slot, axis=1))
  return embeds, mask.astype(jnp.int32)


__all__ = ["check_placeholders", "splice"]
