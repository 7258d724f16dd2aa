"""What a run config implies that both the trainer and the evaluators need: the pipeline section for a
mixture, and where a run's parameters at a step come from. Kept apart from the trainer so that
medcg.eval.runner (which the trainer calls for its default evaluation hook) never imports the trainer.
"""
from __future__ import annotations

import jax
import ml_collections


def params_source(config, has_checkpoint: bool) -> str:
  """Where a run's parameters at a step come from: its checkpoint, else what its trainer started from."""
  if has_checkpoint:
    return "checkpoint"
  if config.train.init_from:
    return f"init_from:{config.train.init_from}"
  if config.train.init_from_hf:
    return f"init_from_hf:{config.train.init_from_hf}"
  return f"seeded init (seed {config.seed})"


def pipeline_config(config, mixture, global_batch: int, num_image_tokens: int, *,
                    training: bool = False) -> ml_collections.ConfigDict:
  """The pipeline's `data` section for this host: its share of the global batch, the model's image slots,
  and TRIM's text (`data.clip_text` from `config.trim`: `text_source` in training, `eval_text_source` else)."""
  from medcg.data import pipeline
  if global_batch % jax.process_count():
    raise ValueError(f"batch size {global_batch} is not divisible by the {jax.process_count()} processes")
  d = pipeline.with_clip_text(config.data, config.get("trim"), training=training)
  d.mixture = [tuple(m) for m in mixture]
  d.batch_size = global_batch // jax.process_count()
  d.num_image_tokens = num_image_tokens
  d.seed = config.seed
  return d
