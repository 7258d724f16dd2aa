"""Optimizer from config: AdamW, warmup + decay, clipping, per-group learning rates and freezing by regex.

Freezing happens *before* the optimizer: frozen parameters are split off (see `partition_params`), get no
gradients and no optimizer state, which is what makes "freeze the vision tower, train projector + LLM" cheap
(the paper and TRIM both freeze the CLIP towers).

config.train fields used here:
  lr, warmup_steps (or warmup_frac), schedule ("cosine" | "linear" | "constant"), end_lr_frac,
  weight_decay, b1, b2, eps, grad_clip (0 disables), freeze (tuple of regexes on "a/b/c" param paths),
  lr_groups (tuple of (regex, multiplier); first match wins, unmatched params use 1.0).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import optax
from flax import nnx


def param_path(path: Sequence[Any]) -> str:
  """'vision/layers/attn/q/kernel' from an nnx / jax key path.

  Attribute keys (a Variable's `.value` leaf when a State is flattened as a pytree) are not part of the name.
  """
  keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path
          if not isinstance(k, jax.tree_util.GetAttrKey)]
  return "/".join(k for k in keys if not k.startswith("."))


def frozen_filter(patterns: Sequence[str]):
  """An nnx filter selecting the Params whose path matches any of `patterns` (re.fullmatch)."""
  regexes = [re.compile(p) for p in patterns]

  def is_frozen(path, value):
    return isinstance(value, nnx.Param) and any(r.fullmatch(param_path(path)) for r in regexes)

  return is_frozen


def check_patterns_match(state: nnx.State, patterns: Sequence[str], field: str) -> None:
  """A freeze / lr-group regex that matches no parameter is almost always a typo: fail loudly."""
  paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  for pat in patterns:
    rx = re.compile(pat)
    if not any(rx.fullmatch(p) for p in paths):
      raise ValueError(f"{field}: pattern {pat!r} matches no parameter; e.g. {paths[:5]}")


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to cfg.lr, then cosine / linear decay to cfg.lr * end_lr_frac, or constant."""
  warmup = int(cfg.get("warmup_steps", 0) or round(cfg.get("warmup_frac", 0.0) * total_steps))
  warmup = min(warmup, max(total_steps - 1, 0))
  end = cfg.lr * cfg.get("end_lr_frac", 0.0)
  kind = cfg.get("schedule", "cosine")
  decay_steps = max(total_steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.get("end_lr_frac", 0.0))
  elif kind == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"config.train.schedule: unknown schedule {kind!r}; use cosine, linear or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _decay_mask(params):
  # No weight decay on biases, norm scales and other 1-D parameters.
  return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(cfg, params: nnx.State, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW over the trainable params, with per-group learning-rate multipliers."""
  sched = schedule(cfg, total_steps)
  groups = list(cfg.get("lr_groups", ()) or ())
  if groups:
    check_patterns_match(params, [g[0] for g in groups], "config.train.lr_groups")

  def adamw(mult: float):
    lr = sched if mult == 1.0 else (lambda step, m=mult: sched(step) * m)
    return optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                       weight_decay=cfg.get("weight_decay", 0.0), mask=_decay_mask)

  if groups:
    regexes = [(re.compile(p), f"group{i}") for i, (p, _) in enumerate(groups)]

    def label(path, _):
      name = param_path(path)
      return next((lab for rx, lab in regexes if rx.fullmatch(name)), "default")

    labels = jax.tree_util.tree_map_with_path(label, params)
    transforms = {f"group{i}": adamw(float(m)) for i, (_, m) in enumerate(groups)}
    transforms["default"] = adamw(1.0)
    tx = optax.multi_transform(transforms, labels)
  else:
    tx = adamw(1.0)
  clip = cfg.get("grad_clip", 0.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, sched
