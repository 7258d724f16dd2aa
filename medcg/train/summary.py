"""What `medcg.train` tells the user: where the run is, what it trains on, where its outputs went.

Process 0 prints these lines on stdout (the progress bar is on stderr), each prefixed `medcg.train:`. The text
is built by small functions, so tests check it without training.

    medcg.train: workdir /abs/runs/demo/related: new run
    medcg.train: 1 device (cpu), mesh data=1 fsdp=1 tensor=1
    medcg.train: model: 2.41 M params, 2.41 M trainable, 0 frozen
    medcg.train: train on 2 subsets, 1,200 samples: 05 train 600, 28 train 600; 444 steps of batch 32 (12 epochs)
    medcg.train: evaluate on 03 test all at the end
    ...
    medcg.train: finished at step 444 in 2 m 31 s: loss 0.0123; accuracy 95.0 % (n=60)
    medcg.train: results /abs/runs/demo/related/results.json
    medcg.train: report  /abs/runs/demo/related/eval/step_444/report.md (plots: accuracy_per_subset.png, heatmap.png)
"""
from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

PREFIX = "medcg.train:"
MAX_ENTRIES = 6  # mixture entries listed by name; the rest are counted


def say(line: str) -> None:
  """One line on stdout from process 0 (every host runs the trainer; one speaks)."""
  if jax.process_index() == 0:
    print(f"{PREFIX} {line}", flush=True)


def count_params(tree: Any) -> int:
  """Elements in a pytree of arrays or ShapeDtypeStructs."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")))


def human(n: float) -> str:
  """1234 -> '1,234'; 2_410_000 -> '2.41 M'; 7.06e9 -> '7.06 B'."""
  for scale, unit in ((1e9, "B"), (1e6, "M")):
    if abs(n) >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{int(n):,}"


def duration(seconds: float) -> str:
  """83.2 -> '1 m 23 s'; 4.1 -> '4.1 s'."""
  if seconds < 10:
    return f"{seconds:.1f} s"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h} h {m} m" if h else f"{m} m {s} s" if m else f"{s} s"


def _entry(entry: Sequence[Any]) -> str:
  subset, split, n = entry[0], entry[1], entry[2] if len(entry) > 2 else None
  sid = f"{int(subset):02d}" if isinstance(subset, (int, np.integer)) or str(subset).isdigit() else str(subset)
  return f"{sid} {split} {'all' if n is None or int(n) < 0 else f'{int(n):,}'}"


def mixture_text(mixture: Sequence[Sequence[Any]]) -> str:
  """'2 subsets, 1,200 samples: 05 train 600, 28 train 600' (entries past MAX_ENTRIES counted, not listed)."""
  subsets = len({str(e[0]) for e in mixture})
  sizes = [int(e[2]) for e in mixture if len(e) > 2 and e[2] is not None and int(e[2]) >= 0]
  total = f", {sum(sizes):,} samples" if len(sizes) == len(mixture) else ""
  listed = ", ".join(_entry(e) for e in mixture[:MAX_ENTRIES])
  more = f", ... (+{len(mixture) - MAX_ENTRIES} more)" if len(mixture) > MAX_ENTRIES else ""
  return f"{subsets} subset{'s' * (subsets != 1)}{total}: {listed}{more}"


def mesh_text(mesh: jax.sharding.Mesh) -> str:
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind if n else "?"
  axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
  return f"{n} device{'s' * (n != 1)} ({kind}){hosts}, mesh {axes}"


def params_text(abstract: tuple[Any, Any, Any]) -> str:
  """'2.41 M params, 2.1 M trainable, 310 K frozen' from the (trainable, frozen, rest) abstract trees."""
  trainable, frozen = count_params(abstract[0]), count_params(abstract[1])
  return f"{human(trainable + frozen)} params, {human(trainable)} trainable, {human(frozen)} frozen"


def schedule_text(config, total_steps: int) -> str:
  """'444 steps of batch 32 (12 epochs)', or the untrained arm's 'no training (train.steps=0)'."""
  if not total_steps:
    return "no training (train.steps=0): the untrained arm evaluates the initial model"
  how = f" ({int(config.train.epochs)} epochs)" if config.train.steps < 0 else ""
  return f"{total_steps:,} steps of batch {config.data.batch_size}{how}"


def eval_text(config) -> str:
  """'03 test all at the end (and every 100 steps)', or that nothing is evaluated."""
  if not config.data.eval_mixture:
    return "no evaluation (data.eval_mixture is empty): no results.json"
  every = f" and every {config.eval.every} steps" if config.eval.get("every") else ""
  return f"{mixture_text(config.data.eval_mixture)}, at the end{every}"


def resume_text(workdir: str, resume_step: int | None, total_steps: int, changes) -> str:
  if resume_step is None:
    return f"workdir {workdir}: new run"
  changed = f"; changed since the last attempt: {', '.join(k for k, _, _ in changes)}" if changes else ""
  return f"workdir {workdir}: resumed from step {resume_step:,} of {total_steps:,}{changed}"


def headline(metrics: Mapping[str, float]) -> str:
  """The final evaluation in words: 'accuracy 95.0 % (n=60)', with cIoU when detection was scored."""
  parts = []
  n = metrics.get("eval/samples")
  if "eval/accuracy" in metrics and n != 0:  # a detection-only evaluation scores no choices (n=0): cIoU only
    parts.append(f"accuracy {100 * metrics['eval/accuracy']:.1f} %" + (f" (n={int(n)})" if n else ""))
  if "eval/ciou" in metrics:
    parts.append(f"cIoU {100 * metrics['eval/ciou']:.1f} %")
  return "; ".join(parts)


def end_lines(*, step: int, total_steps: int, losses: Sequence[float], metrics: Mapping[str, float],
              preempted: bool, seconds: float, workdir: str, results: str | None, report_dir: str | None
              ) -> list[str]:
  """The closing lines: what happened, the final numbers, where the results and report are."""
  from medcg import fileio
  result = headline(metrics)
  if preempted:
    loss = f"; loss {losses[-1]:.4f}" if losses else ""
    return [f"stopped at step {step:,} of {total_steps:,} after {duration(seconds)}{loss} (checkpointed); the same "
            "command resumes"]
  if total_steps == 0:
    lines = [f"evaluated the initial model (untrained arm) in {duration(seconds)}" + (f": {result}" if result else "")]
  else:
    loss = f"loss {losses[-1]:.4f}" if losses else ""
    body = "; ".join(x for x in (loss, result) if x)
    lines = [f"finished at step {step:,} in {duration(seconds)}" + (f": {body}" if body else "")]
  if results and fileio.exists(results):
    lines.append(f"results {results}")
  if report_dir and fileio.exists(fileio.join(report_dir, "report.md")):
    plots = sorted(p.name for p in fileio.path(report_dir).glob("*.png"))
    lines.append(f"report  {fileio.join(report_dir, 'report.md')}" + (f" (plots: {', '.join(plots)})" if plots else ""))
  elif not results:
    lines.append(f"outputs in {workdir}")
  return lines


def finished_text(step: int, total_steps: int, workdir: str, results: str | None, changes=()) -> str:
  """A re-run of a finished workdir, detected before anything is compiled. `changes`: the (resumable) keys
  that differ from the run's config.json, which a finished run does not act on."""
  what = ("the untrained arm is evaluated" if total_steps == 0 else
          f"finished at step {step:,}" + (f" (the config asks for {total_steps:,})" if step != total_steps else ""))
  where = f" (results: {results})" if results else ""
  if changes:
    where += f"; changed keys not applied: {', '.join(k for k, _, _ in changes)}"
  return (f"{what}; nothing to do{where}. More steps: raise train.steps or train.epochs; another evaluation: "
          f"python -m medcg.eval --workdir {workdir}")


def write(lines: Sequence[str]) -> None:
  for line in lines:
    say(line)
  sys.stdout.flush()
