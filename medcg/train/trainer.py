"""The medcg trainer: one readable loop from a laptop CPU to a TPU pod.

    python -m medcg.train --config configs/cg_table3.py:row=15 --workdir runs/row15 [--config.train.lr=1e-4]

Sections: set up (multi-host, logging, run record) -> mesh -> input pipeline -> model & optimizer, created
sharded -> checkpoint restore or init_from -> update step -> evaluation -> train loop (SIGTERM-safe,
NaN-checked). Restarting with the same workdir resumes exactly: same params, optimizer state, and the
data iterator at the same position.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from medcg.train import checkpoint as ckpt_lib
from medcg.train import mfu as mfu_lib
from medcg.train import optimizer as opt_lib
from medcg.train import run_record
from medcg.train import sharding as shd
from medcg.train import step as step_lib


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is left as it was."""


@dataclasses.dataclass
class TrainResult:
  step: int
  losses: list[float]            # per step, in order (this process's run only)
  metrics: dict[str, float]      # last step's metrics + final eval
  preempted: bool = False
  param_specs: dict[str, tuple] = dataclasses.field(default_factory=dict)  # trained params' mesh axes per dim


class _Preemption:
  """SIGTERM (TPU VMs, schedulers) sets a flag; the loop checkpoints at the next step boundary and exits."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      logging.warning("SIGTERM received: checkpointing at the next step boundary")
      self.requested = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread (e.g. a test harness): no handler
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def any_host(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


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


def _metric_writer(workdir: str):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tb"))


def validate_config(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Checks that need no compilation: mesh vs devices, batch vs data parallelism, accumulation."""
  mesh = shd.mesh_from_config(config.mesh)
  dp = shd.data_parallel_size(mesh)
  b = config.data.batch_size
  if b % dp:
    raise ValueError(f"config.data.batch_size={b} is not divisible by the data-parallel size {dp} "
                     f"(config.mesh={dict(mesh.shape)})")
  if b % jax.process_count():
    raise ValueError(f"config.data.batch_size={b} is not divisible by the {jax.process_count()} processes")
  acc = config.train.accum_steps
  if acc < 1 or (b // dp) % acc:
    raise ValueError(f"config.train.accum_steps={acc} must divide the per-shard batch {b // dp}")
  if config.train.steps != 0 and not config.data.mixture:
    raise ValueError("config.data.mixture is empty: nothing to train on (set config.train.steps=0 to only "
                     "evaluate the untrained model)")
  return mesh


def train(config: ml_collections.ConfigDict, workdir: str, *,
          evaluate_fn: Callable[..., dict[str, float]] | None = None,
          fail_at_step: int = -1) -> TrainResult:
  """Train per `config` in `workdir`, resuming from its latest checkpoint if there is one.

  evaluate_fn(model, step) -> metrics is the evaluation hook; by default medcg.eval.runner evaluates
  config.data.eval_mixture (writing workdir/eval/step_N/ and, at the last step, workdir/results.json).
  fail_at_step injects a NaN loss at that step (tests of the NaN guard).
  """
  from medcg.data import pipeline
  from medcg.data import tokenizer as tok_lib
  from medcg.model import vlm as vlm_lib

  # --------------------------------------------------------------------------------------------------
  # Set up: run record, logging.
  # --------------------------------------------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)
  mesh = validate_config(config)
  if jax.process_index() == 0:
    run_record.write_run_record(workdir, config)
  writer = _metric_writer(workdir)
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
  data_cfg = pipeline_config(config, config.data.mixture, config.data.batch_size, n_image_tokens, training=True)
  if config.train.steps >= 0:
    total_steps = config.train.steps
  else:
    n_train = sum(int(n) for _, _, n in config.data.mixture)
    total_steps = max(n_train // config.data.batch_size, 1) * config.train.epochs
  train_iter = None
  if total_steps:
    train_iter = pipeline.make_train_iterator(data_cfg, tokenizer, seed=config.seed,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())

  # --------------------------------------------------------------------------------------------------
  # Model & optimizer, created already sharded: eval_shape -> shardings from the rules -> jitted init.
  # --------------------------------------------------------------------------------------------------
  make_model = lambda: vlm_lib.VLM(model_cfg, rngs=nnx.Rngs(config.seed), trim=trim_cfg)
  abstract_model = nnx.eval_shape(make_model)
  frozen_f = opt_lib.frozen_filter(config.train.freeze)
  trainable_f = nnx.All(nnx.Param, nnx.Not(frozen_f))
  graphdef, abs_params, abs_frozen, abs_rest = nnx.split(abstract_model, trainable_f, nnx.Param, ...)
  if config.train.freeze:
    opt_lib.check_patterns_match(nnx.state(abstract_model, nnx.Param), config.train.freeze, "config.train.freeze")
  tx, schedule = opt_lib.make_optimizer(config.train, abs_params, max(total_steps, 1))

  params_sh = shd.param_shardings(abs_params, mesh)
  frozen_sh = shd.param_shardings(abs_frozen, mesh)
  rest_sh = shd.param_shardings(abs_rest, mesh)

  def init_all():
    _, p, f, r = nnx.split(make_model(), trainable_f, nnx.Param, ...)
    return p, f, r

  with shd.use_mesh(mesh):
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_sh = _opt_shardings(abs_opt, params_sh, mesh)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = {"params": params_sh, "opt_state": opt_sh, "step": repl}

    # ------------------------------------------------------------------------------------------------
    # Checkpoint: resume from this workdir, else init_from (HF or another run), else scratch.
    # ------------------------------------------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                 keep_best=config.checkpoint.keep_best, best_metric=config.checkpoint.best_metric,
                                 best_mode=config.checkpoint.best_mode, async_save=config.checkpoint.async_save)
    # Frozen params are not in our checkpoints: they come from the HF checkpoint or the seeded init.
    if config.train.init_from_hf:
      loaded = vlm_lib.load_llava(config.train.init_from_hf, clip_path=config.train.init_from_clip or None,
                                  trim=trim_cfg, mesh=mesh, **_dtype_overrides(config))
      _, params, frozen, rest = nnx.split(loaded, trainable_f, nnx.Param, ...)
      del loaded
    else:
      params, frozen, rest = jax.jit(init_all, out_shardings=(params_sh, frozen_sh, rest_sh))()
    if ckpt.latest_step() is not None:
      del params
      abstract_state = {
          "params": _abstract(abs_params, params_sh),
          "opt_state": _abstract(abs_opt, opt_sh),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
      }
      state = ckpt.restore(abstract_state, train_iter)
      logging.info("resumed from step %d of %s", int(state["step"]), ckpt.directory)
    else:
      if config.train.init_from:
        params = ckpt_lib.restore_params_only(os.path.join(config.train.init_from, "checkpoints"),
                                              _abstract(abs_params, params_sh))
      opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
      state = {"params": params, "opt_state": opt_state,
               "step": jax.device_put(jnp.zeros((), jnp.int32), repl)}

    # ------------------------------------------------------------------------------------------------
    # Update step: plain jax.jit with shardings in and out, the state donated.
    # ------------------------------------------------------------------------------------------------
    train_step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, config.train.accum_steps),
                         in_shardings=(state_sh, frozen_sh, rest_sh, None),
                         out_shardings=(state_sh, repl), donate_argnums=(0,))
    flops_per_example = vlm_lib.model_flops(model_cfg, data_cfg.seq_len, training=True, trim=trim_cfg)
    flops_per_step = flops_per_example * config.data.batch_size

    # ------------------------------------------------------------------------------------------------
    # Evaluation hook.
    # ------------------------------------------------------------------------------------------------
    if evaluate_fn is None and config.data.eval_mixture:
      from medcg.eval import runner
      evaluate_fn = runner.make_trainer_hook(config, workdir, tokenizer, mesh=mesh, final_step=total_steps)

    def run_eval(state) -> dict[str, float]:
      if evaluate_fn is None:  # no evaluation mixture
        return {}
      return evaluate_fn(nnx.merge(graphdef, state["params"], frozen, rest), int(state["step"]))

    # ------------------------------------------------------------------------------------------------
    # Train loop.
    # ------------------------------------------------------------------------------------------------
    start = int(state["step"])
    losses: list[float] = []
    metrics: dict[str, float] = {}
    preempted = False
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start, desc="train", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    with _Preemption() as preemption:
      step = start
      while step < total_steps:
        t0 = time.perf_counter()
        local = next(train_iter)
        batch = shd.global_batch(local, mesh)
        state, m = train_step(state, frozen, rest, batch)
        step += 1
        loss = float(m["loss"])  # one host sync per step: the NaN guard needs it
        if step == fail_at_step:
          loss = float("nan")
        if config.train.nan_check and not math.isfinite(loss):
          ckpt.wait()
          ids = [str(s) for s in np.asarray(local.get("sample_id", []))]
          raise NonFiniteLossError(
              f"loss is {loss} at step {step}; batch sample ids: {ids}. The last good checkpoint "
              f"(step {ckpt.latest_step()}) in {ckpt.directory} is untouched.")
        dt = time.perf_counter() - t0
        losses.append(loss)
        if config.train.log_batches and jax.process_index() == 0:
          with open(os.path.join(workdir, "batches.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": loss,
                                "sample_ids": [str(x) for x in np.asarray(local["sample_id"])]}) + "\n")
        if step % config.train.log_every == 0 or step == total_steps or step == start + 1:
          metrics = {k: float(v) for k, v in m.items()}
          metrics["step_time_s"] = dt
          metrics["tokens_per_s"] = float(np.sum(local["attention_mask"])) * jax.process_count() / dt
          u = mfu_lib.mfu(flops_per_step, dt, jax.device_count())
          if u is not None:
            metrics["mfu"] = u
          _write_metrics(writer, workdir, step, {f"train/{k}": v for k, v in metrics.items()})
          bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}")
        bar.update(1)
        is_last = step == total_steps
        eval_now = (config.eval.every and step % config.eval.every == 0) or is_last
        eval_metrics = {}
        if eval_now:
          eval_metrics = {f"eval/{k}": v for k, v in run_eval(state).items()}
          if eval_metrics:
            _write_metrics(writer, workdir, step, eval_metrics)
            metrics.update(eval_metrics)
        if preemption.any_host():
          ckpt.save(step, state, train_iter, metrics=eval_metrics or None, force=True)
          preempted = True
          break
        if is_last or (config.checkpoint.every and step % config.checkpoint.every == 0):
          best_ok = config.checkpoint.best_metric in eval_metrics
          ckpt.save(step, state, train_iter, metrics=eval_metrics if best_ok else None, force=True)
    bar.close()
    if total_steps == 0:  # an untrained arm (the paper's Baseline): evaluate the initial model only
      metrics = {f"eval/{k}": v for k, v in run_eval(state).items()}
      _write_metrics(writer, workdir, 0, metrics)
    ckpt.close()
  if writer is not None:
    writer.close()
  specs = {opt_lib.param_path(p): tuple(x.sharding.spec)
           for p, x in jax.tree_util.tree_leaves_with_path(state["params"]) if hasattr(x, "sharding")}
  return TrainResult(step=step, losses=losses, metrics=metrics, preempted=preempted, param_specs=specs)


# ------------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------------
def _dtype_overrides(config) -> dict[str, str]:
  return {k: config.model_overrides[k] for k in ("dtype", "param_dtype", "remat")
          if config.get("model_overrides") and config.model_overrides.get(k)}


def model_config(config: ml_collections.ConfigDict, tokenizer=None) -> ml_collections.ConfigDict:
  """config.model, or the config of the Hugging Face checkpoint being fine-tuned (config.train.init_from_hf).

  A model trained from scratch takes its vocabulary size and special ids from the tokenizer
  (config.model_vocab_from_tokenizer, default on), so any tokenizer fits any preset.
  """
  from medcg.model import hf, vlm as vlm_lib
  if config.train.init_from_hf:
    ckpt = hf.open_checkpoint(config.train.init_from_hf)
    clip_cfg = hf.open_checkpoint(config.train.init_from_clip).config if config.train.init_from_clip else None
    return vlm_lib.config_from_llava(ckpt.config, clip_cfg, **_dtype_overrides(config))
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


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _opt_shardings(abs_opt, params_sh, mesh):
  """Optimizer moments shard like the param at the same path (optax keeps the param tree); scalars replicate."""
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  is_sh = lambda x: isinstance(x, jax.sharding.NamedSharding)
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


def _write_metrics(writer, workdir: str, step: int, metrics: dict[str, float]) -> None:
  if jax.process_index() != 0:
    return
  for k, v in metrics.items():
    if writer is not None:
      writer.add_scalar(k, v, step)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": step, **metrics}) + "\n")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to its workdir (config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a medcg.train workdir")
  with open(path) as f:
    try:
      return ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: malformed JSON ({e})") from e


def load_model_from_workdir(workdir: str, step: int | None = None, config: ml_collections.ConfigDict | None = None,
                            mesh: jax.sharding.Mesh | None = None):
  """(model, config) of a run: its trained params from the checkpoint of `step` (latest by default).

  Frozen parameters are not checkpointed; they come back from the same source as in training (the
  seeded init, or the Hugging Face checkpoint). A run with no checkpoint (an untrained arm) gives the
  initial model.
  """
  from medcg.data import tokenizer as tok_lib
  from medcg.model import vlm as vlm_lib
  config = config or load_run_config(workdir)
  mesh = mesh or shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  trim_cfg = config.trim if config.trim.enabled else None
  model_cfg = model_config(config, tok_lib.make_tokenizer(config.data.tokenizer))
  make_model = lambda: vlm_lib.VLM(model_cfg, rngs=nnx.Rngs(config.seed), trim=trim_cfg)
  frozen_f = opt_lib.frozen_filter(config.train.freeze)
  trainable_f = nnx.All(nnx.Param, nnx.Not(frozen_f))
  abstract_model = nnx.eval_shape(make_model)
  graphdef, abs_params, abs_frozen, abs_rest = nnx.split(abstract_model, trainable_f, nnx.Param, ...)
  shardings = tuple(shd.param_shardings(s, mesh) for s in (abs_params, abs_frozen, abs_rest))
  with shd.use_mesh(mesh):
    if config.train.init_from_hf:
      loaded = vlm_lib.load_llava(config.train.init_from_hf, clip_path=config.train.init_from_clip or None,
                                  trim=trim_cfg, mesh=mesh, **_dtype_overrides(config))
      _, params, frozen, rest = nnx.split(loaded, trainable_f, nnx.Param, ...)
    else:
      def init_all():
        _, p, f, r = nnx.split(make_model(), trainable_f, nnx.Param, ...)
        return p, f, r
      params, frozen, rest = jax.jit(init_all, out_shardings=shardings)()
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
      params = ckpt_lib.restore_params_only(ckpt_dir, _abstract(abs_params, shardings[0]), step=step)
    elif step is not None:
      raise FileNotFoundError(f"{workdir}: no checkpoint (asked for step {step})")
  return nnx.merge(graphdef, params, frozen, rest), config
