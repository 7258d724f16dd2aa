"""The train step: next-token cross-entropy on answer tokens, gradient accumulation, one optimizer update.

Losses are token sums divided by the token count of the whole global batch, so the same batch gives the
same loss and gradients whatever the mesh and however many micro-batches it is cut into.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Keys the model reads from a batch; everything else (labels, ids) stays out of the forward. `text_ids`
# (TRIM's CLIP-tokenized text, data.clip_text) is passed when the batch has it; the others are required.
MODEL_INPUTS = ("image", "input_ids", "attention_mask", "text_ids")
REQUIRED_MODEL_INPUTS = ("image", "input_ids", "attention_mask")


def model_batch(batch: dict) -> dict:
  """The keys the forward and the loss read: the model inputs present (required ones checked) and loss_mask."""
  missing = [k for k in REQUIRED_MODEL_INPUTS + ("loss_mask",) if k not in batch]
  if missing:
    raise KeyError(f"batch lacks {missing} (has {sorted(batch)}); see the batch contract in DEVELOPING.md")
  return {k: batch[k] for k in MODEL_INPUTS + ("loss_mask",) if k in batch}


def token_losses(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
  """Sums over the batch: masked NLL of next tokens, number of target tokens, correctly predicted ones."""
  logits = logits[:, :-1].astype(jnp.float32)
  # Placeholder ids may lie past the vocabulary (weight 0 there); an out-of-range gather would give NaN.
  targets = jnp.clip(input_ids[:, 1:], 0, logits.shape[-1] - 1)
  weights = loss_mask[:, 1:].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (logz - target_logit) * weights
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
  # An example counts as answered when every answer token is right.
  wrong_any = jnp.sum(weights - correct, axis=-1) > 0
  has_answer = jnp.sum(weights, axis=-1) > 0
  return {
      "loss_sum": jnp.sum(nll),
      "tokens": jnp.sum(weights),
      "correct_tokens": jnp.sum(correct),
      "answers_right": jnp.sum((~wrong_any & has_answer).astype(jnp.float32)),
      "answers": jnp.sum(has_answer.astype(jnp.float32)),
  }


def forward_sums(graphdef, params, frozen, rest, batch) -> dict[str, jax.Array]:
  model = nnx.merge(graphdef, params, frozen, rest)
  logits = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch.get("text_ids"))
  return token_losses(logits, batch["input_ids"], batch["loss_mask"])


def _split_micro(batch: dict, accum: int) -> dict:
  def cut(x):
    if x.shape[0] % accum:
      raise ValueError(f"config.train.accum_steps={accum} does not divide the batch of {x.shape[0]}")
    return x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
  return jax.tree.map(cut, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, accum_steps: int = 1
                    ) -> Callable[..., tuple[dict, dict]]:
  """step(state, frozen, rest, batch) -> (state, metrics); state = {params, opt_state, step}."""

  def loss_and_sums(params, frozen, rest, batch):
    sums = forward_sums(graphdef, params, frozen, rest, batch)
    return sums["loss_sum"], sums

  grad_fn = jax.grad(loss_and_sums, has_aux=True)

  def step(state: dict, frozen, rest, batch: dict) -> tuple[dict, dict]:
    params = state["params"]
    batch = model_batch(batch)
    if accum_steps == 1:
      grads, sums = grad_fn(params, frozen, rest, batch)
    else:
      micro = _split_micro(batch, accum_steps)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

      def body(carry, mb):
        g_acc, s_acc = carry
        g, s = grad_fn(params, frozen, rest, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        s_acc = jax.tree.map(jnp.add, s_acc, s)
        return (g_acc, s_acc), None

      sums0 = {k: jnp.zeros((), jnp.float32) for k in
               ("loss_sum", "tokens", "correct_tokens", "answers_right", "answers")}
      (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), micro)
    n_tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / n_tokens).astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = {
        "loss": sums["loss_sum"] / n_tokens,
        "token_accuracy": sums["correct_tokens"] / n_tokens,
        "answer_accuracy": sums["answers_right"] / jnp.maximum(sums["answers"], 1.0),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "lr": schedule(state["step"]),
        "tokens": sums["tokens"],
    }
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return step


def tree_size(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
