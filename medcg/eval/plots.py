"""The paper's figures from results dicts: Table 3 rows as grouped bars, Fig. 4 bars, Fig. 5/6 curves, heatmaps.

Every figure has a title naming the experiment and the n, a chance line (the accuracy of a uniform guess over
the options offered), and the paper's values beside ours where it printed them. Error bars are the 95 % Wilson
interval for one run and ± sd over seeds for several (`medcg.eval.stats`). The `*_figure` functions return the
matplotlib Figure (tests read the drawn values back from its artists); `save` writes PNG and SVG atomically
(local or gs://). Matplotlib uses the Agg backend: there is no display on TPU hosts or CI.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from medcg import fileio  # noqa: E402
from medcg import mat  # noqa: E402
from medcg import paper  # noqa: E402
from medcg.eval import metrics  # noqa: E402
from medcg.eval import report  # noqa: E402
from medcg.eval import stats  # noqa: E402

Results = Mapping[str, Any]
ARM_COLOURS = {"baseline": "#9e9e9e", "baseline_plus": "#5b8cc9", "related": "#e07b39"}
CHANCE_STYLE = dict(color="#c0392b", linestyle="--", linewidth=1.2)
PAPER_STYLE = dict(marker="D", color="black", markersize=6, linestyle="none", zorder=5)


def save(fig, path: str | os.PathLike) -> Path:
  """Writes `path` as PNG and the same stem as .svg, each in one atomic write; closes the figure."""
  path = fileio.path(path)
  if path.suffix != ".png":
    raise ValueError(f"{path}: plots are written as .png (and .svg beside it)")
  blobs = {}
  try:
    for fmt in ("png", "svg"):
      buf = io.BytesIO()
      fig.savefig(buf, format=fmt, dpi=120, bbox_inches="tight")
      blobs[fmt] = buf.getvalue()
  finally:
    plt.close(fig)
  fileio.atomic_write_bytes(path, blobs["png"])
  fileio.atomic_write_bytes(path.with_suffix(".svg"), blobs["svg"])
  return path


def bar_stats(runs: Sequence[stats.RunAccuracy]) -> tuple[float, float, float]:
  """(mean %, error below, error above) of an arm; NaN and zeros when it has no runs."""
  summary = stats.summarize(runs)
  if summary is None:
    return float("nan"), 0.0, 0.0
  # max(0, ...): at 0 % or 100 % a Wilson bound can land a rounding error on the wrong side of the mean
  return (100 * summary.mean, max(0.0, 100 * (summary.mean - summary.low)),
          max(0.0, 100 * (summary.high - summary.mean)))


def _n_text(runs: Sequence[stats.RunAccuracy]) -> str:
  ns = sorted({r.n for r in runs})
  seeds = len(runs)
  n = "n=" + "/".join(str(v) for v in ns) if ns else "n=–"
  return n + (f", {seeds} seeds" if seeds > 1 else "")


def _error_note(runs_per_point: int) -> str:
  return "error bars: ± sd over seeds" if runs_per_point > 1 else "error bars: 95 % Wilson interval"


# ------------------------------------------------------------------------------------------------------
# Table 3 (and any Baseline / Baseline+ / Trained experiment): grouped bars per row.
# ------------------------------------------------------------------------------------------------------
ROWS_PER_PANEL = 11   # a 43-row Table 3 becomes four panels, not one 80-inch figure


def cg_rows_figure(entries: Sequence[report.CGEntry], title: str):
  """One group of three bars (Baseline, Baseline+, Trained) per CG row, paper values as diamonds; more than
  ROWS_PER_PANEL rows are drawn in stacked panels."""
  if not entries:
    raise ValueError("no CG rows to plot")
  panels = [entries[i:i + ROWS_PER_PANEL] for i in range(0, len(entries), ROWS_PER_PANEL)]
  widest = max(len(p) for p in panels)
  fig, axes = plt.subplots(len(panels), 1, figsize=(max(4.5, 1.9 * widest + 1.5), 4.2 * len(panels)),
                           squeeze=False)
  most_runs = max(len(e.runs(arm)) for e in entries for arm in report.ARMS)
  for ax, panel in zip(axes[:, 0], panels):
    _cg_rows_panel(ax, panel)
  axes[0, 0].set_title(f"{title}\n{_error_note(most_runs)}; CG helps? = Trained vs Baseline+ (bootstrap)",
                       fontsize=9)
  axes[-1, 0].legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.2))
  fig.tight_layout()
  return fig


def _cg_rows_panel(ax, entries: Sequence[report.CGEntry]) -> None:
  width = 0.26
  x = np.arange(len(entries))
  for k, arm in enumerate(report.ARMS):
    vals = [bar_stats(e.runs(arm)) for e in entries]
    ax.bar(x + (k - 1) * width, [v[0] for v in vals], width, yerr=[[v[1] for v in vals], [v[2] for v in vals]],
           capsize=3, color=ARM_COLOURS[arm], label=report.ARM_TITLES[arm], gid=f"ours/{arm}")
    field = "trained" if arm == "related" else arm  # rows that print no Baseline+ (Table 10) get no marker
    paper_vals = [getattr(e.paper_row, field, None) for e in entries]
    paper_vals = [np.nan if v is None else v for v in paper_vals]
    ax.plot(x + (k - 1) * width, paper_vals, gid=f"paper/{arm}", label="paper" if k == 0 else None,
            **PAPER_STYLE)
  for i, e in enumerate(entries):
    if e.chance is not None:
      ax.hlines(100 * e.chance, i - 1.5 * width, i + 1.5 * width, gid="chance",
                label="chance" if i == 0 else None, **CHANCE_STYLE)
    decision = e.decision()
    if decision is not None:
      ax.text(i, 103, decision.verdict, ha="center", va="bottom", fontsize=8,
              fontweight="bold" if decision.verdict == "helps" else "normal")
  labels = []
  for e in entries:
    row = f"row {e.paper_row.row}" if getattr(e.paper_row, "row", None) else ""
    t = mat.get(e.combo.target)
    labels.append(f"{row}\n{'+'.join(f'{s:02d}' for s in e.combo.train)} -> {t.id:02d}\n"
                  f"{_n_text(e.runs('related') or e.runs('baseline'))}")
  ax.set_xticks(x, labels, fontsize=8)
  ax.set_xlim(-0.6, len(entries) - 0.4)
  ax.set_ylabel("target accuracy (%)")
  ax.set_ylim(0, 112)
  ax.grid(axis="y", alpha=0.3)


# ------------------------------------------------------------------------------------------------------
# Fig. 4: one bar per scaling setting.
# ------------------------------------------------------------------------------------------------------
def scaling_figure(target: int, runs: Mapping[str, Sequence[Results]], title: str = ""):
  """Fig. 4: the target's accuracy per setting (ours with error bars), the paper's bars beside them."""
  target = mat.get(target).id
  settings = [s for s in paper.SCALING_SETTINGS if s in runs]
  if not settings:
    raise ValueError(f"no known scaling settings in {sorted(runs)}; expected some of {paper.SCALING_SETTINGS}")
  arm = {s: report.arm_runs(runs[s], target) for s in settings}
  ours = [bar_stats(arm[s]) for s in settings]
  paper_bars = paper.FIG4.get(target, {})
  x = np.arange(len(settings))
  width = 0.4 if paper_bars else 0.7
  fig, ax = plt.subplots(figsize=(1.2 * len(settings) + 2, 4))
  ax.bar(x - (width / 2 if paper_bars else 0), [m for m, _, _ in ours], width,
         yerr=[[lo for _, lo, _ in ours], [hi for _, _, hi in ours]], capsize=3, label="medcg",
         color=ARM_COLOURS["related"], gid="ours")
  if paper_bars:
    ax.bar(x + width / 2, [paper_bars.get(s, np.nan) for s in settings], width, label="paper", alpha=0.55,
           color="#555555", gid="paper")
  ch = report.chance([r for s in settings for r in runs[s]], target)
  if ch is not None:
    ax.axhline(100 * ch, label="chance", gid="chance", **CHANCE_STYLE)
  ax.set_xticks(x, [f"{paper.SCALING_TITLES[s]}\n{_n_text(arm[s])}" for s in settings], rotation=30, ha="right",
                fontsize=8)
  ax.set_ylabel("target accuracy (%)")
  ax.set_ylim(0, 100)
  t = mat.get(target)
  most = max(len(v) for v in arm.values())
  ax.set_title(f"{title or 'Fig. 4: scaling and disrupting CG'}\ntarget {t.id:02d} {' '.join(t.triplet)}; "
               f"{_error_note(most)}", fontsize=9)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  ax.grid(axis="y", alpha=0.3)
  return fig


# ------------------------------------------------------------------------------------------------------
# Fig. 5 / 6: accuracy against the number of training samples.
# ------------------------------------------------------------------------------------------------------
def curves_figure(x: Sequence[float], series: Mapping[str, Sequence[Sequence[stats.RunAccuracy]]], xlabel: str,
                  title: str, chance: float | None = None):
  """`series[name][i]` holds the runs (one per seed) at `x[i]`; points without runs are left out."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  most = 1
  ns = set()
  for name, points in series.items():
    if len(points) != len(x):
      raise ValueError(f"series {name!r} has {len(points)} points for {len(x)} x values")
    keep = [i for i, p in enumerate(points) if p]
    vals = [bar_stats(points[i]) for i in keep]
    most = max([most] + [len(points[i]) for i in keep])
    ns |= {r.n for i in keep for r in points[i]}
    ax.errorbar([x[i] for i in keep], [v[0] for v in vals], yerr=[[v[1] for v in vals], [v[2] for v in vals]],
                marker="o", capsize=3, label=name, gid=f"ours/{name}")
  if chance is not None:
    ax.axhline(100 * chance, label="chance", gid="chance", **CHANCE_STYLE)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("target accuracy (%)")
  ax.set_ylim(0, 100)
  n = "/".join(str(v) for v in sorted(ns)) or "–"
  ax.set_title(f"{title}\ntest n={n}; {_error_note(most)}; the paper draws curves only", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return fig


# ------------------------------------------------------------------------------------------------------
# Modality x area heatmap per task token, and one run's bars.
# ------------------------------------------------------------------------------------------------------
def per_triplet(results: Results) -> dict[str, Mapping[str, Any]]:
  """results["per_triplet"], or summed from per_subset (a collected table keeps only the per-subset counts)."""
  if "per_triplet" in results:
    return dict(results["per_triplet"])
  out: dict[str, dict[str, Any]] = {}
  for k, v in results["per_subset"].items():
    cell = out.setdefault(metrics.triplet_key(mat.get(int(k)).triplet), {"n": 0, "correct": 0})
    cell["n"] += v["n"]
    cell["correct"] += v["correct"]
  for cell in out.values():
    cell["accuracy"] = cell["correct"] / cell["n"] if cell["n"] else 0.0
  return out


def element_matrix(results: Results, task: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
  """(modalities, areas, accuracy % with NaN where untested, n per cell) for one task token."""
  cells = {}
  for key, v in per_triplet(results).items():
    m, a, t = key.split("|")
    if t == task:
      cells[(m, a)] = v
  mods = [m for m in mat.MODALITIES if any(k[0] == m for k in cells)]
  areas = [a for a in mat.AREAS if any(k[1] == a for k in cells)]
  grid = np.full((len(mods), len(areas)), np.nan)
  counts = np.zeros((len(mods), len(areas)), np.int64)
  for (m, a), v in cells.items():
    grid[mods.index(m), areas.index(a)] = 100.0 * v["accuracy"]
    counts[mods.index(m), areas.index(a)] = v["n"]
  return mods, areas, grid, counts


def _triplet_chance(results: Results, m: str, a: str, t: str) -> float | None:
  """Chance of a triplet cell: the mean over its subsets' chance, weighted by n (None if any is unknown)."""
  parts = [(v["n"], v.get("chance")) for k, v in results["per_subset"].items()
           if mat.get(int(k)).triplet == (m, a, t)]
  if not parts or any(c is None for _, c in parts):
    return None
  return sum(n * c for n, c in parts) / sum(n for n, _ in parts)


def heatmap_figure(results: Results, title: str = "medcg evaluation"):
  """One modality x area heatmap per task token: accuracy and n in each cell; a red frame marks a cell whose
  95 % interval contains its chance level (no evidence it beats guessing)."""
  triplets = per_triplet(results)
  tasks = sorted({k.split("|")[2] for k in triplets})
  if not tasks:
    raise ValueError("results have no per_triplet entries to plot")
  cols = min(3, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows + 0.6), squeeze=False)
  im = None
  for ax, task in zip(axes.flat, tasks):
    mods, areas, grid, counts = element_matrix(results, task)
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(areas)), areas, rotation=45, ha="right")
    ax.set_yticks(range(len(mods)), mods)
    ax.set_title(f"task: {task}")
    for i, m in enumerate(mods):
      for j, a in enumerate(areas):
        if np.isnan(grid[i, j]):
          continue
        v = triplets[metrics.triplet_key((m, a, task))]
        low, high = stats.wilson(v["correct"], v["n"])
        ch = _triplet_chance(results, m, a, task)
        at_chance = ch is not None and low <= ch <= high
        ax.text(j, i, f"{grid[i, j]:.0f}{'*' if at_chance else ''}\nn={counts[i, j]}", ha="center", va="center",
                color="w" if grid[i, j] < 60 else "k", fontsize=7, gid=f"cell/{m}|{a}|{task}")
        if at_chance:
          ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#c0392b", linewidth=2,
                                     gid=f"chance/{m}|{a}|{task}"))
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  n = results["overall"]["n"]
  fig.suptitle(f"{title}: accuracy (%) by modality x area, n={n} samples\n"
               "* and red frame: the 95 % interval contains chance", fontsize=9)
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy (%)")
  return fig


def plot_heatmaps(path: str | os.PathLike, results: Results, title: str = "medcg evaluation") -> Path:
  return save(heatmap_figure(results, title), path)


def run_figure(results: Results, title: str):
  """One run's accuracy per evaluated subset with its interval, chance, and the paper's value when the
  experiment defines one (`report.paper_reference`)."""
  keys = sorted(results["per_subset"])
  if not keys:
    raise ValueError("results have no classification subsets to plot")
  fig, ax = plt.subplots(figsize=(max(3.2, 1.1 * len(keys) + 1.6), 3.8))
  runs = [report.arm_runs([results], int(k)) for k in keys]
  vals = [bar_stats(r) for r in runs]
  x = np.arange(len(keys))
  ax.bar(x, [v[0] for v in vals], 0.55, yerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=3,
         color=ARM_COLOURS["related"], label="medcg", gid="ours")
  for i, k in enumerate(keys):
    ch = results["per_subset"][k].get("chance")
    if ch is not None:
      ax.hlines(100 * ch, i - 0.35, i + 0.35, gid="chance", label="chance" if i == 0 else None, **CHANCE_STYLE)
  experiment = report.experiment_of(results)
  ref = report.paper_reference(experiment)
  if ref is not None and ref[1] is not None:
    target = f"{mat.get(int(experiment['target'])).id:02d}"
    if target in keys:
      ax.plot([keys.index(target)], [ref[1]], gid="paper", label=f"paper: {ref[0]}", **PAPER_STYLE)
  ax.set_xticks(x, [f"{k} {' '.join(results['per_subset'][k]['triplet'])}\nn={results['per_subset'][k]['n']}"
                    for k in keys], fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"{title}\nerror bars: 95 % Wilson interval", fontsize=9)
  ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, -0.45))
  ax.grid(axis="y", alpha=0.3)
  return fig


def plot_run(path: str | os.PathLike, results: Results, title: str) -> Path:
  return save(run_figure(results, title), path)
