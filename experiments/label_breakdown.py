"""Per-label accuracy of finished runs: is a CG gain real recognition, or one answer said to everything?

On a 2-way target an arm that always answers "Normal" scores 50 %, and one that always answers the new label
also scores 50 %; an arm above chance must get both labels right. This reads each run's samples.jsonl (the
evaluation runner's per-sample output) and reports accuracy per ground-truth label.

  python -m experiments.label_breakdown --config configs/demo.py:seeds=3 --root runs --out experiments/results/x

Prints a markdown table (run, label, n, accuracy) and writes OUT.md / OUT.json when `--out` is given. ROOT and
OUT may be gs://BUCKET/..., as the sweep's.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Sequence

from experiments import sweep
from medcg import errors
from medcg import fileio

_OPTION = re.compile(r"^([A-D]): (.*)$", re.MULTILINE)


def true_label(sample: dict[str, Any]) -> str:
  """The text of the correct option, read back from the prompt's option lines."""
  options = dict(_OPTION.findall(sample["prompt"]))
  if sample["answer"] not in options:
    raise ValueError(f"sample {sample.get('sample_id')!r}: answer {sample['answer']!r} is not among the prompt's "
                     f"options {sorted(options)}")
  return options[sample["answer"]].strip()


def breakdown(samples_path: str) -> dict[str, dict[str, float]]:
  """{label: {"n", "correct", "accuracy"}} over one samples.jsonl."""
  out: dict[str, dict[str, float]] = {}
  for _, sample in fileio.read_jsonl(samples_path):
    if "answer" not in sample or "prompt" not in sample:
      continue  # detection rows have no options
    row = out.setdefault(true_label(sample), {"n": 0, "correct": 0})
    row["n"] += 1
    row["correct"] += int(bool(sample["correct"]))
  for row in out.values():
    row["accuracy"] = row["correct"] / row["n"]
  return out


def final_samples(workdir: str) -> str | None:
  """The samples.jsonl of the run's last evaluation (eval/step_N/, highest N)."""
  folder = fileio.path(workdir) / "eval"
  if not folder.exists():
    return None
  paths = [os.fspath(p) for p in folder.glob("*/samples.jsonl")]
  step = lambda p: int(re.sub(r"\D", "", p.rsplit("/", 2)[-2]) or -1)
  return max(paths, key=step) if paths else None


def main(argv: Sequence[str] | None = None) -> int:
  p = errors.ArgumentParser(description=__doc__)
  p.add_argument("--config", required=True, help="configs/x.py[:base args], as given to experiments.sweep")
  p.add_argument("--root", default="runs")
  p.add_argument("--out", default="", help="write OUT.md and OUT.json")
  a = p.parse_args(argv)
  table: dict[str, Any] = {}
  for arg in sweep.sweep_args(a.config):
    path = final_samples(sweep.workdir_for(a.root, a.config, arg))
    if path:
      table[arg] = breakdown(path)
  if not table:
    print(f"no finished runs of {a.config} under {a.root}", file=sys.stderr)
    return 1
  lines = ["| Run | Label | n | Accuracy |", "|---|---|---|---|"]
  for arg, labels in table.items():
    for label, row in sorted(labels.items()):
      lines.append(f"| {arg} | {label} | {row['n']} | {100 * row['accuracy']:.1f} |")
  markdown = "\n".join(lines)
  print(markdown)
  if a.out:
    fileio.atomic_write_text(a.out + ".md", markdown + "\n")
    fileio.atomic_write_json(a.out + ".json", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
