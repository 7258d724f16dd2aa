"""Batched generation with a KV cache, and option log-likelihood scoring.

Padding convention: prompts are **left-padded** for generation, so every row's last prompt token
sits in the same cache slot and decode steps write one shared slot. `left_pad` converts any
padding (the pipeline's right padding included) by moving each row's real tokens to the right end.

Two layers, so the VLM (whose prefill also takes images) reuses the loop:
  * `decode(step_fn, first_logits, cache, ...)`: traceable; `step_fn(ids (B, 1), cache) ->
    (logits (B, 1, V), cache)` runs one decode step. Call it inside your own `jax.jit` after your
    own prefill.
  * `generate(model, input_ids, attention_mask, ...)`: a jitted prefill + `decode` for `LLM`.
Greedy at temperature 0; else temperature + nucleus (top_p) sampling from an explicit `rng`.

Outputs: `tokens` (B, max_new_tokens) with every position after a row's stop token (the stop token
itself is kept) set to `pad_id`, and `lengths` (B,) = generated tokens up to and including the stop.

`score_options(forward, ...)` scores multiple-choice options without parsing: the sum and mean
log-prob of each option's tokens given the prompt, all options of a batch in one forward.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from medcg.model import llm as llm_lib

StepFn = Callable[[jax.Array, llm_lib.KVCache], tuple[jax.Array, llm_lib.KVCache]]


def left_pad(ids: jax.Array, mask: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Moves each row's real tokens (mask 1) to the right end, keeping their order."""
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)  # pads first, then tokens
  mask = jnp.take_along_axis(mask, order, axis=1)
  ids = jnp.where(mask > 0, jnp.take_along_axis(ids, order, axis=1), pad_id)
  return ids, mask


def sample_token(logits: jax.Array, rng: jax.Array, *, temperature: float | jax.Array = 0.0,
                 top_p: float | jax.Array = 1.0) -> jax.Array:
  """Next token ids (B,) from logits (B, V): greedy at a Python temperature of 0, else nucleus
  sampling (temperature and top_p may be traced, so changing them does not recompile)."""
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (the top token always stays; top_p >= 1
  # keeps everything).
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode(step_fn: StepFn, first_logits: jax.Array, cache, *, max_new_tokens: int,
           eos_ids: Sequence[int] = (), pad_id: int = 0, temperature: float | jax.Array = 0.0,
           top_p: float | jax.Array = 1.0, rng: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """Samples `max_new_tokens` tokens after a prefill whose last-position logits are `first_logits`.

  Stops early once every row has produced a stop token (`eos_ids`). Traceable, static shapes.
  A Python `temperature == 0` is greedy; otherwise temperature / top_p may be traced values.
  Returns (tokens (B, max_new_tokens) int32, lengths (B,) int32).
  """
  batch = first_logits.shape[0]
  rng = jax.random.key(0) if rng is None else rng
  stops = jnp.asarray(tuple(eos_ids) or (-1,), jnp.int32)
  sample = functools.partial(sample_token, temperature=temperature, top_p=top_p)

  first = sample(first_logits, jax.random.fold_in(rng, 0))
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stops)
  lengths = jnp.ones((batch,), jnp.int32)

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, last, cache, tokens, done, lengths = state
    logits, cache = step_fn(last[:, None], cache)
    token = sample(logits[:, -1], jax.random.fold_in(rng, i))
    token = jnp.where(done, pad_id, token)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, stops)
    return i + 1, token, cache, tokens, done, lengths

  state = (jnp.int32(1), first, cache, tokens, done, lengths)
  _, _, _, tokens, _, lengths = jax.lax.while_loop(cond, body, state)
  return tokens, lengths


def eos_tuple(eos) -> tuple[int, ...]:
  """A config's `eos_token_id` (None, an int or a list) as a tuple of stop ids."""
  if eos is None:
    return ()
  return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else (eos,)))


_eos_tuple = eos_tuple  # the name medcg.model.vlm used first


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "eos_ids", "pad_id", "greedy"))
def _generate(model, input_ids, attention_mask, rng, temperature, top_p, *, max_new_tokens,
              eos_ids, pad_id, greedy):
  ids, mask = left_pad(input_ids, attention_mask, pad_id)
  batch, length = ids.shape
  cache = llm_lib.init_cache(model.cfg, batch, length + max_new_tokens)
  logits, cache = model(ids, attention_mask=mask, cache=cache)
  ones = jnp.ones((batch, 1), jnp.int32)

  def step_fn(token, cache):
    return model(token, attention_mask=ones, cache=cache)

  return decode(step_fn, logits[:, -1], cache, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                pad_id=pad_id, temperature=0.0 if greedy else temperature, top_p=top_p, rng=rng)


def generate(model: llm_lib.LLM, input_ids, attention_mask=None, *, max_new_tokens: int,
             eos_ids: int | Sequence[int] | None = None, pad_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None):
  """Batched generation from an `LLM` (jitted; recompiles per shape, stop ids, and greedy vs
  sampled; temperature and top_p are traced).

  `input_ids`/`attention_mask` (B, T) with left or right padding; `eos_ids` default to the
  config's `eos_token_id`, `pad_id` to its `pad_token_id` (else 0). Returns (tokens, lengths).
  """
  cfg = model.cfg
  eos = eos_tuple(cfg.eos_token_id if eos_ids is None else eos_ids)
  pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = (jnp.ones_like(input_ids) if attention_mask is None
          else jnp.asarray(attention_mask, jnp.int32))
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, input_ids, mask, rng, jnp.float32(temperature), jnp.float32(top_p),
                   max_new_tokens=int(max_new_tokens), eos_ids=eos, pad_id=int(pad),
                   greedy=float(temperature) == 0.0)


def score_options(forward: Callable[[jax.Array, jax.Array], jax.Array], prompt_ids, prompt_mask,
                  option_ids, option_mask, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Sum and mean log-prob (B, O) of each option's tokens given its prompt.

  prompt_ids/prompt_mask (B, P), any padding; option_ids/option_mask (B, O, L), option tokens
  first then padding (mask 0; rows with fewer options are all-zero and score 0).
  `forward(ids (B*O, P+L), mask) -> logits (B*O, P+L, V)` sees rows in (example, option) order,
  so a VLM forward repeats each example's image O times. Traceable: jit around it.
  """
  ids, mask = left_pad(prompt_ids, prompt_mask, pad_id)
  batch, num_options, opt_len = option_ids.shape
  prompt_len = ids.shape[1]
  flat_opts = option_ids.reshape(batch * num_options, opt_len)
  flat_opt_mask = option_mask.reshape(batch * num_options, opt_len).astype(mask.dtype)
  full_ids = jnp.concatenate([jnp.repeat(ids, num_options, axis=0), flat_opts], axis=1)
  full_mask = jnp.concatenate([jnp.repeat(mask, num_options, axis=0), flat_opt_mask], axis=1)
  logits = forward(full_ids, full_mask)
  # Logits at t predict token t + 1: option token j is predicted at prompt_len - 1 + j.
  logits = logits[:, prompt_len - 1:prompt_len - 1 + opt_len].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_logp = jnp.take_along_axis(logp, flat_opts[..., None], axis=-1)[..., 0]
  weights = flat_opt_mask.astype(jnp.float32)
  total = jnp.sum(token_logp * weights, axis=1)
  mean = total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  shape = (batch, num_options)
  return total.reshape(shape), mean.reshape(shape)


@jax.jit
def score_options_lm(model: llm_lib.LLM, prompt_ids, prompt_mask, option_ids, option_mask):
  """`score_options` for an `LLM` (jitted)."""
  def forward(ids, mask):
    return model(ids, attention_mask=mask)[0]
  return score_options(forward, prompt_ids, prompt_mask, option_ids, option_mask)
