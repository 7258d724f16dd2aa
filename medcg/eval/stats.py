"""Uncertainty for accuracies, and the test that decides whether compositional generalisation helped.

An arm of an experiment is one or more runs (seeds) evaluated on the same test samples. `RunAccuracy` is one
run's count (correct of n) and, when its samples.jsonl was read, its per-sample outcomes in sample-id order.

- **One run**: accuracy with its 95 % Wilson score interval (`wilson`); it stays inside [0, 1] and is
  sensible at 0 % or 100 % and at small n, where the normal interval is not.
- **Several seeds**: mean ± sample sd over seeds, and the seeds named (`ArmSummary.text`).
- **"CG helps"** (`compare`): Related minus Baseline+ on the target, the paper's control for fine-tuning on
  the same amount of unrelated data. The difference's 95 % interval comes from a two-level bootstrap: each
  round resamples the test samples (the same draw for both arms, so the comparison is paired sample by
  sample) and, within each arm, its seeds, so both the test set's size and the training seeds' spread
  widen the interval. When a run has no per-sample outcomes (a table re-collected from counts only) the
  arms cannot be paired, and each round draws each seed's accuracy from a binomial at its own count
  instead ("unpaired"). Verdict: "helps" when the interval is above zero, "hurts" when below, otherwise
  "no evidence"; the two-sided bootstrap p-value is 2 x the smaller tail share of differences <= 0 / >= 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054   # the 0.975 quantile of the standard normal
DEFAULT_ROUNDS = 10_000
DEFAULT_SEED = 0


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
  """The Wilson score interval (fractions) of `correct` successes in `n` trials; (0, 1) when n is 0."""
  if n < 0 or not 0 <= correct <= n:
    raise ValueError(f"wilson: need 0 <= correct <= n, got correct={correct}, n={n}")
  if n == 0:
    return 0.0, 1.0
  p = correct / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def interval_text(low: float, high: float) -> str:
  """Fractions -> "[37.8, 62.2]" (percent, one decimal): how every table prints an interval."""
  return f"[{100 * low:.1f}, {100 * high:.1f}]"


def wilson_text(correct: int, n: int) -> str:
  """`correct` of `n` as its Wilson interval's text."""
  return interval_text(*wilson(correct, n))


def outcomes_digest(sample_ids: Sequence[str]) -> str:
  """A short hash of the sorted sample ids: two runs pair up only when theirs are equal."""
  return hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class RunAccuracy:
  """One run on one subset: `correct` of `n`; `outcomes` (0/1 per sample, sorted by sample id) and
  `ids_digest` (`outcomes_digest` of those ids) when the per-sample records are known."""
  correct: int
  n: int
  seed: int | None = None
  outcomes: str | None = None
  ids_digest: str | None = None

  def __post_init__(self):
    if self.n < 0 or not 0 <= self.correct <= self.n:
      raise ValueError(f"RunAccuracy: need 0 <= correct <= n, got {self.correct} of {self.n}")
    if self.outcomes is not None:
      if len(self.outcomes) != self.n or set(self.outcomes) - {"0", "1"}:
        raise ValueError(f"RunAccuracy: outcomes must be {self.n} characters of 0/1")
      if self.outcomes.count("1") != self.correct:
        raise ValueError(f"RunAccuracy: outcomes have {self.outcomes.count('1')} correct, counts say {self.correct}")

  @property
  def accuracy(self) -> float:
    return self.correct / self.n if self.n else 0.0

  def interval(self) -> tuple[float, float]:
    return wilson(self.correct, self.n)


@dataclasses.dataclass(frozen=True)
class ArmSummary:
  """What one cell of a table says about an arm: the mean, its spread or interval, n and the seeds."""
  mean: float                  # fraction
  low: float                   # one run: Wilson bounds; several: mean - sd, mean + sd
  high: float
  sd: float | None             # None for one run
  n: tuple[int, ...]           # test samples per run
  seeds: tuple[int | None, ...]

  @property
  def runs(self) -> int:
    return len(self.n)

  def text(self, with_n: bool = True) -> str:
    """"50.0 [37.8, 62.2] (n=60)" for one run; "48.3 ± 2.9 (n=60; seeds 0,1,2)" for several."""
    n = self.n[0] if len(set(self.n)) == 1 else "/".join(str(v) for v in self.n)
    if self.sd is None:
      body = f"{100 * self.mean:.1f} {interval_text(self.low, self.high)}"
      return f"{body} (n={n})" if with_n else body
    body = f"{100 * self.mean:.1f} ± {100 * self.sd:.1f}"
    seeds = ",".join("?" if s is None else str(s) for s in self.seeds)
    return f"{body} (n={n}; seeds {seeds})" if with_n else f"{body} (seeds {seeds})"


def summarize(runs: Sequence[RunAccuracy]) -> ArmSummary | None:
  """An arm's summary, or None when it has no runs."""
  if not runs:
    return None
  accs = [r.accuracy for r in runs]
  ns, seeds = tuple(r.n for r in runs), tuple(r.seed for r in runs)
  if len(runs) == 1:
    low, high = runs[0].interval()
    return ArmSummary(accs[0], low, high, None, ns, seeds)
  mean = float(np.mean(accs))
  sd = float(np.std(accs, ddof=1))
  return ArmSummary(mean, mean - sd, mean + sd, sd, ns, seeds)


@dataclasses.dataclass(frozen=True)
class Decision:
  """The outcome of `compare`: the difference of mean accuracies (fractions), its interval, p and verdict."""
  diff: float
  low: float
  high: float
  p_value: float
  verdict: str                 # "helps" | "no evidence" | "hurts"
  test: str                    # "paired bootstrap" | "unpaired bootstrap"
  rounds: int

  def p_text(self) -> str:
    """"p=0.0042", or "p<0.0001" below the bootstrap's resolution (1 / rounds)."""
    floor = 1.0 / self.rounds
    return f"p<{floor:.2g}" if self.p_value < floor else f"p={self.p_value:.2g}"

  def diff_text(self) -> str:
    """"+45.6 [+38.9, +52.2]": the difference and its interval, in points."""
    return f"{100 * self.diff:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"

  def text(self) -> str:
    """"helps: +45.6 [+38.9, +52.2], p<0.0001"."""
    return f"{self.verdict}: {self.diff_text()}, {self.p_text()}"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _pairable(runs: Sequence[RunAccuracy]) -> bool:
  return all(r.outcomes is not None and r.ids_digest is not None for r in runs)


def compare(treated: Sequence[RunAccuracy], control: Sequence[RunAccuracy], *, rounds: int = DEFAULT_ROUNDS,
            seed: int = DEFAULT_SEED, confidence: float = 0.95) -> Decision:
  """Whether `treated` (Related) beats `control` (Baseline+): see the module docstring for the test."""
  if not treated or not control:
    raise ValueError("compare: both arms need at least one run")
  rng = np.random.default_rng(seed)
  paired = _pairable(treated) and _pairable(control) and len({r.ids_digest for r in (*treated, *control)}) == 1
  if paired:
    t = np.array([[c == "1" for c in r.outcomes] for r in treated], np.float64)   # (seeds, samples)
    c = np.array([[c == "1" for c in r.outcomes] for r in control], np.float64)
    diffs = _paired_rounds(t, c, rounds, rng)
    observed = t.mean() - c.mean()
  else:
    diffs = _unpaired_rounds(treated, rng, rounds) - _unpaired_rounds(control, rng, rounds)
    observed = float(np.mean([r.accuracy for r in treated]) - np.mean([r.accuracy for r in control]))
  tail = (1 - confidence) / 2
  low, high = (float(v) for v in np.quantile(diffs, [tail, 1 - tail]))
  p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
  verdict = "helps" if low > 0 else "hurts" if high < 0 else "no evidence"
  return Decision(float(observed), low, high, p, verdict, "paired bootstrap" if paired else "unpaired bootstrap",
                  rounds)


def _seed_draws(rng: np.random.Generator, runs: int, rounds: int) -> np.ndarray:
  """(rounds, runs) indices of the seeds each round uses (with replacement; one run: always itself)."""
  return rng.integers(runs, size=(rounds, runs))


def _paired_rounds(t: np.ndarray, c: np.ndarray, rounds: int, rng: np.random.Generator,
                   chunk: int = 1000) -> np.ndarray:
  m = t.shape[1]
  out = np.empty(rounds)
  for start in range(0, rounds, chunk):
    k = min(chunk, rounds - start)
    weights = rng.multinomial(m, np.full(m, 1.0 / m), size=k) / m     # (k, samples): one resample per round
    acc_t, acc_c = weights @ t.T, weights @ c.T                       # (k, seeds): each seed on that resample
    pick_t, pick_c = _seed_draws(rng, t.shape[0], k), _seed_draws(rng, c.shape[0], k)
    out[start:start + k] = (np.take_along_axis(acc_t, pick_t, 1).mean(1)
                            - np.take_along_axis(acc_c, pick_c, 1).mean(1))
  return out


def _unpaired_rounds(runs: Sequence[RunAccuracy], rng: np.random.Generator, rounds: int) -> np.ndarray:
  n = np.array([r.n for r in runs])
  p = np.array([r.accuracy for r in runs])
  pick = _seed_draws(rng, len(runs), rounds)
  draws = rng.binomial(n[pick], p[pick]) / np.maximum(n[pick], 1)
  return draws.mean(1)


def run_accuracy(results: Mapping, subset_key: str, seed: int | None = None) -> RunAccuracy | None:
  """A results dict's (`medcg.eval.metrics`) count for one subset ("03"), with outcomes when it carries them."""
  entry = results.get("per_subset", {}).get(subset_key)
  if entry is None:
    return None
  out = (results.get("outcomes") or {}).get(subset_key) or {}
  return RunAccuracy(int(entry["correct"]), int(entry["n"]), seed, out.get("correct"), out.get("ids_digest"))
