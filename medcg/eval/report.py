"""Markdown reports that put our accuracies beside the paper's, each with its n and its uncertainty.

Inputs are results dicts (`metrics.aggregate` / `results.json`); several dicts for one arm are seeds. Every
accuracy prints with its n and a 95 % interval (`medcg.eval.stats`): one run as "50.0 [37.8, 62.2]" (Wilson),
several as "48.3 ± 2.9 (seeds 0,1,2)" (mean ± sample sd over seeds). Accuracies print in percent with one
decimal, the paper's as printed. "CG helps" is a test, not a comparison of means: Related against Baseline+
on the target by a two-level bootstrap (`stats.compare`), printed as helps / no evidence / hurts with the
difference's interval and p-value. (The paper's check mark asks for Trained above both baselines on one run.)
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from medcg import fileio
from medcg import mat
from medcg import paper
from medcg import splits
from medcg.eval import metrics
from medcg.eval import stats

ARMS = ("baseline", "baseline_plus", "related")
ARM_TITLES = {"baseline": "Baseline", "baseline_plus": "Baseline+", "related": "Trained"}
MISSING = "–"
CG_TEST_NOTE = ("CG helps: Trained (Related) − Baseline+ on the target, 95 % interval from a two-level bootstrap "
                f"({stats.DEFAULT_ROUNDS:,} rounds: test samples resampled, paired across arms when per-sample "
                "outcomes are known; seeds resampled within each arm); *helps* when the interval is above 0, "
                "*hurts* when below, else *no evidence*.")

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
  """Fractions that are not counts (cIoU, a rate) -> "43.8" or "43.8 ± 0.9", or "–" when there are none."""
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


def run_seed(results: Results) -> int | None:
  """The seed of a run: set by the sweep's collect, else the one in its stored config."""
  seed = results.get("seed", (results.get("config") or {}).get("seed"))
  return None if seed is None else int(seed)


def arm_runs(runs: Sequence[Results], subset: int) -> list[stats.RunAccuracy]:
  """Each run's count on `subset` (runs that did not evaluate it are left out)."""
  key = f"{mat.get(subset).id:02d}"
  out = []
  for r in runs:
    acc = stats.run_accuracy(r, key, run_seed(r))
    if acc is not None:
      out.append(acc)
  return out


def chance(runs: Sequence[Results], subset: int) -> float | None:
  """The subset's chance accuracy (a uniform guess over the options offered), when a run recorded it."""
  key = f"{mat.get(subset).id:02d}"
  for r in runs:
    value = r.get("per_subset", {}).get(key, {}).get("chance")
    if value is not None:
      return float(value)
  return None


def fmt_arm(runs: Sequence[stats.RunAccuracy], with_n: bool = True) -> str:
  """One cell: "50.0 [37.8, 62.2] (n=60)" or "48.3 ± 2.9 (n=60; seeds 0,1,2)", "–" for no runs."""
  summary = stats.summarize(runs)
  return MISSING if summary is None else summary.text(with_n)


def shared_n(*arms: Sequence[stats.RunAccuracy]) -> int | None:
  """The test-set size when every run of every arm has the same one (a table then prints it once)."""
  ns = {r.n for arm in arms for r in arm}
  return ns.pop() if len(ns) == 1 else None


def fmt_decision(decision: stats.Decision | None) -> tuple[str, str]:
  """(difference with interval, verdict with p) cells for a CG row; dashes when an arm is missing."""
  if decision is None:
    return MISSING, MISSING
  tag = "" if decision.test == "paired bootstrap" else ", unpaired"
  verdict = "**helps**" if decision.verdict == "helps" else decision.verdict
  return decision.diff_text(), f"{verdict} ({decision.p_text()}{tag})"


@dataclasses.dataclass
class CGEntry:
  """One CG experiment: a combination and the results of its arms (several results = seeds)."""
  combo: splits.Combination
  arms: Mapping[str, Sequence[Results]]
  paper_row: Any = None          # paper.CGRow (Table 3), or another table's row with baseline / trained
  _decision: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

  @property
  def label(self) -> str:
    names = " + ".join(f"{s:02d} {mat.get(s).modality}-{mat.get(s).area}-{mat.get(s).coarse_task}"
                       for s in self.combo.train)
    t = mat.get(self.combo.target)
    return f"{names} -> {t.id:02d} {t.modality}-{t.area}-{t.coarse_task}"

  def runs(self, arm: str) -> list[stats.RunAccuracy]:
    return arm_runs(self.arms.get(arm, ()), self.combo.target)

  @property
  def chance(self) -> float | None:
    return chance([r for rs in self.arms.values() for r in rs], self.combo.target)

  def decision(self) -> stats.Decision | None:
    """Related vs Baseline+ on the target (`stats.compare`); None when either arm has no runs."""
    if self._decision is None:  # the bootstrap runs once per entry (a table and its JSON both ask)
      rel, plus = self.runs("related"), self.runs("baseline_plus")
      self._decision = (stats.compare(rel, plus) if rel and plus else None,)
    return self._decision[0]


def cg_table(entries: Sequence[CGEntry]) -> str:
  """A Table 3-style table: our Baseline / Baseline+ / Trained with n and intervals, the CG test, the paper's row."""
  headers = ["Row", "Direction", "Combination -> target", "n", "Baseline", "Baseline+", "Trained",
             "Trained − B+ [95 % CI]", "CG helps?", "Paper B / B+ / T", "Paper helps"]
  rows = []
  for e in entries:
    p = e.paper_row
    arms = [e.runs(a) for a in ARMS]
    n = shared_n(*arms)
    gain, verdict = fmt_decision(e.decision())
    rows.append([
        p.row if p else MISSING, paper.DIRECTION_TITLES.get(e.combo.direction, e.combo.direction), e.label,
        MISSING if n is None and not any(arms) else (n if n is not None else "varies"),
        *[fmt_arm(a, with_n=n is None) for a in arms], gain, verdict,
        f"{p.baseline:g} / {p.baseline_plus:g} / {p.trained:g}" if p else MISSING,
        ("✓" if p.helps else "✗") if p else MISSING])
  return markdown_table(headers, rows) + "\n" + CG_TEST_NOTE + "\n"


def _paper_tables12(sid: int) -> list[str]:
  t1, t2 = paper.TABLE1.get(sid), paper.TABLE2.get(sid)
  if t1:
    return [fmt_paper(t1[0]), fmt_paper(t1[1]), fmt_paper(t1[2])]
  return [fmt_paper(t2[0]), MISSING, fmt_paper(t2[1])] if t2 else [MISSING] * 3


def subset_table(runs: Mapping[str, Sequence[Results]], subsets: Sequence[int] | None = None, *,
                 roles: Mapping[int, str] | None = None, tables12: bool = True) -> str:
  """Per-subset accuracy of each arm (e.g. "multi-task") with n and intervals, beside the paper's Tables 1-2.

  `roles` ({subset: "target (held out)"}) replaces the ID / OOD status column, for experiments where the
  subset's role is not the Tables 1-2 one; `tables12=False` drops the paper's Tables 1-2 columns.
  """
  if subsets is None:
    found = set()
    for rs in runs.values():
      for r in rs:
        found |= {int(k) for k in r["per_subset"]}
    subsets = sorted(found)
  headers = ["Subset", "Triplet", "Role" if roles else "Status", "n"] + list(runs)
  if tables12:
    headers += ["Paper baseline", "Paper single-task", "Paper multi-task"]
  rows = []
  for sid in subsets:
    s = mat.get(sid)
    arms = [arm_runs(rs, sid) for rs in runs.values()]
    n = shared_n(*arms)
    row = [f"{sid:02d}", " ".join(s.triplet), roles.get(sid, MISSING) if roles else s.status,
           n if n is not None else ("varies" if any(arms) else MISSING)]
    row += [fmt_arm(a, with_n=n is None) for a in arms]
    rows.append(row + (_paper_tables12(sid) if tables12 else []))
  return markdown_table(headers, rows)


def scaling_table(target: int, runs: Mapping[str, Sequence[Results]]) -> str:
  """Fig. 4 as a table: each setting's target accuracy (n, interval) beside the paper's bar (targets 03, 28).

  Each trained setting is also tested against All Unrelated (the paper's point: related data is what helps),
  by the same bootstrap as "CG helps" (`stats.compare`).
  """
  target = mat.get(target).id
  for setting in runs:
    if setting not in paper.SCALING_SETTINGS:
      raise ValueError(f"unknown scaling setting {setting!r}; expected one of {paper.SCALING_SETTINGS}")
  paper_bars = paper.FIG4.get(target, {})
  headers = ["Setting", "n", "Ours", "− All Unrelated [95 % CI]", "vs All Unrelated", "Paper"]
  unrelated = arm_runs(runs.get("all_unrelated", ()), target)
  rows = []
  for setting in paper.SCALING_SETTINGS:
    if setting not in runs and setting not in paper_bars:
      continue
    got = arm_runs(runs.get(setting, ()), target)
    n = shared_n(got)
    tested = got and unrelated and setting not in ("baseline", "all_unrelated")
    gain, verdict = fmt_decision(stats.compare(got, unrelated) if tested else None)
    rows.append([paper.SCALING_TITLES[setting], n if n is not None else ("varies" if got else MISSING),
                 fmt_arm(got, with_n=n is None), gain, verdict.replace("**helps**", "**higher**")
                 .replace("hurts", "lower"), fmt_paper(paper_bars.get(setting))])
  return markdown_table(headers, rows)


def _count_row(name: str, entry: Mapping[str, Any]) -> list[Any]:
  return [name, entry["n"], f"{100 * entry['accuracy']:.1f}", stats.wilson_text(int(entry["correct"]), int(entry["n"]))]


def summary_table(results: Results, statuses: bool = True) -> str:
  """Overall, per-status and parse-failure numbers of one run, each with n and its 95 % Wilson interval.

  `statuses=False` leaves out the ID / OOD rows (an experiment around one held-out target has no such split).
  """
  rows = [_count_row("Overall (samples)", results["overall"]),
          ["Mean over subsets", results["counts"]["subsets"], f"{100 * results['macro_subset']:.1f}", MISSING]]
  for status, v in (results.get("per_status", {}) if statuses else {}).items():
    rows.append(_count_row(status, v))
  n = results["overall"]["n"]
  rows.append(_count_row("Unparsed answers", {"n": n, "correct": results["parse"]["unparsed"],
                                              "accuracy": results["parse"]["failure_rate"]}))
  return markdown_table(["", "n", "%", "95 % CI"], rows)


# ------------------------------------------------------------------------------------------------------
# One run, read as its experiment defines it.
# ------------------------------------------------------------------------------------------------------
def experiment_of(results: Results) -> Mapping[str, Any]:
  """The `experiment` block of the run's stored config ({} for a config that is not an experiment's)."""
  return (results.get("config") or {}).get("experiment") or {}


def _arm_value(arm: str, baseline: float | None, baseline_plus: float | None, trained: float | None):
  return {"baseline": baseline, "baseline_plus": baseline_plus, "related": trained}.get(arm)


def paper_reference(experiment: Mapping[str, Any]) -> tuple[str, float | None, str] | None:
  """(what the paper printed for this arm, the value or None, the row's context), or None for an experiment
  that is read per subset against Tables 1-2 (multitask, or no experiment)."""
  name, arm = experiment.get("name"), experiment.get("arm", "related")
  arm_title = ARM_TITLES.get(arm, arm)
  if name in ("cg_table3", "cross_backbone") and "row" in experiment:
    p = paper.table3_row(int(experiment["row"]))
    if name == "cross_backbone" and experiment.get("backbone", "llava") != "llava":
      bb = next(r for r in paper.TABLE9 if r.table3_row == p.row)
      b, t = bb.qwen if experiment["backbone"] == "qwen2-vl" else bb.llama
      return (f"Table 4/11 row {p.row} ({experiment['backbone']}), {arm_title}", _arm_value(arm, b, None, t),
              f"paper Baseline -> Trained: {b:g} -> {t:g}")
    direction = paper.DIRECTION_TITLES.get(p.direction, p.direction)
    return (f"Table 3 row {p.row} ({direction}), {arm_title}", _arm_value(arm, p.baseline, p.baseline_plus, p.trained),
            f"{p.label}; paper B / B+ / T: {p.baseline:g} / {p.baseline_plus:g} / {p.trained:g}")
  if name == "cg_three_source":
    p = paper.TABLE10[int(experiment["row"])]
    return (f"Table 10 row {experiment['row']}, {arm_title}", _arm_value(arm, p.baseline, None, p.trained),
            f"{p.label}; paper Baseline -> Trained: {p.baseline:g} -> {p.trained:g}")
  if name == "scaling":
    setting = experiment.get("setting")
    return (f"Fig. 4, target {int(experiment['target']):02d}, {paper.SCALING_TITLES.get(setting, setting)}",
            paper.FIG4.get(int(experiment["target"]), {}).get(setting), "paper bar read from the figure")
  if name == "limited_data":
    return (f"Fig. {experiment.get('fig')} ({experiment.get('direction')}), n={experiment.get('n')}, {arm_title}",
            None, "the paper draws this as a curve only (no printed value)")
  if name == "cls_det":
    if int(experiment.get("table", 0)) == 13:
      p = paper.TABLE13_14[int(experiment["row"]) - 1]
      return (f"Tables 13-14 row {experiment['row']}, {arm_title}", None,
              f"{p.label}; paper (other backbones) Next-Chat {p.next_chat[0]:g} -> {p.next_chat[1]:g}, "
              f"MiniGPT-v2 {p.minigpt_v2[0]:g} -> {p.minigpt_v2[1]:g}")
    return f"Table 5 row {experiment.get('row')}, {arm_title}", None, "the paper prints cIoU gains only"
  return None


def subset_roles(experiment: Mapping[str, Any]) -> dict[int, str] | None:
  """{target: "target (held out)"} for experiments built around one target; None where ID / OOD applies."""
  if experiment.get("name") in (None, "multitask") or "target" not in experiment:
    return None
  target = mat.get(int(experiment["target"])).id
  seen = int(experiment.get("target_samples", 0) or 0)
  return {target: f"target ({seen} samples in training)" if seen else "target (held out)"}


def comparison_table(results: Results) -> str | None:
  """This run's number beside the one the paper printed for the same experiment and arm (None: see
  `paper_reference`). Chance is the accuracy of a uniform guess over the options offered."""
  experiment = experiment_of(results)
  ref = paper_reference(experiment)
  if ref is None:
    return None
  what, value, context = ref
  target = mat.get(int(experiment["target"])).id
  got = arm_runs([results], target)
  ch = chance([results], target)
  headers = ["Target", "Role", "n", "Ours [95 % CI]", "Chance", "Paper", "Paper value"]
  row = [f"{target:02d} {' '.join(mat.get(target).triplet)}", (subset_roles(experiment) or {}).get(target, MISSING),
         got[0].n if got else MISSING, fmt_arm(got, with_n=False), MISSING if ch is None else f"{100 * ch:.1f}",
         what, fmt_paper(value)]
  return markdown_table(headers, [row]) + f"\n{context}.\n"


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
