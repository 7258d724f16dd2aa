"""The train state and the jitted update step, built once for the trainer and the AOT compiler.

`medcg.train.trainer` runs what this builds; `medcg.compile` lowers and compiles the very same jitted step for
a target (a TPU topology, GPU specs) from abstract shapes, so a recipe that compiles there is the program the
trainer will run. Nothing here touches data, checkpoints or the workdir.

    parts = model_parts(config, model_cfg, mesh)              # abstract model, split, with shardings
    setup = train_setup(config, parts, mesh, total_steps)     # optimizer, state shardings, jitted step
    setup.step.lower(setup.abstract_state, *parts.abstract_sharded[1:], abstract_batch).compile()
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from medcg.train import optimizer as opt_lib
from medcg.train import sharding as shd
from medcg.train import step as step_lib


@dataclasses.dataclass
class ModelParts:
  """The abstract model split into trainable / frozen params / the rest, with their shardings on a mesh."""
  graphdef: Any
  make_model: Callable[[], Any]
  trainable: Any
  abstract: tuple[Any, Any, Any]    # params, frozen, rest (ShapeDtypeStructs)
  shardings: tuple[Any, Any, Any]

  @property
  def abstract_sharded(self) -> tuple[Any, Any, Any]:
    """(params, frozen, rest) as ShapeDtypeStructs carrying their shardings (inputs for `.lower`)."""
    return tuple(abstract(a, s) for a, s in zip(self.abstract, self.shardings))


def model_parts(config, model_cfg, mesh) -> ModelParts:
  """Split the VLM (built abstractly) by `config.train.freeze`, and shard each part by the logical rules."""
  from medcg.model import vlm as vlm_lib
  trim_cfg = config.trim if config.trim.enabled else None
  make_model = lambda: vlm_lib.build(model_cfg, rngs=nnx.Rngs(config.seed), trim=trim_cfg)
  frozen_f = opt_lib.frozen_filter(config.train.freeze)
  trainable_f = nnx.All(nnx.Param, nnx.Not(frozen_f))
  abstract_model = nnx.eval_shape(make_model)
  graphdef, abs_params, abs_frozen, abs_rest = nnx.split(abstract_model, trainable_f, nnx.Param, ...)
  if config.train.freeze:
    opt_lib.check_patterns_match(nnx.state(abstract_model, nnx.Param), config.train.freeze, "config.train.freeze")
  parts = (abs_params, abs_frozen, abs_rest)
  return ModelParts(graphdef, make_model, trainable_f, parts, tuple(shd.param_shardings(a, mesh) for a in parts))


@dataclasses.dataclass
class TrainSetup:
  """Optimizer, the state's abstract shapes and shardings, and the jitted update step (state donated)."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: dict[str, Any]    # {params, opt_state, step} ShapeDtypeStructs with shardings
  state_shardings: dict[str, Any]
  replicated: NamedSharding
  step: Any                          # jax.jit(step)(state, frozen, rest, batch) -> (state, metrics)


def train_setup(config, parts: ModelParts, mesh, total_steps: int) -> TrainSetup:
  """The optimizer over the trainable params, the state shardings (moments shard like their params) and the
  jitted train step with shardings in and out. The batch's shardings come with its arrays (global_batch)."""
  abs_params = parts.abstract[0]
  params_sh, frozen_sh, rest_sh = parts.shardings
  tx, schedule = opt_lib.make_optimizer(config.train, abs_params, max(total_steps, 1))
  abs_opt = jax.eval_shape(tx.init, abs_params)
  opt_sh = opt_shardings(abs_opt, params_sh, mesh)
  repl = NamedSharding(mesh, P())
  state_sh = {"params": params_sh, "opt_state": opt_sh, "step": repl}
  abstract_state = {
      "params": abstract(abs_params, params_sh),
      "opt_state": abstract(abs_opt, opt_sh),
      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
  }
  step = jax.jit(step_lib.make_train_step(parts.graphdef, tx, schedule, config.train.accum_steps),
                 in_shardings=(state_sh, frozen_sh, rest_sh, None),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))
  return TrainSetup(tx, schedule, abstract_state, state_sh, repl, step)


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def opt_shardings(abs_opt, params_sh, mesh):
  """Optimizer moments shard like the param at the same path (optax keeps the param tree); scalars replicate."""
  repl = NamedSharding(mesh, P())
  is_sh = lambda x: isinstance(x, NamedSharding)
  by_path = {opt_lib.param_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_sh, is_leaf=is_sh)}
  # Longest param path first, so "a/b/kernel" wins over "b/kernel".
  keys = sorted(by_path, key=len, reverse=True)

  def pick(path, x):
    if getattr(x, "ndim", 0) == 0:
      return repl
    name = opt_lib.param_path(path)
    for key in keys:
      if name == key or name.endswith("/" + key):
        return by_path[key]
    return repl

  return jax.tree_util.tree_map_with_path(pick, abs_opt)
