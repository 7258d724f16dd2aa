"""The evaluation runner: a model and an eval mixture -> per-sample records, results.json, report.md.

Two multiple-choice modes (DESIGN.md "Evaluation"):
  * "likelihood": every offered option's answer string is scored as the model was trained to emit it
    (the chat template's answer, " B" + eos, or with `likelihood_target="text"` the option's text,
    " Cyst" + eos) and the option with the highest mean token log-prob wins; exact ties are scored wrong
    (`mcq.choose_by_loglik_batch`), never a position-biased pick.
  * "generate": greedy decoding (`config.eval.max_new_tokens`), then `mcq.parse_answer`; unparsed
    answers are scored wrong and their rate is reported.
Detection subsets (38-50) in the mixture are evaluated apart, in either mode, by greedy generation of a
box: `config.eval.detection_max_new_tokens` tokens, or when it is 0 / unset the longest ground-truth
answer's token count (+ eos) plus `DETECTION_MARGIN`; then `detection.parse_boxes`, IoU per sample and
cIoU per subset (`results["detection"]`).

Results do not depend on the batch size: the pipeline pads every prompt to `seq_len` and marks padding
rows `valid=False` (dropped here), positions come from the attention mask, generation is greedy, and
records are aggregated sorted by sample id. Shapes are static (seq_len, 4 option slots, a fixed answer
length bucket), so each jitted call compiles once per run.

Multi-host: each host evaluates its slice of the mixture; the batch is one global array over the mesh's
data axes, each host reads back its own rows, and every host's records are gathered to process 0, which
alone writes samples.jsonl, results.json, report.md and the plots (atomically).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from medcg import fileio
from medcg import mat
from medcg.data import pipeline
from medcg.data import prompt as prompt_lib
from medcg.eval import metrics
from medcg.eval import mcq
from medcg.eval import report
from medcg.eval import stats
from medcg.model import vlm as vlm_lib
from medcg.train import run_info
from medcg.train import sharding as shd

MODES = ("likelihood", "generate")
LIKELIHOOD_TARGETS = ("letter", "text")
REDUCTIONS = ("mean", "sum")
REPORT_FILE = "report.md"
HEATMAP_FILE = "heatmap_modality_area.png"
BARS_FILE = "accuracy_per_subset.png"
# Option slots per example: the prompt offers at most this many letters (medcg.data.prompt.LETTERS).
MAX_OPTIONS = len(prompt_lib.LETTERS)
MODEL_KEYS = ("image", "input_ids", "attention_mask", "text_ids")
# Tokens generated beyond the longest ground-truth box (+ eos): room for a slightly longer wrong box.
DETECTION_MARGIN = 4


# ------------------------------------------------------------------------------------------------------
# Option answer strings (likelihood mode).
# ------------------------------------------------------------------------------------------------------
def option_answer_ids(tokenizer, template: str, options: Sequence[str], target: str = "letter"
                      ) -> list[list[int]]:
  """Token ids (answer + eos) the model would emit for each option, tokenized as in training.

  Training tokenizes prompt + answer and keeps the extension of the prompt's ids
  (`medcg.data.prompt.PromptEncoder`); here the context is the template's text after the question
  (e.g. "\\nAnswer:"), which ends every prompt, so subword tokenizers see the same boundary.
  `target` "letter" scores " B"; "text" scores the option's text in the letter's place.
  """
  if target not in LIKELIHOOD_TARGETS:
    raise ValueError(f"config.eval.likelihood_target={target!r}: expected one of {LIKELIHOOD_TARGETS}")
  tmpl = prompt_lib.get_template(template)
  context = tmpl.prompt.split(prompt_lib.QUESTION_FIELD)[1]
  context_ids = tokenizer.encode(context)
  out = []
  for letter, text in zip(prompt_lib.LETTERS, options):
    answer = tmpl.answer.format(letter=letter if target == "letter" else text.strip())
    full = tokenizer.encode(context + answer)
    if len(full) > len(context_ids) and full[:len(context_ids)] == context_ids:
      ids = full[len(context_ids):]
    else:  # the tokenizer merged across the boundary: the answer on its own, as PromptEncoder does
      ids = tokenizer.encode(answer)
    out.append(list(ids) + [tokenizer.eos_id])
  return out


def _bucket(n: int) -> int:
  """Answer-length slots: the next power of two >= n (>= 4), so a run compiles a handful of shapes."""
  return max(4, 1 << (int(n) - 1).bit_length())


def option_arrays(tokenizer, template: str, options_column: Sequence[Sequence[str]], target: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(option_ids, option_mask) int32 (B, MAX_OPTIONS, T) for a batch; missing options are all-zero rows."""
  per_row = [option_answer_ids(tokenizer, template, opts, target) for opts in options_column]
  longest = max(len(ids) for row in per_row for ids in row)
  length = _bucket(longest)
  ids = np.full((len(per_row), MAX_OPTIONS, length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(per_row), MAX_OPTIONS, length), np.int32)
  for b, row in enumerate(per_row):
    if len(row) > MAX_OPTIONS:
      raise ValueError(f"batch row {b}: {len(row)} options; the prompt offers at most {MAX_OPTIONS}")
    for o, option in enumerate(row):
      ids[b, o, :len(option)] = option
      mask[b, o, :len(option)] = 1
  return ids, mask


# ------------------------------------------------------------------------------------------------------
# Device placement and reading results back.
# ------------------------------------------------------------------------------------------------------
class _Placement:
  """Puts host batches on the mesh (batch over the data axes) and reads this host's rows back.

  A global batch the data axes do not divide runs replicated instead (one process only), so any
  batch size works on one host; multi-host evaluation needs a divisible batch.
  """

  def __init__(self, mesh: jax.sharding.Mesh | None, global_batch: int):
    self.mesh = mesh
    self.sharded = mesh is not None and global_batch % shd.data_parallel_size(mesh) == 0
    if mesh is not None and not self.sharded:
      if jax.process_count() > 1:
        raise ValueError(f"evaluation batch size {global_batch} is not divisible by the data-parallel size "
                         f"{shd.data_parallel_size(mesh)} (mesh {dict(mesh.shape)}); multi-host evaluation "
                         "needs a divisible config.eval.batch_size")
      logging.info("eval batch %d does not divide the data axes of mesh %s: running replicated",
                   global_batch, dict(mesh.shape))

  def put(self, local: Mapping[str, np.ndarray]) -> dict[str, Any]:
    arrays = {k: np.asarray(local[k]) for k in MODEL_KEYS if k in local}
    if self.sharded:
      return shd.global_batch(arrays, self.mesh)
    return arrays

  def local(self, x: jax.Array) -> np.ndarray:
    if not self.sharded or jax.process_count() == 1:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    sharding = shd.batch_sharding(self.mesh, ndim=x.ndim)
    x = jax.device_put(x, sharding)
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, sharding.spec))


# ------------------------------------------------------------------------------------------------------
# The evaluation loop.
# ------------------------------------------------------------------------------------------------------
def _eval_setting(config, key: str, default):
  ev = config.get("eval") if hasattr(config, "get") else None
  return ev.get(key, default) if ev is not None and hasattr(ev, "get") else default


def _prompt_text(tokenizer, input_ids: np.ndarray, prompt_len: int) -> str:
  # decode() drops the specials (bos, image placeholders), leaving the text the model was asked.
  return tokenizer.decode([int(t) for t in input_ids[:prompt_len]])


def _records_for_batch(local, scored, *, mode, tokenizer, reduction) -> list[metrics.SampleRecord]:
  valid = np.asarray(local.get("valid", np.ones(len(local["input_ids"]), bool)), bool)
  records = []
  if mode == "likelihood":
    sums, n_tokens = scored
    choice = mcq.choose_by_loglik_batch(sums, n_tokens, local["num_options"], reduction)
  else:
    tokens, lengths = scored
  for b in np.flatnonzero(valid):
    sid, subset = str(local["sample_id"][b]), int(local["subset"][b])
    triplet = mat.get(subset).triplet
    prompt = _prompt_text(tokenizer, local["input_ids"][b], int(local["prompt_len"][b]))
    options, answer = list(local["options"][b]), str(local["answer"][b])
    if not options:  # a detection row (always generated)
      output = tokenizer.decode([int(t) for t in tokens[b, :int(lengths[b])]])
      records.append(metrics.score_detection(sid, subset, triplet, prompt, output, answer))
    elif mode == "likelihood":
      index = None if choice[b] < 0 else int(choice[b])
      records.append(metrics.score_choice(sid, subset, triplet, prompt, index,
                                          "tie" if index is None else "loglik", options, answer))
    else:
      output = tokenizer.decode([int(t) for t in tokens[b, :int(lengths[b])]])
      records.append(metrics.score_generation(sid, subset, triplet, prompt, output, options, answer))
  return records


def run_records(model, config, tokenizer, *, mixture, mode: str, batch_size: int,
                mesh: jax.sharding.Mesh | None = None, likelihood_target: str = "letter",
                reduction: str = "mean", progress: bool = False) -> list[metrics.SampleRecord]:
  """This host's per-sample records for `mixture` (no gathering, no files)."""
  if mode not in MODES:
    raise ValueError(f"config.eval.mode={mode!r}: expected one of {MODES}")
  if reduction not in REDUCTIONS:
    raise ValueError(f"config.eval.likelihood_reduction={reduction!r}: expected one of {REDUCTIONS}")
  if batch_size < 1:
    raise ValueError(f"config.eval.batch_size={batch_size}: must be >= 1")
  classification, det = split_mixture(mixture)
  place = _Placement(mesh, batch_size)
  records: list[metrics.SampleRecord] = []
  from tqdm import tqdm
  for part, part_mode in ((classification, mode), (det, "generate")):
    if not part:
      continue
    data_cfg = run_info.pipeline_config(config, part, batch_size, model.num_image_tokens)
    if part is det:
      max_new_tokens = detection_max_new_tokens(config, data_cfg, tokenizer)
    else:
      max_new_tokens = int(_eval_setting(config, "max_new_tokens", 8))
    it = pipeline.make_eval_iterator(data_cfg, tokenizer, include_answer=False,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    show = progress and jax.process_index() == 0
    total = pipeline.eval_batch_count(data_cfg, process_count=jax.process_count()) if show else None
    bar = tqdm(desc=f"eval ({'detection' if part is det else mode})", unit="batch", total=total,
               disable=not show, dynamic_ncols=True)
    with shd.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      for local in it:
        records += _eval_batch(model, local, place, mode=part_mode, tokenizer=tokenizer,
                               template=data_cfg.chat_template, likelihood_target=likelihood_target,
                               max_new_tokens=max_new_tokens, reduction=reduction)
        bar.update(1)
    bar.close()
  return records


def split_mixture(mixture) -> tuple[list[tuple], list[tuple]]:
  """(classification entries, detection entries) of an evaluation mixture, each in mixture order."""
  classification, det = [], []
  for entry in mixture:
    (det if mat.get(entry[0]).status == "det" else classification).append(tuple(entry))
  return classification, det


def detection_max_new_tokens(config, data_cfg, tokenizer) -> int:
  """`config.eval.detection_max_new_tokens`, or (0 / unset) the longest ground-truth answer + eos + margin.

  The answers are read from the records (no image decoding), tokenized as the chat template's answer,
  so every host computes the same number for the same mixture.
  """
  fixed = int(_eval_setting(config, "detection_max_new_tokens", 0) or 0)
  if fixed < 0:
    raise ValueError(f"config.eval.detection_max_new_tokens={fixed}: must be >= 0 (0: from the answers)")
  if fixed:
    return fixed
  from medcg.data import features
  template = prompt_lib.get_template(data_cfg.chat_template)
  source = pipeline.build_mixture(data_cfg, seed=data_cfg.seed)
  longest = 0
  for i in range(len(source)):
    raw, where = source[i]
    answer = features.parse_example(raw, where)["answer"]
    longest = max(longest, len(tokenizer.encode(template.answer.format(letter=answer))))
  return longest + 1 + DETECTION_MARGIN


def _eval_batch(model, local, place: _Placement, *, mode, tokenizer, template, likelihood_target, max_new_tokens,
                reduction) -> list[metrics.SampleRecord]:
  """Runs one host batch through the model (jitted, static shapes) and scores its valid rows."""
  batch = place.put(local)
  text_ids = batch.get("text_ids")
  if mode == "likelihood":
    opt_ids, opt_mask = option_arrays(tokenizer, template, local["options"], likelihood_target)
    options = place.put({"input_ids": opt_ids, "attention_mask": opt_mask})
    sums, _ = vlm_lib.score_options(model, batch["image"], batch["input_ids"], batch["attention_mask"],
                                    options["input_ids"], options["attention_mask"], text_ids)
    scored = (place.local(sums), opt_mask.sum(axis=-1))
  else:
    tokens, lengths = vlm_lib.generate(model, batch["image"], batch["input_ids"], batch["attention_mask"],
                                       text_ids=text_ids, max_new_tokens=max_new_tokens,
                                       eos_ids=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    scored = (place.local(tokens), place.local(lengths))
  return _records_for_batch(local, scored, mode=mode, tokenizer=tokenizer, reduction=reduction)


def gather_records(records: Sequence[metrics.SampleRecord]) -> list[metrics.SampleRecord]:
  """Every host's records, on every host (one process: unchanged). JSON bytes through process_allgather."""
  if jax.process_count() == 1:
    return list(records)
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps([r.to_dict() for r in records]).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  out = []
  for host, (size, data) in enumerate(zip(sizes, blobs)):
    for i, d in enumerate(json.loads(bytes(data[:int(size)]).decode())):
      out.append(metrics.SampleRecord.from_dict(d, where=f"process {host} record {i}"))
  return out


def _per_group_table(groups: Mapping[str, Mapping[str, Any]], title: str) -> str:
  rows = [[k, v["n"], v["correct"], f"{100 * v['accuracy']:.1f}", stats.wilson_text(int(v["correct"]), int(v["n"]))]
          for k, v in groups.items()]
  return report.markdown_table([title, "n", "correct", "accuracy %", "95 % CI"], rows)


def run_title(results: Mapping[str, Any]) -> str:
  """"cg_table3 row 25, Trained (step 444)": what a report or plot of this run is about."""
  experiment = report.experiment_of(results)
  parts = [str(experiment.get("name", "medcg evaluation"))]
  for key in ("table", "row", "fig", "direction", "setting", "n", "backbone"):
    if key in experiment and experiment[key] not in ("", None):
      parts.append(f"{key} {experiment[key]}")
  if "arm" in experiment:
    parts.append(report.ARM_TITLES.get(experiment["arm"], experiment["arm"]))
  step = results.get("step")
  return ", ".join(parts) + (f" (step {step})" if step is not None else "")


def write_report(out_dir: str, results: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """report.md and its plots, read as the run's experiment defines it.

  A run built around one target (a Table 3 arm, Fig. 4 / 5 / 6, Tables 10 / 13 / 5) is compared with the paper's
  number for that experiment and arm, and its subsets are labelled by role (the target, held out); a multitask
  or plain evaluation is read per subset as ID / OOD against Tables 1-2. Every run gets a bar plot of its
  subsets (interval, chance, the paper's value); several triplets also get the modality x area heatmap.
  """
  title = run_title(results)
  if not results["overall"]["n"]:  # a detection-only evaluation: no accuracy tables
    sections = [("Detection (cIoU)", report.detection_table(results))]
    report.write_report(fileio.join(out_dir, REPORT_FILE), title, sections, meta)
    return
  experiment = report.experiment_of(results)
  roles = report.subset_roles(experiment)
  sections = [("Summary", report.summary_table(results, statuses=roles is None))]
  comparison = report.comparison_table(results)
  if comparison is not None:
    sections.append(("Against the paper", comparison))
  sections += [("Per subset", report.subset_table({"ours": [results]}, roles=roles, tables12=roles is None)),
               ("Per triplet", _per_group_table(results["per_triplet"], "triplet"))]
  for element, groups in results["per_element"].items():
    sections.append((f"Per {element}", _per_group_table(groups, element)))
  stages = results["parse"]["stages"]
  sections.append(("Answer stages", report.markdown_table(
      ["stage", "n"], [[k, v] for k, v in stages.items()])))
  if results.get("detection"):
    sections.append(("Detection (cIoU)", report.detection_table(results)))
  from medcg.eval import plots  # matplotlib only when a report is written
  plots.plot_run(fileio.join(out_dir, BARS_FILE), results, title)
  figures = f"![accuracy per subset]({BARS_FILE})"
  if len(results["per_triplet"]) >= 2:
    plots.plot_heatmaps(fileio.join(out_dir, HEATMAP_FILE), results, title)
    figures += f"\n\n![accuracy by modality and area]({HEATMAP_FILE})"
  sections.append(("Plots", figures + "\n\nEach plot is also written as .svg beside the .png."))
  report.write_report(fileio.join(out_dir, REPORT_FILE), title, sections, meta)


def _config_dict(config) -> Any:
  return config.to_dict() if hasattr(config, "to_dict") else config


def evaluate(model, config: ml_collections.ConfigDict, tokenizer, *, mixture, mode: str | None = None,
             batch_size: int | None = None, out_dir: str, step: int | None,
             mesh: jax.sharding.Mesh | None = None, likelihood_target: str | None = None,
             checkpoint: Mapping[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
  """Evaluates `model` on `mixture` [(subset, split, n)] and writes the results into `out_dir`.

  mode / batch_size (global) / likelihood_target default to `config.eval`. `checkpoint` describes the
  weights (workdir, step, ...) for the results' checkpoint fingerprint; `step` alone is the default.
  Returns the results dict (medcg.eval.metrics) on every host; process 0 writes samples.jsonl,
  results.json, report.md and the heatmap.
  """
  mode = mode or _eval_setting(config, "mode", "likelihood")
  batch_size = int(batch_size or _eval_setting(config, "batch_size", 8))
  # Score what the model was trained to say unless told otherwise (a letter-trained model scores letters).
  target = (likelihood_target or _eval_setting(config, "likelihood_target", "")
            or config.get("data", {}).get("answer_format", "letter"))
  if target not in LIKELIHOOD_TARGETS:
    raise ValueError(f"config.eval.likelihood_target={target!r}: expected one of {LIKELIHOOD_TARGETS}")
  reduction = _eval_setting(config, "likelihood_reduction", "mean")
  if not mixture:
    raise ValueError("evaluation mixture is empty (config.data.eval_mixture or --mixture)")
  records = run_records(model, config, tokenizer, mixture=mixture, mode=mode, batch_size=batch_size, mesh=mesh,
                        likelihood_target=target, reduction=reduction, progress=progress)
  records = gather_records(records)
  eval_settings = {"mode": mode, "batch_size": batch_size, "mixture": [list(m) for m in mixture]}
  if mode == "likelihood":
    eval_settings.update(likelihood_target=target, likelihood_reduction=reduction)
  else:
    eval_settings.update(max_new_tokens=int(_eval_setting(config, "max_new_tokens", 8)), decoding="greedy")
  if split_mixture(mixture)[1]:
    eval_settings["detection"] = {"decoding": "greedy", "max_new_tokens": int(
        _eval_setting(config, "detection_max_new_tokens", 0) or 0) or "auto (longest answer + eos + margin)"}
  checkpoint = dict(checkpoint or {"step": step})
  checkpoint.setdefault("step", step)
  config_dict = _config_dict(config)
  results = metrics.aggregate(records)
  if jax.process_index() == 0:
    results = metrics.write_results(out_dir, records, config=config_dict, checkpoint=checkpoint,
                                    extra={"eval": eval_settings, "step": step})
    write_report(out_dir, results, {
        "step": step, "mode": mode, "mixture": eval_settings["mixture"],
        "config fingerprint": results["config_fingerprint"],
        "checkpoint fingerprint": results["checkpoint_fingerprint"]})
  return results


# ------------------------------------------------------------------------------------------------------
# Metrics for TensorBoard and the trainer hook.
# ------------------------------------------------------------------------------------------------------
def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
  """{"accuracy", "macro_subset", "parse_failure_rate", "samples", "subset/03", "status/ID", ...}."""
  out = {"accuracy": float(results["overall"]["accuracy"]),
         "macro_subset": float(results["macro_subset"]),
         "parse_failure_rate": float(results["parse"]["failure_rate"]),
         "samples": float(results["overall"]["n"])}
  for key, v in results["per_subset"].items():
    out[f"subset/{key}"] = float(v["accuracy"])
  for key, v in results.get("per_status", {}).items():
    out[f"status/{key}"] = float(v["accuracy"])
  if results.get("detection"):
    det = results["detection"]
    out["ciou"] = float(det["overall"]["ciou"])
    out["detection_parse_failure_rate"] = float(det["overall"]["parse_failure_rate"])
    for key, v in det["per_subset"].items():
      out[f"ciou/{key}"] = float(v["ciou"])
  return out


def mesh_from_config(config) -> jax.sharding.Mesh:
  """The mesh config.mesh describes, as the trainer builds it (`num_devices` > 0: the first N devices)."""
  return shd.mesh_from_config(config.mesh)


def step_dir(workdir: str, step: int) -> str:
  """Where the evaluation of `step` goes: workdir/eval/step_<N>."""
  return fileio.join(workdir, "eval", f"step_{int(step)}")


def checkpoint_info(workdir: str, step: int, config) -> dict[str, Any]:
  """What a result's weights are, the same whoever evaluates them (the trainer's hook or medcg.eval): the
  workdir, the step and where the step's parameters came from (medcg.train.run_info.params_source)."""
  return {"workdir": fileio.absolute(workdir), "step": int(step),
          "source": run_info.params_source(config, has_checkpoint=int(step) > 0)}


def make_trainer_hook(config: ml_collections.ConfigDict, workdir: str, tokenizer,
                      mesh: jax.sharding.Mesh | None = None,
                      final_step: int | None = None, progress: bool = False
                      ) -> Callable[[Any, int], dict[str, float]]:
  """`evaluate_fn(model, step)` for `medcg.train.trainer.train`: evaluates config.data.eval_mixture.

  Writes workdir/eval/step_<N>/ and, at `final_step` (every step when None), copies its results.json to
  workdir/results.json: the run's result, whose presence tells experiments/sweep.py the run is finished.
  Returns flat metrics for TensorBoard. `mesh` defaults to the one config.mesh describes (the trainer's).
  `progress` shows the evaluation's bar at `final_step` (not mid-training, where the training bar is open).
  """
  mesh = mesh if mesh is not None else mesh_from_config(config)

  def evaluate_fn(model, step: int) -> dict[str, float]:
    if not config.data.eval_mixture:
      return {}
    out_dir = step_dir(workdir, step)
    results = evaluate(model, config, tokenizer, mixture=config.data.eval_mixture, out_dir=out_dir, step=step,
                       mesh=mesh, checkpoint=checkpoint_info(workdir, step, config),
                       progress=progress and final_step is not None and int(step) == int(final_step))
    if jax.process_index() == 0 and (final_step is None or int(step) == int(final_step)):
      fileio.copy_file(fileio.join(out_dir, metrics.RESULTS_FILE), fileio.join(workdir, metrics.RESULTS_FILE))
    return flat_metrics(results)

  return evaluate_fn
