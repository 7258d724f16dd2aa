"""Markdown reports that put our accuracies beside the paper's.

Inputs are results dicts (`metrics.aggregate` / `results.json`); several dicts for one arm are seeds and
print as mean ± sd (sample sd, ddof=1; one run prints its value alone). Accuracies print in percent with
one decimal, the paper's as printed. "CG helps" follows the paper's check marks: Trained beats both
Baseline and Baseline+ (true for all 43 rows of Table 3).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from medcg import fileio
from typing import Any, Mapping, Sequence

from medcg import mat
from medcg import paper
from medcg import splits
from medcg.eval import metrics

ARMS = ("baseline", "baseline_plus", "related")
ARM_TITLES = {"baseline": "Baseline", "baseline_plus": "Baseline+", "related": "Trained"}
MISSING = "–"

Results = Mapping[str, Any]


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, sample sd, n) of `values`; sd is 0 for a single value. Empty input raises."""
  values = [float(v) for v in values]
  if not values:
    raise ValueError("mean_sd of no values")
  n = len(values)
  mean = sum(values) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, sd, n


def fmt_pct(values: Sequence[float] | None) -> str:
  """Fractions -> "43.8" (one run) or "43.8 ± 0.9" (several), or "–" when there are none."""
  if not values:
    return MISSING
  mean, sd, n = mean_sd([100.0 * v for v in values])
  return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {sd:.1f}"


def fmt_paper(value: float | None) -> str:
  if value is None:
    return MISSING
  return f"{value:g}"


def _cell(x: Any) -> str:
  return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells are escaped so a "|" in a label cannot break the columns."""
  for i, row in enumerate(rows):
    if len(row) != len(headers):
      raise ValueError(f"table row {i} has {len(row)} cells for {len(headers)} columns: {list(row)}")
  lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def target_accuracies(runs: Sequence[Results], subset: int) -> list[float]:
  """The target subset's accuracy in each run that evaluated it."""
  out = []
  for r in runs:
    acc = metrics.subset_accuracy(r, subset)
    if acc is not None:
      out.append(acc)
  return out


@dataclasses.dataclass
class CGEntry:
  """One CG experiment: a combination and the results of its arms (several results = seeds)."""
  combo: splits.Combination
  arms: Mapping[str, Sequence[Results]]
  paper_row: paper.CGRow | None = None

  @property
  def label(self) -> str:
    names = " + ".join(f"{s:02d} {mat.get(s).modality}-{mat.get(s).area}-{mat.get(s).coarse_task}"
                       for s in self.combo.train)
    t = mat.get(self.combo.target)
    return f"{names} -> {t.id:02d} {t.modality}-{t.area}-{t.coarse_task}"

  def accuracies(self, arm: str) -> list[float]:
    return target_accuracies(self.arms.get(arm, ()), self.combo.target)

  def helps(self) -> bool | None:
    """Whether Trained beats both Baseline and Baseline+ on the mean; None if an arm is missing."""
    means = {}
    for arm in ARMS:
      accs = self.accuracies(arm)
      if not accs:
        return None
      means[arm] = mean_sd(accs)[0]
    return means["related"] > max(means["baseline"], means["baseline_plus"])


def _mark(flag: bool | None) -> str:
  return MISSING if flag is None else ("✓" if flag else "✗")


def cg_table(entries: Sequence[CGEntry]) -> str:
  """A Table 3-style table: our Baseline / Baseline+ / Trained beside the paper's row, CG helps?

  "Trained − B+" pairs the runs by position (seed i of Trained minus seed i of Baseline+), so pass
  both arms' runs in the same seed order.
  """
  headers = ["Row", "Direction", "Combination -> target", "Baseline", "Baseline+", "Trained", "Trained − B+",
             "CG helps", "Paper B / B+ / T", "Paper helps"]
  rows = []
  for e in entries:
    p = e.paper_row
    rel, plus = e.accuracies("related"), e.accuracies("baseline_plus")
    gain = fmt_pct([r - q for r, q in zip(rel, plus)]) if rel and len(rel) == len(plus) else MISSING
    rows.append([
        p.row if p else MISSING, paper.DIRECTION_TITLES.get(e.combo.direction, e.combo.direction), e.label,
        fmt_pct(e.accuracies("baseline")), fmt_pct(plus), fmt_pct(rel), gain, _mark(e.helps()),
        f"{p.baseline:g} / {p.baseline_plus:g} / {p.trained:g}" if p else MISSING,
        _mark(p.helps) if p else MISSING])
  return markdown_table(headers, rows)


def subset_table(runs: Mapping[str, Sequence[Results]], subsets: Sequence[int] | None = None) -> str:
  """Per-subset accuracy of each arm (e.g. "multi-task"), with the paper's Tables 1-2 beside it."""
  if subsets is None:
    found = set()
    for rs in runs.values():
      for r in rs:
        found |= {int(k) for k in r["per_subset"]}
    subsets = sorted(found)
  headers = ["Subset", "Triplet", "Status", "n"] + list(runs) + ["Paper baseline", "Paper single-task",
                                                                  "Paper multi-task"]
  rows = []
  for sid in subsets:
    s = mat.get(sid)
    ns = [r["per_subset"][f"{sid:02d}"]["n"] for rs in runs.values() for r in rs if f"{sid:02d}" in r["per_subset"]]
    t1, t2 = paper.TABLE1.get(sid), paper.TABLE2.get(sid)
    paper_cols = ([fmt_paper(t1[0]), fmt_paper(t1[1]), fmt_paper(t1[2])] if t1 else
                  [fmt_paper(t2[0]), MISSING, fmt_paper(t2[1])] if t2 else [MISSING] * 3)
    rows.append([f"{sid:02d}", " ".join(s.triplet), s.status, max(ns) if ns else MISSING]
                + [fmt_pct(target_accuracies(rs, sid)) for rs in runs.values()] + paper_cols)
  return markdown_table(headers, rows)


def scaling_table(target: int, runs: Mapping[str, Sequence[Results]]) -> str:
  """Fig. 4 as a table: each setting's target accuracy beside the paper's bar (targets 03 and 28)."""
  target = mat.get(target).id
  paper_bars = paper.FIG4.get(target, {})
  headers = ["Setting", "Ours", "Paper"]
  rows = []
  for setting in paper.SCALING_SETTINGS:
    if setting not in runs and setting not in paper_bars:
      continue
    rows.append([paper.SCALING_TITLES[setting], fmt_pct(target_accuracies(runs.get(setting, ()), target)),
                 fmt_paper(paper_bars.get(setting))])
  for setting in runs:
    if setting not in paper.SCALING_SETTINGS:
      raise ValueError(f"unknown scaling setting {setting!r}; expected one of {paper.SCALING_SETTINGS}")
  return markdown_table(headers, rows)


def summary_table(results: Results) -> str:
  """Overall, ID/OOD and parse-failure numbers of one run."""
  rows = [["Overall (samples)", results["overall"]["n"], fmt_pct([results["overall"]["accuracy"]])],
          ["Mean over subsets", results["counts"]["subsets"], fmt_pct([results["macro_subset"]])]]
  for status, v in results.get("per_status", {}).items():
    rows.append([status, v["n"], fmt_pct([v["accuracy"]])])
  rows.append(["Unparsed answers", results["parse"]["unparsed"], fmt_pct([results["parse"]["failure_rate"]])])
  return markdown_table(["", "n", "%"], rows)


def detection_table(results: Results) -> str:
  """cIoU, mean IoU, accuracy at IoU 0.5 and unparsed rate per detection subset and overall (percent)."""
  det = results.get("detection")
  if not det:
    raise ValueError("results hold no detection section (no detection subset was evaluated)")
  headers = ["Subset", "Triplet", "n", "cIoU %", "mean IoU %", f"IoU ≥ {det['iou_threshold']:g} %", "Unparsed %"]

  def row(name, triplet, v):
    return [name, triplet, v["n"], fmt_pct([v["ciou"]]), fmt_pct([v["mean_iou"]]), fmt_pct([v["acc_at_iou"]]),
            fmt_pct([v["parse_failure_rate"]])]

  rows = [row(k, " ".join(v["triplet"]), v) for k, v in det["per_subset"].items()]
  rows.append(row("All", "", det["overall"]))
  return markdown_table(headers, rows)


def render(title: str, sections: Sequence[tuple[str, str]], meta: Mapping[str, Any] | None = None) -> str:
  """A markdown document: a title, an optional key: value block (commands, fingerprints), sections."""
  parts = [f"# {title}\n"]
  if meta:
    parts.append("\n".join(f"- **{k}**: `{v}`" for k, v in meta.items()) + "\n")
  for heading, body in sections:
    parts.append(f"## {heading}\n\n{body.rstrip()}\n")
  return "\n".join(parts)


def write_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]],
                 meta: Mapping[str, Any] | None = None) -> Path:
  """Renders and writes a report atomically; returns its path."""
  metrics.atomic_write_text(path, render(title, sections, meta))
  return fileio.path(path)
