"""One judge run: plan the calls, replay cached ones, judge the rest, combine per sample.

Calls are planned for every (model, opponent) pair and sample, in both orders. A call whose key is in
the cache is not sent again (that is what makes a crashed run resumable); each fresh reply that parses
is cached the moment it arrives. Replies that fail or do not parse are kept in the records with their
reason and are not cached, so the next run retries them. Replies are parsed under the run's label policy
(protocol.parse_vote), cached ones too: the cache keeps the raw text, so switching the policy re-reads
every cached reply instead of replaying the label an earlier run chose. A judge that leaves more than
`max_unparsed_rate` of its replies unparsed gets a warning in the output, quoting what it said: a
leaderboard built on its few parsed votes would otherwise look as sound as any other.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
from typing import Iterable, Sequence

from tqdm import tqdm

from medcg.errors import ConfigError
from medcg.judge import cache as cache_lib
from medcg.judge import elo, prompts, protocol
from medcg.judge.clients import JudgeFailure, JudgeRequest
from medcg.judge.data import QUESTION_TYPES, Answer, LoadedImage, Sample, Skip, load_image

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Call:
  pair: tuple[str, str]
  sample: Sample
  order: int
  answer1: Answer
  answer2: Answer
  key: str
  raw: str | None = None
  label: str | None = None
  error: str | None = None
  label_lines: list[str] = dataclasses.field(default_factory=list)  # labels of the reply's label lines
  cached: bool = False
  attempts: int = 0


@dataclasses.dataclass
class RunOutput:
  """Everything a report needs."""
  records: list[dict]
  metrics: list[dict]
  elo: dict
  skipped: list[Skip]
  stats: dict
  warnings: list[str] = dataclasses.field(default_factory=list)


DEFAULT_MAX_UNPARSED_RATE = 0.2
_EXAMPLES, _EXAMPLE_CHARS = 3, 200  # raw replies quoted in the unparsed-rate warning


def check_max_unparsed_rate(rate, key: str = "max_unparsed_rate") -> float:
  """`rate` as a float in [0, 1], else a ConfigError naming `key`."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
    raise ConfigError(f"{key} must be a number from 0 to 1, got {rate!r}")
  return float(rate)


def _cut(text: str) -> str:
  return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + "..."


def unparsed_warning(stats: dict, judge_identity: str, max_rate: float) -> str | None:
  """The warning for a judge whose unparsed rate is above `max_rate` (equal is fine), else None."""
  rate = stats["parse_failure_rate"]
  if rate is None or rate <= max_rate:
    return None
  examples = "; ".join(json.dumps(t, ensure_ascii=False) for t in stats["unparsed_examples"])  # one line each
  labels = " / ".join(repr(label) for label in prompts.LABELS)
  return (f"judge {judge_identity} left {stats['unparsed']} of {stats['replies']} replies unparsed "
          f"({100 * rate:.1f} %, above protocol.max_unparsed_rate={max_rate:g}): the leaderboard counts only "
          f"the replies that parsed. A reply parses when a whole line is one of {labels}; check the judge "
          f"model and its max_new_tokens / max_tokens. First unparsed replies: {examples}")


def model_pairs(models: Sequence[str], reference: str, pairing: str) -> list[tuple[str, str]]:
  """(model, opponent) pairs: every model vs the reference, or every unordered pair ("all")."""
  if pairing == "reference":
    return [(m, reference) for m in models if m != reference]
  if pairing == "all":
    everyone = [reference] + [m for m in models if m != reference]
    return [(a, b) for i, b in enumerate(everyone) for a in everyone[i + 1:]]
  raise ValueError(f"protocol.pairing must be 'reference' or 'all', got {pairing!r}")


def _check_samples(samples: Sequence[Sample], require_criteria: bool
                   ) -> tuple[dict[str, LoadedImage], list[Skip]]:
  images, skipped = {}, []
  for s in tqdm(samples, desc="images", unit="img", leave=False, disable=len(samples) < 100):
    if s.question_type not in QUESTION_TYPES:  # MLLM-Bench has one sample whose type is a URL
      skipped.append(Skip(s.id, None, f"question type {s.question_type!r} is not one of {QUESTION_TYPES}"))
      continue
    if require_criteria and not s.criteria:
      skipped.append(Skip(s.id, None, "no criteria for this sample (set data.require_criteria=False "
                                      "to judge without)"))
      continue
    try:
      images[s.id] = load_image(s.image_path)
    except OSError as e:
      skipped.append(Skip(s.id, None, str(e)))
  return images, skipped


def run_judging(samples: Sequence[Sample], answers: dict[str, dict[str, Answer]], reference: str,
                judge, cache: cache_lib.JudgeCache, pairing: str = "reference",
                require_criteria: bool = True, read_cache: bool = True,
                elo_rounds: int = 1000, elo_seed: int = 42,
                label_policy: str = protocol.DEFAULT_LABEL_POLICY,
                max_unparsed_rate: float = DEFAULT_MAX_UNPARSED_RATE) -> RunOutput:
  """Judges every candidate against its opponents on every usable sample, both orders.

  `answers` maps model id -> {sample id -> Answer} and must contain `reference`. `judge` is an
  HttpJudge or LocalJudge. With `read_cache=False` every call is sent again (fresh replies still
  refresh the cache). `label_policy` is protocol.LABEL_POLICIES' "last_line" or "strict". Above
  `max_unparsed_rate` unparsed replies the output carries a warning (unparsed_warning).
  """
  protocol.check_label_policy(label_policy)
  check_max_unparsed_rate(max_unparsed_rate)
  if reference not in answers:
    raise ValueError(f"reference model {reference!r} has no answers (models: {sorted(answers)})")
  images, skipped = _check_samples(samples, require_criteria)
  known = {s.id for s in samples}
  for model, by_id in answers.items():
    for sid in sorted(set(by_id) - known):
      skipped.append(Skip(sid, model, "answer for a sample id that is not in the question set"))

  calls: list[_Call] = []
  pairs = model_pairs(list(answers), reference, pairing)
  for pair in pairs:
    for s in samples:
      if s.id not in images:
        continue
      missing = [m for m in pair if s.id not in answers[m]]
      if missing:
        skipped.append(Skip(s.id, pair[0], f"no answer from {', '.join(missing)} (pair {pair[0]} vs {pair[1]})"))
        continue
      for order in protocol.ORDERS:
        m1, m2 = protocol.shown_models(order, *pair)
        a1, a2 = answers[m1][s.id], answers[m2][s.id]
        key = cache_lib.cache_key(
            sample_id=s.id, question=s.question, question_type=s.question_type,
            image_sha256=images[s.id].sha256, answer1=a1.text, answer2=a2.text, criteria=s.criteria,
            order=order, template=prompts.TEMPLATE_VERSION, judge=judge.identity, decoding=judge.decoding)
        calls.append(_Call(pair, s, order, a1, a2, key))

  pending: dict[str, list[_Call]] = collections.defaultdict(list)  # equal keys are one call
  for c in calls:
    hit = cache.get(c.key) if read_cache else None
    # Re-parse the cached text under this run's policy: the stored label is the one the writing run chose,
    # so a stricter parser or policy never replays a label it would now reject.
    label = protocol.parse_vote(hit[0], label_policy) if hit else None
    if label:
      c.raw, c.label, c.cached = hit[0], label, True
    else:
      pending[c.key].append(c)
  keys = list(pending)
  log.info("judge calls: %d planned, %d cached, %d to send", len(calls), sum(c.cached for c in calls), len(keys))
  system = prompts.system_prompt()

  def request(c: _Call) -> JudgeRequest:
    s = c.sample
    return JudgeRequest(system=system, image=images[s.id], user=prompts.item_prompt(
        s.question, s.question_type, c.answer1.text, c.answer2.text, s.criteria))

  requests = [request(pending[k][0]) for k in keys]
  with tqdm(total=len(requests), desc="judge", unit="call", disable=not requests) as bar:
    for idx, reply in judge.run(requests):
      key = keys[idx]
      if isinstance(reply, JudgeFailure):
        for c in pending[key]:
          c.error, c.attempts = reply.message, reply.attempts
      else:
        label = protocol.parse_vote(reply, label_policy)
        if label is not None:
          cache.put(key, reply, label)
        for c in pending[key]:
          c.raw, c.label, c.attempts = reply, label, 1
          if label is None:
            c.error = _unparsed_reason(reply, label_policy)
      bar.update(1)

  for c in calls:
    if c.raw is not None:
      c.label_lines = protocol.label_lines(c.raw)
  records = _sample_records(calls)
  n_replies = sum(1 for c in calls if c.raw is not None)
  unparsed = [c for c in calls if c.raw is not None and c.label is None]
  n_unparsed = len(unparsed)
  stats = {
      "calls": len(calls), "cached": sum(c.cached for c in calls), "sent": len(keys),
      "replies": n_replies, "unparsed": n_unparsed,
      "parse_failure_rate": n_unparsed / n_replies if n_replies else None,
      "failed_calls": sum(1 for c in calls if c.raw is None),
      # Replies the label policy had to choose for: several label lines, and those among them that disagree
      # (the only ones "last_line" and "strict" read differently).
      "label_policy": label_policy,
      "multi_label_replies": sum(1 for c in calls if len(c.label_lines) > 1),
      "conflicting_label_replies": sum(1 for c in calls if len(set(c.label_lines)) > 1),
      "max_unparsed_rate": max_unparsed_rate,
      "unparsed_examples": [_cut(c.raw) for c in unparsed[:_EXAMPLES]],
  }
  warning = unparsed_warning(stats, judge.identity, max_unparsed_rate)
  return RunOutput(records=records, metrics=protocol.aggregate(records),
                   elo=elo.bootstrap_elo(elo.battles_from_records(records), rounds=elo_rounds,
                                         seed=elo_seed),
                   skipped=skipped, stats=stats, warnings=[warning] if warning else [])


def _unparsed_reason(reply: str, policy: str) -> str:
  found = protocol.label_lines(reply)
  if found:  # only "strict" rejects a reply with label lines: they disagree
    return f"unparsed: label lines disagree ({', '.join(found)}) and label_policy is {policy!r}"
  return "unparsed: no line equal to one of the labels " + repr(prompts.LABELS)


def _sample_records(calls: Iterable[_Call]) -> list[dict]:
  by_sample: dict[tuple, list[_Call]] = collections.defaultdict(list)
  for c in calls:
    by_sample[(c.pair, c.sample.id)].append(c)
  records = []
  for ((model, opponent), _), cs in by_sample.items():
    cs.sort(key=lambda c: c.order)
    s = cs[0].sample
    votes = [protocol.side_vote(c.label, c.order) if c.label else None for c in cs]
    verdict = protocol.combine(*votes) if all(votes) else None
    records.append({
        "sample_id": s.id, "model": model, "opponent": opponent, "level": s.level,
        "capability": s.capability, "question_type": s.question_type,
        "orders": [{"order": c.order, "answer1": c.answer1.model, "answer2": c.answer2.model,
                    "raw": c.raw, "label": c.label, "label_lines": c.label_lines, "error": c.error,
                    "cached": c.cached, "attempts": c.attempts} for c in cs],
        "votes": votes, "verdict": verdict,
    })
  return records
