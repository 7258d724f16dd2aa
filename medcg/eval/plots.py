"""Paper-style figures from results dicts: Fig. 4 bars, Fig. 5/6 curves, modality x area heatmaps.

Matplotlib with the non-interactive Agg backend (no display on TPU hosts or CI). Several runs per point
are seeds: bars and curves show the mean with ±sd error bars. Files are written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from medcg import mat  # noqa: E402
from medcg import paper  # noqa: E402
from medcg.eval import report  # noqa: E402

Results = Mapping[str, Any]


def _save(fig, path: str | os.PathLike):
  """Renders to memory, then one atomic write (a local file or a gs:// object)."""
  import io
  from medcg import fileio
  buf = io.BytesIO()
  try:
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  finally:
    plt.close(fig)
  fileio.atomic_write_bytes(path, buf.getvalue())
  return fileio.path(path)


def _stats(values: Sequence[float]) -> tuple[float, float]:
  if not values:
    return float("nan"), 0.0
  mean, sd, _ = report.mean_sd([100.0 * v for v in values])
  return mean, sd


def plot_scaling_bars(path: str | os.PathLike, target: int, runs: Mapping[str, Sequence[Results]],
                      show_paper: bool = True) -> Path:
  """Fig. 4: the target's accuracy per setting (ours, mean ± sd), with the paper's bars beside them."""
  target = mat.get(target).id
  settings = [s for s in paper.SCALING_SETTINGS if s in runs]
  if not settings:
    raise ValueError(f"no known scaling settings in {sorted(runs)}; expected some of {paper.SCALING_SETTINGS}")
  ours = [_stats(report.target_accuracies(runs[s], target)) for s in settings]
  paper_bars = paper.FIG4.get(target, {}) if show_paper else {}
  x = np.arange(len(settings))
  width = 0.4 if paper_bars else 0.7
  fig, ax = plt.subplots(figsize=(1.2 * len(settings) + 2, 3.5))
  ax.bar(x - (width / 2 if paper_bars else 0), [m for m, _ in ours], width, yerr=[s for _, s in ours],
         capsize=3, label="medcg")
  if paper_bars:
    ax.bar(x + width / 2, [paper_bars.get(s, np.nan) for s in settings], width, label="paper", alpha=0.6)
  ax.set_xticks(x, [paper.SCALING_TITLES[s] for s in settings], rotation=30, ha="right")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"Target {target:02d} {' '.join(mat.get(target).triplet)}")
  ax.legend()
  return _save(fig, path)


def plot_curves(path: str | os.PathLike, x: Sequence[float], series: Mapping[str, Sequence[Sequence[float]]],
                xlabel: str, title: str = "") -> Path:
  """Fig. 5/6: accuracy against training samples. `series[name][i]` holds the accuracies (fractions,
  one per seed) at `x[i]`."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, points in series.items():
    if len(points) != len(x):
      raise ValueError(f"series {name!r} has {len(points)} points for {len(x)} x values")
    stats = [_stats(list(p)) for p in points]
    ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def element_matrix(results: Results, task: str) -> tuple[list[str], list[str], np.ndarray]:
  """(modalities, areas, accuracy % matrix with NaN where untested) for one task token."""
  cells = {}
  for key, v in results["per_triplet"].items():
    m, a, t = key.split("|")
    if t == task:
      cells[(m, a)] = 100.0 * v["accuracy"]
  mods = [m for m in mat.MODALITIES if any(k[0] == m for k in cells)]
  areas = [a for a in mat.AREAS if any(k[1] == a for k in cells)]
  grid = np.full((len(mods), len(areas)), np.nan)
  for (m, a), acc in cells.items():
    grid[mods.index(m), areas.index(a)] = acc
  return mods, areas, grid


def plot_heatmaps(path: str | os.PathLike, results: Results) -> Path:
  """One modality x area accuracy heatmap per task token, numbers in the cells."""
  tasks = sorted({k.split("|")[2] for k in results["per_triplet"]})
  if not tasks:
    raise ValueError("results have no per_triplet entries to plot")
  cols = min(3, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
  for ax, task in zip(axes.flat, tasks):
    mods, areas, grid = element_matrix(results, task)
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(areas)), areas, rotation=45, ha="right")
    ax.set_yticks(range(len(mods)), mods)
    ax.set_title(task)
    for i in range(len(mods)):
      for j in range(len(areas)):
        if not np.isnan(grid[i, j]):
          ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color="w", fontsize=8)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy (%)")
  return _save(fig, path)
