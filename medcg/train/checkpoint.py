"""Checkpoints: orbax CheckpointManager holding the train state and the grain iterator state together.

A checkpoint at step N holds {params, opt_state, step} and the data iterator positioned after the batches
of steps 1..N, so a restarted run sees exactly the batches it would have seen. Saves are async; orbax
commits a step atomically (a crashed save is never listed). Keep-last-N plus the best by a metric.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as ocm


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with items "state" and "data"."""

  def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 0, best_metric: str | None = None,
               best_mode: str = "max", save_every: int = 0, async_save: bool = True):
    self.directory = os.path.abspath(directory)
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
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

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


def restore_params_only(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """`init_from` another run / evaluation: read just the params of its latest (or given) checkpoint."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data"))
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in mngr.all_steps():
      raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; have {list(mngr.all_steps())}")
    target = {"params": abstract_params}
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{directory} step {step} does not fit this model's parameters: {e}") from e
    return restored["state"]["params"]
  finally:
    mngr.close()
