"""MLLM-Bench pairwise protocol: whole-line vote parsing, the two-order combination rule, W/T/L metrics.

Every sample of a (model, opponent) pair is judged twice (reference/evaluation.md §1.5):
  order 1 shows the opponent (the reference / anchor) as Answer1 and the model as Answer2,
  order 2 swaps them.
Each raw label is mapped to the side it favours, then the two side votes combine:
  same side twice -> that side; a side + "unable" -> that side; opposite sides -> tie;
  "unable" twice -> that situation's bucket, or the mixed "unable" bucket if the situations differ.
The leaderboard's tie column is tie + all three unable buckets; the win rate counts ties as 0.
"""
from __future__ import annotations

import collections
from typing import Iterable

from medcg.errors import ConfigError
from medcg.judge import prompts

MODEL, OPPONENT = "model", "opponent"
UNABLE_ONE, UNABLE_TWO, UNABLE_MIXED = "unable_one", "unable_two", "unable"
WIN, LOSE, TIE = "win", "lose", "tie"
VERDICTS = (WIN, LOSE, TIE, UNABLE_ONE, UNABLE_TWO, UNABLE_MIXED)
ORDERS = (1, 2)
_LOWER_LABELS = {label.lower(): label for label in prompts.LABELS}

# How a reply with several label lines is read. The prompt asks for the vote alone on the last line, so
# "last_line" (the default) takes the last label line, as a careful reader would; "strict" treats two
# different label lines as unparsed. (MLLM-Bench's scripts/evaluate.py takes the first label *in label
# order* - Answer1, Answer2, situation one, situation two - that occurs as a whole lowercased line.)
LAST_LINE, STRICT = "last_line", "strict"
LABEL_POLICIES = (LAST_LINE, STRICT)
DEFAULT_LABEL_POLICY = LAST_LINE


def check_label_policy(policy, key: str = "label_policy") -> str:
  """`policy` if it is one of LABEL_POLICIES, else a ConfigError (a ValueError) naming `key`."""
  if policy not in LABEL_POLICIES:
    raise ConfigError(f"{key} must be one of {', '.join(repr(p) for p in LABEL_POLICIES)}, got {policy!r}")
  return policy


def label_lines(text: str) -> list[str]:
  """The labels of the reply's label lines, in reply order.

  A label line is a whole line that, stripped and lowercased, equals one of the four labels ("Answer1."
  or "**Answer1**" are not label lines, as in MLLM-Bench).
  """
  return [_LOWER_LABELS[key] for line in str(text).splitlines()
          if (key := line.strip().lower()) in _LOWER_LABELS]


def parse_vote(text: str, policy: str = DEFAULT_LABEL_POLICY) -> str | None:
  """The label of a judge reply under `policy`, or None.

  None when no line is a label line. "last_line": the last label line wins. "strict": all label lines
  must be the same label, otherwise None. The same label twice is one vote under both policies.
  """
  check_label_policy(policy)
  found = label_lines(text)
  if not found:
    return None
  if policy == STRICT and len(set(found)) > 1:
    return None
  return found[-1]


def shown_models(order: int, model: str, opponent: str) -> tuple[str, str]:
  """(Answer1's model, Answer2's model) for an order."""
  if order == 1:
    return opponent, model
  if order == 2:
    return model, opponent
  raise ValueError(f"order must be 1 or 2, got {order!r}")


def side_vote(label: str, order: int) -> str:
  """Maps a parsed label to the side it favours: MODEL, OPPONENT, UNABLE_ONE or UNABLE_TWO."""
  if label == prompts.UNABLE_ONE:
    return UNABLE_ONE
  if label == prompts.UNABLE_TWO:
    return UNABLE_TWO
  if label not in (prompts.ANSWER1, prompts.ANSWER2):
    raise ValueError(f"not a judge label: {label!r}")
  answer1, answer2 = shown_models(order, MODEL, OPPONENT)
  return answer1 if label == prompts.ANSWER1 else answer2


def combine(vote1: str, vote2: str) -> str:
  """The sample verdict (from the model's side) for the side votes of order 1 and order 2."""
  sides = {MODEL: WIN, OPPONENT: LOSE}
  unable = (UNABLE_ONE, UNABLE_TWO)
  for v in (vote1, vote2):
    if v not in sides and v not in unable:
      raise ValueError(f"not a side vote: {v!r}")
  if vote1 in sides and vote2 in sides:
    return sides[vote1] if vote1 == vote2 else TIE
  if vote1 in sides:
    return sides[vote1]
  if vote2 in sides:
    return sides[vote2]
  return vote1 if vote1 == vote2 else UNABLE_MIXED


def leaderboard_bucket(verdict: str) -> str:
  """win / tie / lose as the leaderboard counts them (every unable bucket is a tie)."""
  return verdict if verdict in (WIN, LOSE) else TIE


def _wtl(verdicts: list[str]) -> dict:
  c = collections.Counter(leaderboard_bucket(v) for v in verdicts)
  n = len(verdicts)
  return {"win": c[WIN], "tie": c[TIE], "lose": c[LOSE], "n": n, "win_rate": c[WIN] / n if n else None}


def aggregate(records: Iterable[dict]) -> list[dict]:
  """Per (model, opponent) metrics from per-sample records.

  Each record needs `model`, `opponent`, `level`, `capability`, `votes` (the two side votes, None where
  an order failed) and `verdict` (None unless both orders gave a vote). Samples without a verdict are
  counted in `n_incomplete` and left out of every rate (as MLLM-Bench leaves them out of its counts).
  """
  groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
  for r in records:
    groups[(r["model"], r["opponent"])].append(r)
  out = []
  for (model, opponent), recs in sorted(groups.items()):
    done = [r for r in recs if r["verdict"] is not None]
    verdicts = [r["verdict"] for r in done]
    counts = collections.Counter(verdicts)
    by_level, by_cap = collections.defaultdict(list), collections.defaultdict(list)
    for r in done:
      by_level[r["level"]].append(r["verdict"])
      by_cap[r["capability"]].append(r["verdict"])
    n = len(done)
    wtl = _wtl(verdicts)
    consistent = sum(1 for r in done if r["votes"][0] == r["votes"][1])
    out.append({
        "model": model, "opponent": opponent,
        "n_samples": len(recs), "n_judged": n, "n_incomplete": len(recs) - n,
        "counts": {v: counts[v] for v in VERDICTS},
        "win": wtl["win"], "tie": wtl["tie"], "lose": wtl["lose"],
        "win_rate": wtl["win"] / n if n else None,
        "position_consistency": consistent / n if n else None,
        "by_level": {k: _wtl(v) for k, v in sorted(by_level.items())},
        "by_capability": {k: _wtl(v) for k, v in sorted(by_cap.items())},
    })
  return out
