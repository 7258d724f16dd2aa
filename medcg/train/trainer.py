"""The medcg trainer: one readable loop from a laptop CPU to a TPU pod.

    python -m medcg.train --config configs/cg_table3.py:row=15 --workdir runs/row15 [--config.train.lr=1e-4]

Sections: set up (multi-host, logging, run record) -> mesh -> input pipeline -> model & optimizer, created
sharded -> checkpoint restore or init_from -> update step -> evaluation -> train loop (SIGTERM-safe,
NaN-checked). Restarting with the same workdir resumes exactly: same params, optimizer state, and the
data iterator at the same position.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from medcg import fileio
from medcg.errors import ConfigError, UserError
from medcg.train import checkpoint as ckpt_lib
from medcg.train import mfu as mfu_lib
from medcg.train import optimizer as opt_lib
from medcg.train import provenance
from medcg.train import run_info
from medcg.train import run_record
from medcg.train import state as state_lib
from medcg.train import sharding as shd
from medcg.train import summary
from medcg.eval import metrics as results_lib  # results.json's name; eval never imports the trainer
from medcg.train import tb as tb_lib


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is left as it was."""


@dataclasses.dataclass
class TrainResult:
  step: int
  losses: list[float]            # per step, in order (this process's run only)
  metrics: dict[str, float]      # last step's metrics + final eval
  preempted: bool = False        # stopped by SIGTERM / Ctrl-C (checkpointed at `step` if a step ran)
  param_specs: dict[str, tuple] = dataclasses.field(default_factory=dict)  # trained params' mesh axes per dim


class _StopRequest:
  """SIGTERM (TPU VMs, schedulers) and Ctrl-C set a flag; the loop checkpoints at the next step boundary and
  exits cleanly. A second Ctrl-C aborts at once. Installed before the model is built, so a Ctrl-C during
  compilation never interrupts XLA halfway (it is acted on after the first step)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._old: dict[int, Any] = {}

  def _handler(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt("second Ctrl-C: aborting without a checkpoint")
    name = signal.Signals(signum).name
    logging.warning("%s received: checkpointing at the next step boundary", name)
    if jax.process_index() == 0:
      print(f"medcg.train: {name}: checkpointing at the next step boundary"
            f"{' (Ctrl-C again to abort now)' if signum == signal.SIGINT else ''}", file=sys.stderr, flush=True)
    self.requested = True

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not in the main thread (e.g. a test harness): no handler
        pass
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _agree(stop: bool, due: bool) -> tuple[bool, bool]:
  """Every host takes the same step-boundary decisions: stop if any host was signalled; save when process 0's
  clock says a periodic checkpoint is due (clocks differ across hosts, and a save is collective)."""
  if jax.process_count() == 1:
    return stop, due
  from jax.experimental import multihost_utils
  flags = np.asarray(multihost_utils.process_allgather(np.array([stop, due])))
  return bool(flags[:, 0].any()), bool(flags[0, 1])


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class _RunLogs:
  """metrics.jsonl (and batches.jsonl) plus TensorBoard events, written by process 0.

  Rows and events an earlier attempt logged after the step this attempt resumes from are dropped (TensorBoard:
  a purge at `keep_through + 1`), so each step appears once. The JSON-lines files are rewritten whole (object
  stores cannot append) at most every `flush_secs`, and at every checkpoint and at exit.
  """

  def __init__(self, workdir: str, keep_through: int, log_batches: bool, flush_secs: float = 30.0):
    self.enabled = jax.process_index() == 0
    self.flush_secs = flush_secs
    self._last_flush = time.monotonic()
    if not self.enabled:
      return
    self.metrics = fileio.JsonlLog(fileio.join(workdir, "metrics.jsonl"), keep_through=keep_through)
    self.batches = (fileio.JsonlLog(fileio.join(workdir, "batches.jsonl"), keep_through=keep_through)
                    if log_batches else None)
    self.tb = tb_lib.summary_writer(fileio.join(workdir, "tb"), purge_step=keep_through + 1)

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.metrics.append({"step": step, **metrics}, flush=False)
    self._maybe_flush()

  def batch(self, step: int, loss: float, sample_ids) -> None:
    if self.enabled and self.batches is not None:
      self.batches.append({"step": step, "loss": loss, "sample_ids": [str(x) for x in sample_ids]}, flush=False)
      self._maybe_flush()

  def _maybe_flush(self) -> None:
    if time.monotonic() - self._last_flush >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    if not self.enabled:
      return
    self.metrics.flush()
    if self.batches is not None:
      self.batches.flush()
    self.tb.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self.flush()
      self.tb.close()


# Benchmarks only (experiments/bench_train.py --loop): True runs the loop as it was before it went asynchronous,
# the host waiting for every step's loss before it reads and stages the next batch.
_WAIT_EACH_STEP = False
# The host runs at most this many steps ahead of the devices (each queued step holds its staged batch in device
# memory); two keep the next step and its batch ready while one runs.
STEPS_IN_FLIGHT = 2


def _due(every_s: float, last_save: float) -> bool:
  """Whether a time-based checkpoint is due on this host's clock (checkpoint.every_minutes; 0 = off)."""
  return bool(every_s) and time.monotonic() - last_save >= every_s


class _PendingSteps:
  """Steps dispatched but not read back yet: each one's loss (a device scalar) and its batch's sample ids.

  The train loop reads them all in one `jax.device_get` at its sync points instead of a blocking `float(loss)`
  per step, so the host dispatches the next step and stages its batch while the devices run. The ids wait here
  with their step's loss, so however late the NaN guard reads a loss it names that step's own batch. At most
  one sync interval (train.log_every steps) is held.
  """

  def __init__(self):
    self._steps: list[tuple[int, jax.Array, Any]] = []

  def add(self, step: int, loss: jax.Array, sample_ids) -> None:
    self._steps.append((step, loss, sample_ids))

  def bound_run_ahead(self, steps_in_flight: int) -> None:
    """Wait (no transfer) until all but the last `steps_in_flight` pending steps are done, so the host never
    queues more steps, and their staged batches, than that on the devices: in steady state those steps finished
    long ago and this returns at once."""
    if len(self._steps) > steps_in_flight:
      self._steps[-steps_in_flight - 1][1].block_until_ready()

  def read(self, extra: Any = None) -> tuple[list[tuple[int, float, Any]], Any]:
    """Pops every pending step as (step, loss, sample_ids) in step order, plus `extra` (a pytree of device
    arrays, e.g. the last step's metrics) fetched in the same transfer."""
    steps, self._steps = self._steps, []
    values, extra = jax.device_get(([loss for _, loss, _ in steps], extra))
    return [(s, float(v), ids) for (s, _, ids), v in zip(steps, values)], extra


class _StepClock:
  """Average step time since the last sync point.

  With asynchronous dispatch the host cannot see when one step ends without waiting for it, so step time
  (and tokens/s and MFU from it) is the wall time between two sync points over the steps dispatched in between;
  the first window holds compilation. Restarted after evaluations and checkpoints, which are not training.
  """

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self._t0, self.steps, self.tokens = time.perf_counter(), 0, 0

  def tick(self, tokens: int) -> None:
    self.steps += 1
    self.tokens += tokens

  def lap(self) -> tuple[float, float]:
    """(seconds per step, tokens per step) of this host over the window, and a new window starts."""
    dt = (time.perf_counter() - self._t0) / max(self.steps, 1)
    tokens = self.tokens / max(self.steps, 1)
    self.restart()
    return dt, tokens


class _IteratorPosition(grain.DatasetIterator):
  """The data iterator's position captured before the next batch is read ahead, for the checkpoint of the step
  just dispatched: that checkpoint must resume after its own batch, not after the one already staged."""

  def __init__(self, it: grain.DatasetIterator):
    super().__init__()
    self._state = copy.deepcopy(it.get_state())

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state) -> None:
    raise TypeError("a saved iterator position; restore into the live iterator")

  def __next__(self):
    raise TypeError("a saved iterator position yields no batches")


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """jax.distributed.initialize() when more than one process is configured (flags or the environment)."""
  if num_processes > 1 or coordinator:
    # CPU processes exchange collectives over gloo; asking jax for the backend here would initialise it,
    # which jax.distributed.initialize() forbids, so decide from the environment.
    if "cpu" in os.environ.get("JAX_PLATFORMS", "").split(","):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator or None,
                               num_processes=num_processes or None,
                               process_id=None if process_id < 0 else process_id)
  elif os.environ.get("MEDCG_DISTRIBUTED", "") == "1":  # pods: the environment says everything
    jax.distributed.initialize()


def validate_config(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Checks that need no compilation: mesh vs devices, batch vs data parallelism, accumulation, init_from."""
  try:
    mesh = shd.mesh_from_config(config.mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  dp = shd.data_parallel_size(mesh)
  b = config.data.batch_size
  if b % dp:
    raise ConfigError(f"config.data.batch_size={b} is not divisible by the data-parallel size {dp} "
                      f"(config.mesh={dict(mesh.shape)})")
  if b % jax.process_count():
    raise ConfigError(f"config.data.batch_size={b} is not divisible by the {jax.process_count()} processes")
  acc = config.train.accum_steps
  if acc < 1 or (b // dp) % acc:
    raise ConfigError(f"config.train.accum_steps={acc} must divide the per-shard batch {b // dp}")
  if config.train.steps != 0 and not config.data.mixture:
    raise ConfigError("config.data.mixture is empty: nothing to train on (set config.train.steps=0 to only "
                      "evaluate the untrained model)")
  if config.checkpoint.get("every_minutes", 0) < 0 or config.checkpoint.every < 0:
    raise ConfigError("config.checkpoint.every / every_minutes must be >= 0 (0 = off)")
  if config.train.init_from and not ckpt_lib.has_checkpoint(_ckpt_dir(config.train.init_from)):
    raise ConfigError(f"config.train.init_from={config.train.init_from}: no checkpoint in "
                      f"{_ckpt_dir(config.train.init_from)} (train that run first)")
  return mesh


def total_train_steps(config: ml_collections.ConfigDict) -> int:
  """config.train.steps when >= 0, else epochs over the training mixture (0: an untrained arm)."""
  if config.train.steps >= 0:
    return int(config.train.steps)
  n_train = sum(int(n) for _, _, n in config.data.mixture)
  return max(n_train // config.data.batch_size, 1) * int(config.train.epochs)


def _ckpt_dir(workdir: str) -> str:
  return fileio.join(workdir, "checkpoints")


def finished_step(workdir: str, total_steps: int) -> int | None:
  """The step a finished run in `workdir` ended at, or None when there is work left (or no run).

  Trained: its latest checkpoint is at or past `total_steps` (the last step's checkpoint is written after its
  evaluation). Untrained (total_steps == 0): its results.json exists. Reads storage only; nothing is compiled.
  """
  if not fileio.exists(fileio.join(workdir, provenance.CONFIG_FILE)):
    return None
  if total_steps == 0:
    return 0 if fileio.exists(fileio.join(workdir, results_lib.RESULTS_FILE)) else None
  latest = ckpt_lib.latest_step(_ckpt_dir(workdir))
  return latest if latest is not None and latest >= total_steps else None


def _final_metrics(workdir: str) -> dict[str, float]:
  """A finished run's final evaluation as the trainer returned it (eval/...), from its results.json."""
  path = fileio.join(workdir, results_lib.RESULTS_FILE)
  if not fileio.exists(path):
    return {}
  from medcg.eval import runner
  return {f"eval/{k}": v for k, v in runner.flat_metrics(fileio.read_json(path)).items()}


# ------------------------------------------------------------------------------------------------------
# Model parts and initial parameters: one construction for the trainer, medcg.eval and the AOT tools.
# ------------------------------------------------------------------------------------------------------
# The abstract model and its shardings live in medcg.train.state (shared with medcg.compile).
ModelParts = state_lib.ModelParts
model_parts = state_lib.model_parts


def initial_params(config, parts: ModelParts, mesh, *, with_init_from: bool = True):
  """(params, frozen, rest) a run starts from: Hugging Face weights or the seeded init, then (with_init_from)
  the trainable params of `config.train.init_from`'s latest checkpoint. Frozen params are never checkpointed:
  they always come from here, in training and in evaluation alike."""
  from medcg.model import vlm as vlm_lib
  trim_cfg = config.trim if config.trim.enabled else None
  if config.train.init_from_hf:
    loaded = vlm_lib.load_vlm(config.train.init_from_hf, clip_path=config.train.init_from_clip or None,
                              image_size=_hf_image_size(config), trim=trim_cfg, mesh=mesh, **_dtype_overrides(config))
    _, params, frozen, rest = nnx.split(loaded, parts.trainable, nnx.Param, ...)
  else:
    def init_all():
      _, p, f, r = nnx.split(parts.make_model(), parts.trainable, nnx.Param, ...)
      return p, f, r
    params, frozen, rest = jax.jit(init_all, out_shardings=parts.shardings)()
  if with_init_from and config.train.init_from:
    params = ckpt_lib.restore_params_only(_ckpt_dir(config.train.init_from),
                                          _abstract(parts.abstract[0], parts.shardings[0]))
  return params, frozen, rest


def train(config: ml_collections.ConfigDict, workdir: str, *,
          evaluate_fn: Callable[..., dict[str, float]] | None = None,
          fail_at_step: int = -1, overwrite: bool = False) -> TrainResult:
  """Train per `config` in `workdir`, resuming from its latest checkpoint if there is one.

  A workdir holding another experiment is refused before anything is written (medcg.train.provenance);
  `overwrite` deletes it first. evaluate_fn(model, step) -> metrics is the evaluation hook; by default
  medcg.eval.runner evaluates config.data.eval_mixture (writing workdir/eval/step_N/ and, at the last step,
  workdir/results.json). fail_at_step injects a NaN loss at that step (tests of the NaN guard).
  """
  with _StopRequest() as stop:
    return _train(config, workdir, stop, evaluate_fn=evaluate_fn, fail_at_step=fail_at_step, overwrite=overwrite)


def _train(config, workdir, stop: _StopRequest, *, evaluate_fn, fail_at_step, overwrite) -> TrainResult:
  from medcg import preflight
  from medcg.data import pipeline
  from medcg.data import tokenizer as tok_lib
  from medcg.model import vlm as vlm_lib

  # --------------------------------------------------------------------------------------------------
  # Checks before any write: the config, the data it reads, the workdir's experiment.
  # --------------------------------------------------------------------------------------------------
  t0 = time.monotonic()
  fileio.path(workdir)  # a gs:// workdir without its backend package fails first, naming the package
  workdir = fileio.absolute(workdir)
  mesh = validate_config(config)
  changes = provenance.check_workdir(workdir, config, overwrite=overwrite)
  total_steps = total_train_steps(config)
  done = None if overwrite else finished_step(workdir, total_steps)
  if done is not None:  # before the data check and any compile: a re-run of a finished run returns in seconds
    results = fileio.join(workdir, results_lib.RESULTS_FILE)
    summary.say(summary.finished_text(done, total_steps, workdir, results if fileio.exists(results) else None,
                                        changes))
    return TrainResult(step=done, losses=[], metrics=_final_metrics(workdir))
  preflight.check_data(config)
  if overwrite and jax.process_index() == 0:
    provenance.clear_workdir(workdir)
  _sync("medcg-workdir-ready")
  fileio.makedirs(workdir)
  logging.info("mesh %s on %d devices (%s)", dict(mesh.shape), jax.device_count(), jax.devices()[0].device_kind)

  # --------------------------------------------------------------------------------------------------
  # Model config (from the checkpoint when fine-tuning Hugging Face weights) and tokenizer.
  # --------------------------------------------------------------------------------------------------
  trim_cfg = config.trim if config.trim.enabled else None
  tokenizer = tok_lib.make_tokenizer(config.data.tokenizer)
  model_cfg = model_config(config, tokenizer)
  check_tokenizer(tokenizer, model_cfg)

  # --------------------------------------------------------------------------------------------------
  # Input pipeline: each host reads its slice of the global batch.
  # --------------------------------------------------------------------------------------------------
  n_image_tokens = vlm_lib.num_image_tokens(model_cfg, trim_cfg)
  data_cfg = run_info.pipeline_config(config, config.data.mixture, config.data.batch_size, n_image_tokens,
                                      training=True)
  train_iter = None
  if total_steps:
    train_iter = pipeline.make_train_iterator(data_cfg, tokenizer, seed=config.seed,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())

  # --------------------------------------------------------------------------------------------------
  # Model & optimizer, created already sharded: eval_shape -> shardings from the rules -> jitted init.
  # --------------------------------------------------------------------------------------------------
  parts = model_parts(config, model_cfg, mesh)
  graphdef = parts.graphdef
  setup = state_lib.train_setup(config, parts, mesh, total_steps)
  opt_sh = setup.state_shardings["opt_state"]
  repl = setup.replicated

  with shd.use_mesh(mesh):
    # ------------------------------------------------------------------------------------------------
    # Checkpoint: resume from this workdir, else init_from (HF or another run), else scratch.
    # ------------------------------------------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(_ckpt_dir(workdir), keep=config.checkpoint.keep,
                                 keep_best=config.checkpoint.keep_best, best_metric=config.checkpoint.best_metric,
                                 best_mode=config.checkpoint.best_mode, async_save=config.checkpoint.async_save)
    resume_step = ckpt.latest_step()
    if resume_step is None and config.train.init_from:  # shapes from metadata: fail before compiling anything
      ckpt_lib.check_param_shapes(_ckpt_dir(config.train.init_from), parts.abstract[0])
    if jax.process_index() == 0:
      run_record.write_run_record(workdir, config, resumed_from=resume_step, changes=changes)
    summary.write([summary.resume_text(workdir, resume_step, total_steps, changes), summary.mesh_text(mesh),
                   f"model: {summary.params_text(parts.abstract)}",
                   f"train on {summary.mixture_text(config.data.mixture)}; {summary.schedule_text(config, total_steps)}"
                   if total_steps else summary.schedule_text(config, total_steps),
                   f"evaluate on {summary.eval_text(config)}"])
    params, frozen, rest = initial_params(config, parts, mesh, with_init_from=resume_step is None)
    if resume_step is not None:
      del params
      state = ckpt.restore(setup.abstract_state, train_iter)
      logging.info("resumed from step %d of %s", int(state["step"]), ckpt.directory)
    else:
      opt_state = jax.jit(setup.tx.init, out_shardings=opt_sh)(params)
      state = {"params": params, "opt_state": opt_state,
               "step": jax.device_put(jnp.zeros((), jnp.int32), repl)}

    # ------------------------------------------------------------------------------------------------
    # Update step: plain jax.jit with shardings in and out, the state donated (medcg.train.state, the
    # same program `python -m medcg.compile` compiles for a target).
    # ------------------------------------------------------------------------------------------------
    train_step = setup.step
    flops_per_example = vlm_lib.model_flops(model_cfg, data_cfg.seq_len, training=True, trim=trim_cfg)
    flops_per_step = flops_per_example * config.data.batch_size

    # ------------------------------------------------------------------------------------------------
    # Evaluation hook.
    # ------------------------------------------------------------------------------------------------
    if evaluate_fn is None and config.data.eval_mixture:
      from medcg.eval import runner  # one way: the runner imports train's lower modules, never this one
      evaluate_fn = runner.make_trainer_hook(config, workdir, tokenizer, mesh=mesh, final_step=total_steps,
                                             progress=jax.process_index() == 0)

    def run_eval(state) -> dict[str, float]:
      if evaluate_fn is None:  # no evaluation mixture
        return {}
      return evaluate_fn(nnx.merge(graphdef, state["params"], frozen, rest), int(state["step"]))

    # ------------------------------------------------------------------------------------------------
    # Train loop: checkpoints at the end, periodically (time and/or steps), on SIGTERM / Ctrl-C.
    # The host never waits for a step between sync points: it dispatches step N (jax runs it asynchronously),
    # reads and stages batch N+1 on the devices while N runs, and leaves the losses on the devices. Sync points
    # are the log steps (every train.log_every, the first and the last) and the evaluation and checkpoint
    # steps, which wait for the state anyway. There, in order: one device_get of every pending loss, the NaN
    # guard over them, batches.jsonl rows, metrics, evaluation, checkpoint. So a NaN is caught at most
    # log_every steps late, with its own step and batch, and always before a checkpoint of a later state.
    # ------------------------------------------------------------------------------------------------
    start = int(state["step"])
    logs = _RunLogs(workdir, keep_through=start if total_steps else -1, log_batches=config.train.log_batches)
    losses: list[float] = []
    metrics: dict[str, float] = {}
    preempted = False
    every_s = 60.0 * float(config.checkpoint.get("every_minutes", 0) or 0)
    last_save = time.monotonic()
    multihost = jax.process_count() > 1
    pending = _PendingSteps()

    def save(step, state, data_at, eval_metrics=None):
      nonlocal last_save
      best_ok = eval_metrics and config.checkpoint.best_metric in eval_metrics
      logs.flush()  # first: once the checkpoint commits, every row up to its step is already stored
      ckpt.save(step, state, data_at, metrics=eval_metrics if best_ok else None, force=True)
      last_save = time.monotonic()

    def read_back(step, m=None):
      """The sync: every pending step's loss (and `m`) in one transfer, NaN-checked, into losses and logs."""
      done, m = pending.read(m)
      for s, loss, ids in done:
        if s == fail_at_step:
          loss = float("nan")
        if config.train.nan_check and not math.isfinite(loss):
          ckpt.wait()
          raise NonFiniteLossError(
              f"loss is {loss} at step {s}; batch sample ids: {[str(x) for x in np.asarray(ids)]}. The last "
              f"good checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is untouched (losses are "
              f"checked at log steps and before every checkpoint; this one at step {step}).")
        losses.append(loss)
        if config.train.log_batches:
          logs.batch(s, loss, np.asarray(ids))
      return m

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start, desc="train", disable=jax.process_index() != 0 or not total_steps,
               dynamic_ncols=True)
    try:
      step = start
      if _agree(stop.requested, False)[0]:  # signalled during set-up: nothing new to save
        preempted = True
      clock = _StepClock()
      if step < total_steps and not preempted:
        local = next(train_iter)
        batch = shd.global_batch(local, mesh)
      while step < total_steps and not preempted:
        state, m = train_step(state, frozen, rest, batch)  # returns at once: step N runs on the devices
        step += 1
        pending.add(step, m["loss"], local.get("sample_id", ()))
        pending.bound_run_ahead(STEPS_IN_FLIGHT)
        clock.tick(int(np.sum(local["attention_mask"])))
        if _WAIT_EACH_STEP:
          float(m["loss"])
        is_last = step == total_steps
        log_now = step % config.train.log_every == 0 or is_last or step == start + 1
        eval_now = bool(config.eval.every and step % config.eval.every == 0) or is_last
        save_now = is_last or bool(config.checkpoint.every and step % config.checkpoint.every == 0)
        synced = log_now or eval_now or save_now
        # Stop requests and time-based checkpoints: on one host plain flags, agreed on at every step for free.
        # Across hosts the agreement is a collective, i.e. a sync, so it happens only at steps that sync anyway,
        # after the next batch is staged: a stop request or a due checkpoint then acts within log_every steps.
        stop_now, due = (False, False) if multihost else _agree(stop.requested, _due(every_s, last_save))
        save_now = save_now or stop_now or due
        # Stage batch N+1 while step N runs. A checkpoint at step N resumes after batch N: when this step may
        # save, take the iterator's position before reading on.
        data_at = train_iter
        if not (is_last or stop_now):
          if save_now or (multihost and synced):
            data_at = _IteratorPosition(train_iter)
          local = next(train_iter)
          batch = shd.global_batch(local, mesh)
        if multihost and synced:
          stop_now, due = _agree(stop.requested, _due(every_s, last_save))
          save_now = save_now or stop_now or due
        bar.update(1)
        if not (synced or save_now):
          continue

        # A sync point: the pending steps (NaN guard, batch rows), then metrics, evaluation, checkpoint.
        m = read_back(step, m if log_now else None)
        if log_now:
          metrics = {k: float(v) for k, v in m.items()}
          # The average over the steps since the last sync point (_StepClock): one step is not observable.
          dt, tokens = clock.lap()
          metrics["step_time_s"] = dt
          metrics["tokens_per_s"] = tokens * jax.process_count() / dt
          u = mfu_lib.mfu(flops_per_step, dt, jax.device_count())
          if u is not None:
            metrics["mfu"] = u
          logs.scalars(step, {f"train/{k}": v for k, v in metrics.items()})
          bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{metrics['lr']:.2e}")
        eval_metrics = {}
        if eval_now and is_last and evaluate_fn is not None:  # below the finished bar: eval has its own
          bar.close()
          summary.say(f"evaluating step {step:,} on {summary.mixture_text(config.data.eval_mixture)}")
        if eval_now:
          eval_metrics = {f"eval/{k}": v for k, v in run_eval(state).items()}
          if eval_metrics:
            logs.scalars(step, eval_metrics)
            metrics.update(eval_metrics)
        if save_now:
          save(step, state, data_at, eval_metrics)
        if eval_now or save_now:
          clock.restart()
        preempted = stop_now
      bar.close()
      if total_steps == 0:  # an untrained arm (the paper's Baseline): evaluate the initial model only
        if evaluate_fn is not None:
          summary.say(f"evaluating the initial model (untrained arm) on "
                      f"{summary.mixture_text(config.data.eval_mixture)}")
        metrics = {f"eval/{k}": v for k, v in run_eval(state).items()}
        logs.scalars(0, metrics)
    finally:
      logs.close()
      ckpt.close()
  specs = {opt_lib.param_path(p): tuple(x.sharding.spec)
           for p, x in jax.tree_util.tree_leaves_with_path(state["params"]) if hasattr(x, "sharding")}
  results = fileio.join(workdir, results_lib.RESULTS_FILE)
  report_dir = fileio.join(workdir, "eval", f"step_{step}") if config.data.eval_mixture else None
  summary.write(summary.end_lines(step=step, total_steps=total_steps, losses=losses, metrics=metrics,
                                  preempted=preempted, seconds=time.monotonic() - t0, workdir=workdir,
                                  results=results if config.data.eval_mixture else None, report_dir=report_dir))
  return TrainResult(step=step, losses=losses, metrics=metrics, preempted=preempted, param_specs=specs)


# ------------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------------
def _dtype_overrides(config) -> dict[str, str]:
  return {k: config.model_overrides[k] for k in ("dtype", "param_dtype", "remat")
          if config.get("model_overrides") and config.model_overrides.get(k)}


def _hf_image_size(config) -> int | None:
  """The static image side a Qwen2-VL checkpoint is imported at: the preset's (config.model.vision.image_size)."""
  from medcg.model import vlm as vlm_lib
  if config.model and vlm_lib.family(config.model) != "llava":
    return int(config.model.vision.image_size)
  return None


def model_config(config: ml_collections.ConfigDict, tokenizer=None) -> ml_collections.ConfigDict:
  """config.model, or the config of the Hugging Face checkpoint being fine-tuned (config.train.init_from_hf).

  A model trained from scratch takes its vocabulary size and special ids from the tokenizer
  (config.model_vocab_from_tokenizer, default on), so any tokenizer fits any preset.
  """
  from medcg.model import hf, vlm as vlm_lib
  if config.train.init_from_hf:
    ckpt = hf.open_checkpoint(config.train.init_from_hf)
    clip_cfg = hf.open_checkpoint(config.train.init_from_clip).config if config.train.init_from_clip else None
    return vlm_lib.config_from_hf(ckpt.config, clip_cfg, image_size=_hf_image_size(config),
                                  **_dtype_overrides(config))
  if not config.model:
    raise ValueError("config.model is empty: set a preset (configs/models.py) or config.train.init_from_hf")
  cfg = config.model
  if tokenizer is not None and config.get("model_vocab_from_tokenizer", True):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    vocab = max(tokenizer.vocab_size, tokenizer.image_token_id + 1)
    cfg.llm.vocab_size = -(-vocab // 8) * 8
    cfg.llm.bos_token_id = tokenizer.bos_id
    cfg.llm.eos_token_id = tokenizer.eos_id
    cfg.llm.pad_token_id = tokenizer.pad_id
    cfg.image_token_id = tokenizer.image_token_id
  return cfg


def check_tokenizer(tokenizer, model_cfg) -> None:
  """The tokenizer's special ids must be the model's, and its vocabulary must fit the embedding."""
  if tokenizer.image_token_id != model_cfg.image_token_id:
    raise ValueError(f"config.model.image_token_id={model_cfg.image_token_id} but the tokenizer "
                     f"({tokenizer!r}) uses {tokenizer.image_token_id} for the image placeholder")
  if tokenizer.vocab_size > model_cfg.llm.vocab_size and tokenizer.image_token_id < model_cfg.llm.vocab_size:
    raise ValueError(f"config.model.llm.vocab_size={model_cfg.llm.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size})")


_abstract = state_lib.abstract
_opt_shardings = state_lib.opt_shardings


class NotAWorkdirError(UserError, FileNotFoundError):
  """A path that holds no medcg.train run, or a run that cannot be evaluated as it stands."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to its workdir (config.json)."""
  path = fileio.join(workdir, provenance.CONFIG_FILE)
  if not fileio.exists(path):
    raise NotAWorkdirError(f"{path} not found: {workdir} is not a medcg.train workdir")
  return ml_collections.ConfigDict(fileio.read_json(path))


def load_model_from_workdir(workdir: str, step: int | None = None, config: ml_collections.ConfigDict | None = None,
                            mesh: jax.sharding.Mesh | None = None):
  """(model, config) of a run, with exactly the parameters its trainer had at `step` (latest by default).

  The checkpoint when there is one; else what the trainer started from (`train.init_from`'s params,
  `train.init_from_hf`'s weights, or the seeded init), which is only right for a run that never trains
  (`train.steps == 0`, the untrained arm): a trained run without a checkpoint (stopped before its first one)
  is an error naming the workdir. Frozen parameters are never checkpointed; they come from the same source as
  in training.
  """
  from medcg.data import tokenizer as tok_lib
  config = config or load_run_config(workdir)
  mesh = mesh or shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  ckpt_dir = _ckpt_dir(workdir)
  has_ckpt = ckpt_lib.has_checkpoint(ckpt_dir)
  if not has_ckpt and step is not None:
    raise NotAWorkdirError(f"{workdir}: no checkpoint (asked for step {step})")
  if not has_ckpt and total_train_steps(config) != 0:
    raise NotAWorkdirError(
        f"{workdir}: a trained run ({total_train_steps(config)} steps) with no checkpoint: it stopped before its "
        f"first checkpoint, so there is nothing trained to evaluate. Re-run medcg.train with --workdir {workdir} "
        "to train it.")
  model_cfg = model_config(config, tok_lib.make_tokenizer(config.data.tokenizer))
  parts = model_parts(config, model_cfg, mesh)
  with shd.use_mesh(mesh):
    params, frozen, rest = initial_params(config, parts, mesh, with_init_from=not has_ckpt)
    if has_ckpt:
      params = ckpt_lib.restore_params_only(ckpt_dir, _abstract(parts.abstract[0], parts.shardings[0]), step=step)
  return nnx.merge(parts.graphdef, params, frozen, rest), config
