"""Checkpoints: orbax CheckpointManager holding the train state and the grain iterator state together.

A checkpoint at step N holds {params, opt_state, step} and the data iterator positioned after the batches
of steps 1..N, so a restarted run sees exactly the batches it would have seen. Saves are async; orbax
commits a step atomically (a crashed save is never listed). Keep-last-N plus the best by a metric.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as ocm

from medcg import fileio
from medcg.errors import UserError


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with items "state" and "data"."""

  def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 0, best_metric: str | None = None,
               best_mode: str = "max", save_every: int = 0, async_save: bool = True):
    self.directory = fileio.absolute(directory)  # local or gs://: every host of a pod must see the same one
    policies: list = [ocm.LatestN(n=max(keep, 1))]
    self.best_metric = best_metric
    if keep_best and best_metric:
      policies.append(ocm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=(best_mode == "min"),
                                n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1) if save_every else 1,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(fileio.path(self.directory), item_names=("state", "data"),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None, *,
           metrics: dict | None = None, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, data_iter: grain.DatasetIterator | None, step: int | None = None) -> Any:
    """Restore into `abstract_state` (ShapeDtypeStructs with shardings) and, in place, `data_iter`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class ParamMismatchError(UserError, ValueError):
  """`init_from` names a run whose parameters do not fit this model."""


def has_checkpoint(directory: str) -> bool:
  """Whether `directory` (a run's checkpoints/) holds at least one committed checkpoint."""
  return latest_step(directory) is not None


def _read_handlers(state: Any) -> dict[str, Any]:
  # Both items named, though only "state" is read: orbax warns about every item on disk it has no handler for.
  return {"state": state, "data": grain.checkpoint.CheckpointHandler()}


def latest_step(directory: str) -> int | None:
  """The newest committed step in `directory`, None when there is none (or no directory)."""
  d = fileio.path(directory)
  if not d.exists() or not any(True for _ in d.iterdir()):
    return None
  mngr = ocp.CheckpointManager(fileio.path(fileio.absolute(directory)), item_names=("state", "data"))
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def check_param_shapes(directory: str, abstract_params: Any, step: int | None = None) -> int:
  """Compares a checkpoint's stored param shapes with `abstract_params` from its metadata (no array is read,
  nothing compiled); returns the step. Errors name the parameter path and both shapes."""
  from medcg.train import optimizer as opt_lib
  mngr = ocp.CheckpointManager(fileio.path(fileio.absolute(directory)),
                               item_handlers=_read_handlers(ocp.StandardCheckpointHandler()))
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise ParamMismatchError(f"{directory}: no checkpoint")
    if step not in mngr.all_steps():
      raise ParamMismatchError(f"{directory}: no checkpoint at step {step}; have {list(mngr.all_steps())}")
    meta = mngr.item_metadata(step)["state"]
    stored = getattr(meta, "tree", meta)["params"]
  finally:
    mngr.close()
  # Stored trees spell a Variable's leaf as a "value" key; the live tree as an attribute (dropped by param_path).
  name = lambda p: opt_lib.param_path(p).removesuffix("/value")
  have = {name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(stored)}
  want = {name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  for name, shape in want.items():
    if name not in have:
      raise ParamMismatchError(f"{directory} step {step} has no parameter {name} {shape} that this model needs "
                               f"(it has {len(have)} parameters)")
    if have[name] != shape:
      raise ParamMismatchError(f"{directory} step {step}: parameter {name} has shape {have[name]} there but "
                               f"{shape} in this model")
  return step


def restore_params_only(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """`init_from` another run / evaluation: read just the params of its latest (or given) checkpoint."""
  step = check_param_shapes(directory, abstract_params, step)
  mngr = ocp.CheckpointManager(fileio.path(fileio.absolute(directory)),
                               item_handlers=_read_handlers(ocp.PyTreeCheckpointHandler()))
  try:
    target = {"params": abstract_params}
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{directory} step {step} does not fit this model's parameters: {e}") from e
    return restored["state"]["params"]
  finally:
    mngr.close()
