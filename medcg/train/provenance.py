"""A workdir holds one experiment: what a restart may change, the history of attempts, `--overwrite`.

`python -m medcg.train` on a workdir that already has a `config.json` compares it with the newly resolved config.
Keys outside `RESUMABLE` that differ (another row, another lr, another model) are refused before anything is
written, listing each key with its old and new value: the checkpoint and results there belong to the old
config, and pairing them with a new one is how a table ends up wrong. Keys in `RESUMABLE` may change (extend a
run, evaluate differently, log more often); the change is recorded in the attempt's entry of `run.json`.

`--overwrite` deletes the old experiment first. A workdir must never look like a valid run while it is half
deleted: locally the directory is renamed away (atomic) and then removed; on an object store, where a rename
is a copy, `config.json` goes first, and a workdir with checkpoints but no `config.json` is refused as
incomplete, so an interrupted delete is finished by running `--overwrite` again.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Mapping

from medcg import fileio
from medcg.errors import UserError

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
# Dotted key prefixes a resumed run may change.
RESUMABLE = ("train.steps", "train.epochs", "train.log_every", "train.log_batches", "train.nan_check",
             "eval.", "data.eval_mixture", "checkpoint.every", "checkpoint.every_minutes", "checkpoint.keep",
             "checkpoint.async_save", "experiment.data_counts",
             # Partitioning and recompute only (a run moved to other hardware): same loss up to float order.
             "mesh.", "hardware.", "train.accum_steps", "model.vision.remat", "model.text.remat", "model.llm.remat",
             "model_overrides.remat")
# What a workdir holds once a run started in it (besides config.json).
RUN_OUTPUTS = ("checkpoints", "results.json", "metrics.jsonl", RUN_FILE, "eval", "tb")


class ProvenanceError(UserError, ValueError):
  """The workdir holds another experiment (or a half-deleted one)."""


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (JSON-normalised: tuples are lists)."""
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def _normalise(config) -> dict[str, Any]:
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def resumable(key: str) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in RESUMABLE)


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(key, old, new) for every dotted key whose value differs; missing keys show as "<absent>"."""
  a, b = flatten(_normalise(old)), flatten(_normalise(new))
  absent = "<absent>"
  return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b)) if a.get(k, absent) != b.get(k, absent)]


def _short(v: Any, width: int = 80) -> str:
  text = json.dumps(v, default=str)
  return text if len(text) <= width else text[:width - 3] + "..."


def has_run_outputs(workdir: str) -> list[str]:
  """The run outputs present in `workdir` (names from RUN_OUTPUTS)."""
  wd = fileio.path(workdir)
  return [name for name in RUN_OUTPUTS if (wd / name).exists()]


def check_workdir(workdir: str, config, *, overwrite: bool = False) -> list[tuple[str, Any, Any]]:
  """Refuses a workdir that holds another experiment; returns the (resumable) differences otherwise.

  With `overwrite`, a workdir holding anything is cleared instead (`clear_workdir`); call this on every
  host, and let only process 0 clear (the caller does).
  """
  wd = fileio.path(workdir)
  cfg_path = wd / CONFIG_FILE
  if overwrite:
    return []
  if not cfg_path.exists():
    outputs = [o for o in has_run_outputs(workdir) if o != RUN_FILE]
    if outputs:
      raise ProvenanceError(
          f"{workdir} has {', '.join(outputs)} but no {CONFIG_FILE}: it is not a complete medcg run (an "
          f"interrupted --overwrite, or files from elsewhere). Use a fresh --workdir, or --overwrite to clear it.")
    return []
  try:
    old = fileio.read_json(cfg_path)
  except ValueError as e:
    raise ProvenanceError(f"{e}; use --overwrite to start this workdir again") from None
  changes = diff(old, config)
  refused = [c for c in changes if not resumable(c[0])]
  if refused:
    lines = "\n".join(f"  {k}: {_short(a)} -> {_short(b)}" for k, a, b in refused)
    raise ProvenanceError(
        f"{workdir} holds another experiment: its {CONFIG_FILE} differs from this config in "
        f"{len(refused)} key(s) a resumed run may not change (old -> new):\n{lines}\n"
        f"Use a fresh --workdir, or --overwrite to delete that run and start again.")
  return changes


def clear_workdir(workdir: str) -> None:
  """Deletes everything in `workdir`, never leaving something that looks like a valid run (module docstring)."""
  wd = fileio.path(workdir)
  if not wd.exists():
    return
  if fileio.is_remote(workdir):
    if (wd / CONFIG_FILE).exists():
      (wd / CONFIG_FILE).unlink()
    wd.rmtree()
    return
  parent, name = os.path.split(os.path.abspath(os.fspath(workdir)))
  trash = os.path.join(parent, f".{name}.deleting-{uuid.uuid4().hex[:8]}")
  os.rename(os.fspath(workdir), trash)
  fileio.path(trash).rmtree()


def record_attempt(workdir: str, attempt: Mapping[str, Any]) -> dict[str, Any]:
  """Appends `attempt` to run.json's history (the latest attempt's fields also stay at the top level)."""
  path = fileio.path(workdir) / RUN_FILE
  attempts: list = []
  if path.exists():
    try:
      old = fileio.read_json(path)
      attempts = list(old.get("attempts", [])) or [{k: v for k, v in old.items() if k != "attempts"}]
    except ValueError:  # an unreadable record is replaced, not fatal: the config guard already passed
      attempts = []
  attempts.append(dict(attempt))
  record = {**attempt, "attempts": attempts}
  fileio.atomic_write_json(path, record)
  return record
