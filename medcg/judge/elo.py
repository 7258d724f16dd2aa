"""Bootstrap online Elo over judged battles (MLLM-Bench `scripts/cal_clo.py` parameters).

K=4, scale 400, base 10, initial rating 1000, tie = 0.5, 1000 bootstrap rounds with a seed, median
rating reported (plus a 95 % interval here). What cal_clo.py does differently: it reads each pair's
vote-count file into rows (model_a, model_b, outcome, count), one per outcome with a count > 0, for both
ordered pairs (A, B) and (B, A), so each outcome is there twice (wins and ties alike); it drops the three
"unable to decide" buckets (only "tie", opposite votes in the two orders, scores 0.5); and it applies
one update of K * count per row instead of count updates of K, in one pass over the rows (file listing
order for its final table, the resampled order per bootstrap round, which resamples rows, not battles),
so a row's whole count moves the ratings at once and the result depends on the row order.
Here each judged sample is one battle with one update of K, every unable bucket is a tie (0.5), and each
bootstrap round draws single battles with replacement in a random order, so (up to the seeded draw) the
median does not depend on the order the battles were recorded in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def online_elo(battles: Sequence[tuple[str, str, float]], models: Sequence[str], k: float = 4.0,
               scale: float = 400.0, base: float = 10.0, init: float = 1000.0) -> dict[str, float]:
  """One pass of online Elo; a battle is (model_a, model_b, score of a: 1 win, 0.5 tie, 0 loss)."""
  rating = {m: float(init) for m in models}
  for a, b, score in battles:
    expected_a = 1.0 / (1.0 + base ** ((rating[b] - rating[a]) / scale))
    delta = k * (score - expected_a)
    rating[a] += delta
    rating[b] -= delta
  return rating


def bootstrap_elo(battles: Sequence[tuple[str, str, float]], rounds: int = 1000, seed: int = 42,
                  k: float = 4.0, scale: float = 400.0, base: float = 10.0,
                  init: float = 1000.0) -> dict[str, dict[str, float]]:
  """Median and 95 % interval of online Elo over bootstrap resamples of the battles.

  Round r replays `battles[idx[r]]` with `idx = default_rng(seed).integers(0, n, (rounds, n))`; all
  rounds advance together, one battle position at a time (vectorised over rounds, same result as
  `online_elo` per round). Returns {model: {"elo": median, "lo": 2.5th, "hi": 97.5th percentile}},
  sorted by Elo.
  """
  if rounds < 1:
    raise ValueError(f"elo rounds must be >= 1, got {rounds}")
  if not battles:
    return {}
  models = sorted({m for a, b, _ in battles for m in (a, b)})
  col = {m: i for i, m in enumerate(models)}
  a_col = np.array([col[a] for a, _, _ in battles], np.int32)
  b_col = np.array([col[b] for _, b, _ in battles], np.int32)
  score = np.array([s for _, _, s in battles], np.float64)
  if np.any(a_col == b_col):
    raise ValueError("a battle pits a model against itself")
  idx = np.random.default_rng(seed).integers(0, len(battles), size=(rounds, len(battles)))
  a_all, b_all, s_all = a_col[idx], b_col[idx], score[idx]
  del idx
  rating = np.full((rounds, len(models)), float(init))
  rows = np.arange(rounds)
  for t in range(len(battles)):
    a, b = a_all[:, t], b_all[:, t]
    expected_a = 1.0 / (1.0 + base ** ((rating[rows, b] - rating[rows, a]) / scale))
    delta = k * (s_all[:, t] - expected_a)
    rating[rows, a] += delta
    rating[rows, b] -= delta
  med = np.median(rating, axis=0)
  lo, hi = np.percentile(rating, [2.5, 97.5], axis=0)
  table = {m: {"elo": float(med[i]), "lo": float(lo[i]), "hi": float(hi[i])} for i, m in enumerate(models)}
  return dict(sorted(table.items(), key=lambda kv: -kv[1]["elo"]))


def battles_from_records(records: Sequence[dict]) -> list[tuple[str, str, float]]:
  """One battle per judged sample (model vs opponent); every unable bucket counts as a tie."""
  score = {"win": 1.0, "lose": 0.0}
  return [(r["model"], r["opponent"], score.get(r["verdict"], 0.5))
          for r in records if r["verdict"] is not None]
