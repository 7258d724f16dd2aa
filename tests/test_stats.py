"""Wilson intervals, arm summaries and the CG decision on constructed results whose answers are known."""
import pytest

from medcg.eval import stats


@pytest.mark.parametrize("correct,n,low,high", [
    (0, 10, 0.0, 0.2775), (1, 10, 0.0179, 0.4042), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
    (30, 60, 0.3773, 0.6227)])
def test_wilson_matches_published_values(correct, n, low, high):
  got = stats.wilson(correct, n)
  assert got == pytest.approx((low, high), abs=5e-4)


def test_wilson_rejects_bad_counts():
  assert stats.wilson(0, 0) == (0.0, 1.0)
  with pytest.raises(ValueError, match="correct=11, n=10"):
    stats.wilson(11, 10)


def _run(bits: str, seed=0, ids=None):
  ids = ids or [f"s{i:03d}" for i in range(len(bits))]
  return stats.RunAccuracy(bits.count("1"), len(bits), seed, bits, stats.outcomes_digest(ids))


def test_summaries_one_run_and_seeds():
  one = stats.summarize([stats.RunAccuracy(30, 60, 0)])
  assert one.text() == "50.0 [37.7, 62.3] (n=60)" and one.sd is None
  several = stats.summarize([stats.RunAccuracy(c, 60, s) for s, c in enumerate((29, 30, 31))])
  assert several.mean == pytest.approx(0.5) and several.sd == pytest.approx(1 / 60)
  assert several.text() == "50.0 ± 1.7 (n=60; seeds 0,1,2)"
  assert several.text(with_n=False) == "50.0 ± 1.7 (seeds 0,1,2)"
  assert stats.summarize([]) is None
  with pytest.raises(ValueError, match="outcomes have 2 correct, counts say 3"):
    stats.RunAccuracy(3, 4, 0, "1100", "x")


def test_decision_helps_hurts_and_no_evidence():
  strong, chance = _run("1" * 90 + "0" * 10), _run("1" * 50 + "0" * 50)
  d = stats.compare([strong], [chance])
  assert d.verdict == "helps" and d.test == "paired bootstrap"
  assert d.diff == pytest.approx(0.40) and d.low > 0.25 and d.p_value < 1e-3
  assert stats.compare([chance], [strong]).verdict == "hurts"
  same = stats.compare([chance], [chance])
  assert (same.verdict, same.diff, same.low, same.high, same.p_value) == ("no evidence", 0.0, 0.0, 0.0, 1.0)
  assert d.text().startswith("helps: +40.0 [")


def test_pairing_is_what_detects_a_small_consistent_gain():
  # Baseline+ gets 50 samples right, Trained the same 50 plus 10 more: every discordant sample favours Trained.
  trained, plus = _run("1" * 60 + "0" * 40), _run("1" * 50 + "0" * 50)
  paired = stats.compare([trained], [plus])
  assert paired.verdict == "helps" and paired.low > 0
  counts_only = stats.compare([stats.RunAccuracy(60, 100)], [stats.RunAccuracy(50, 100)])
  assert counts_only.test == "unpaired bootstrap" and counts_only.verdict == "no evidence"
  assert counts_only.low < 0 < counts_only.high
  # Different test samples cannot be paired either.
  other = _run("1" * 50 + "0" * 50, ids=[f"t{i:03d}" for i in range(100)])
  assert stats.compare([trained], [other]).test == "unpaired bootstrap"


def test_seed_spread_widens_the_interval():
  plus = [_run("1" * 30 + "0" * 30, seed=s) for s in range(3)]
  steady = [_run("1" * 55 + "0" * 5, seed=s) for s in range(3)]
  spread = [_run("1" * 35 + "0" * 25, seed=0), _run("1" * 55 + "0" * 5, seed=1), _run("1" * 55 + "0" * 5, seed=2)]
  a, b = stats.compare(steady, plus), stats.compare(spread, plus)
  assert (a.high - a.low) < (b.high - b.low)
  assert stats.compare(steady, plus, seed=1).low == pytest.approx(a.low, abs=0.02)   # stable across rng seeds
