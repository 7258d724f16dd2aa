"""Config helpers (big_vision style): `parse_arg` for `--config file.py:key=value,...` and the base config.

Experiment configs do

    def get_config(arg=None):
      arg = configlib.parse_arg(arg, target=3, data="synth", model="tiny", seed=0)
      config = configlib.base_config()
      ...

and are launched as `python -m medcg.train --config configs/x.py:target=28,seed=1 --config.train.lr=1e-4`.
Unknown keys in `arg` and unknown `--config.` overrides are errors that name the key.
"""
from __future__ import annotations

from typing import Any

import ml_collections


def _autotype(value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def parse_arg(arg: str | None, *, lazy: bool = False, **defaults: Any) -> ml_collections.ConfigDict:
  """Parse "a=1,b=x,flag" against typed defaults; a bare name sets a bool to True."""
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      if lazy:
        out[key] = value
        continue
      raise KeyError(f"config arg: unknown key {key!r}; known keys: {sorted(defaults)}")
    try:
      out[key] = _autotype(value.strip(), defaults[key]) if "=" in item or isinstance(defaults[key], bool) \
          else True
    except ValueError as e:
      raise ValueError(f"config arg {key!r}: {e}") from e
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer, the pipeline and the evaluator read, with defaults. Experiments override."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The pipeline's fields (medcg.data.pipeline.default_data_config), with two differences: `batch_size` is
  # the GLOBAL batch here (the trainer gives each host its slice) and `mixture` is the training mixture.
  from medcg.data import pipeline
  c.data = pipeline.default_data_config()
  c.data.shards_dir = "data/synthmat_shards"
  c.data.image_size = 64
  c.data.seq_len = 128
  c.data.chat_template = "plain"
  c.data.batch_size = 32
  c.data.balance_labels = True           # the paper caps training subsets at 3,000, label-balanced
  c.data.eval_mixture = []               # [(subset, split, n_samples)]; n_samples -1 = all
  # data.clip_text (enabled, source, max_len, tokenizer {kind: byte | clip, path}) comes with the pipeline's
  # defaults; with a pretrained CLIP text tower set tokenizer.kind="clip" and its tokenizer.json path.

  c.model = ml_collections.ConfigDict()    # filled from configs/models.py presets
  # From-scratch models take vocab size and special ids from the tokenizer (off for benchmarks that need
  # a preset's real vocabulary; ignored when fine-tuning Hugging Face weights).
  c.model_vocab_from_tokenizer = True
  # dtype / param_dtype / remat applied to every tower of a model imported from Hugging Face.
  c.model_overrides = ml_collections.ConfigDict(dict(dtype="", param_dtype="", remat=""))

  # TRIM token reduction (medcg.kernels.trim). The text it scores against is CLIP-tokenized by the pipeline
  # (data.clip_text, set from this section by pipeline.with_clip_text): `text_source` in training,
  # `eval_text_source` in evaluation ("question" | "conversation"; released TRIM: conversation, question).
  c.trim = ml_collections.ConfigDict(dict(
      enabled=False, mode="iqr_batch", k_max=0, ratio=0.0, impl="auto", text_source="question",
      eval_text_source="question"))

  c.train = ml_collections.ConfigDict(dict(
      steps=-1,                 # >= 0 wins over epochs; 0 = no training (evaluate the untrained model)
      epochs=1,
      lr=1e-3, schedule="cosine", warmup_steps=0, warmup_frac=0.03, end_lr_frac=0.0,
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
      accum_steps=1,
      freeze=(),                # regexes on param paths, e.g. ("vision/.*",)
      lr_groups=(),             # ((regex, multiplier), ...)
      init_from="",             # another run's workdir (params only)
      init_from_hf="",          # a local Hugging Face LlavaForConditionalGeneration checkpoint directory
      init_from_clip="",        # its CLIPModel checkpoint (TRIM's text tower and visual_projection)
      log_every=10,
      log_batches=False,        # append every step's sample ids and loss to workdir/batches.jsonl
      nan_check=True,
  ))

  # Mesh axes (-1 fills the rest); num_devices > 0 uses only the first N devices (tests, debugging).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
  # The fit recipe applied (configs/hardware.py, run arg hw=TARGET): its target and the environment its launch
  # command needs (e.g. XLA_PYTHON_CLIENT_MEM_FRACTION on one GPU). Empty: no recipe.
  c.hardware = ml_collections.ConfigDict(dict(target="", env=ml_collections.ConfigDict()))

  # Checkpoints at the end, on SIGTERM / Ctrl-C, and periodically: every `every_minutes` of training (time, so
  # one setting suits a tiny CPU run and a 7B pod run) and/or every `every` steps (0 = off).
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=0,
      every_minutes=30.0,
      keep=2, keep_best=1, best_metric="eval/accuracy", best_mode="max", async_save=True))

  c.eval = ml_collections.ConfigDict(dict(
      every=0,                  # steps; 0 = only at the end
      batch_size=64,
      mode="likelihood",        # "likelihood" (option log-likelihood) | "generate" (generate then parse)
      likelihood_target="",         # "" scores the answer as trained (data.answer_format); "letter" | "text"
      likelihood_reduction="mean",  # mean or sum log-prob of the answer tokens
      max_new_tokens=8,
  ))
  return c


def set_remat(config, policy: str) -> None:
  """One remat policy for every tower, wherever the model config comes from (a preset, or Hugging Face weights
  through `model_overrides`)."""
  for tower in ("vision", "text", "llm"):
    if config.model and config.model.get(tower) is not None:
      config.model[tower].remat = policy
  if config.train.init_from_hf:
    config.model_overrides.remat = policy
