"""CG split algebra: which subsets train a model for an unseen target, and how many samples each gives.

Definitions (arXiv 2412.20070 §3-§4; medmat.md §3). The target t has the triplet (M, A, T); two subsets
"share" an element as `mat.shared_elements` says (tasks match when their task tags intersect).

Related combination of two training subsets (a, b), by direction type:
  * fixed modality  (M,A,T2) + (M,A2,T) -> (M,A,T): both share M with t; a shares A but not T;
                    b shares T but not A.
  * fixed area      (M,A,T2) + (M2,A,T) -> (M,A,T): both share A; a shares M but not T; b shares T but not M.
  * fixed task      (M,A2,T) + (M2,A,T) -> (M,A,T): both share T; a shares M but not A; b shares A but not M.
  * modality-area pairs: t's modality is bound to one area (Der-Skin, DP-Mouth, FP-Fundus, Mic-Cell,
                    OCT-Retina): a has t's pair and another task; b has t's task and another such pair.
So each combination covers the target triplet, neither training subset has it, and (for the first three)
one element is shared by all three. With `state_umbrella=True` a task also matches when both tasks are
among State, COVID and Cancer (the paper groups COVID and Cancer diagnosis under State, §2.1); Table 3's
rows 24, 26, 29 and 30 need it.

Three-source combination (Table 10): m has t's modality in another area; a has t's area with another
modality; c has t's task with another modality and another area.

Unrelated pool (Baseline+): ID subsets sharing no element with t (`mat.not_sharing`). Scaling settings
(Fig. 4) are pools of ID subsets: all unrelated, all related, all related minus those sharing the modality
/ area / task, all data (every ID subset but t).

Mixtures are exact: a tuple of (subset, split, n_samples). Sample counts follow the paper: a training
subset gives at most 3,000 samples (`per_subset_cap`); a related combination uses both subsets up to the
cap; Baseline+ draws the same total from the unrelated pool; scaling settings total 15,000, split as
evenly as the availability and the cap allow (water-filling). `scale` multiplies the cap and the totals
for small demos. Which samples of a subset are drawn (label-balanced, seeded) is the input pipeline's job.
Availability comes from a dict {subset: train count} or anything with `.count(subset, split)` such as
`medcg.data.shards.Manifest`, so the same code sizes SynthMAT and the real release.

The target's own data never enters a training mixture: `Mixture` checks it on construction, and the only
way to add target samples (Fig. 6) is `add_target_samples`, which records how many.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Mapping, Sequence

from absl import logging

from medcg import mat
from medcg import paper

PER_SUBSET_CAP = 3000
SCALING_TOTAL = 15000
DIRECTIONS = paper.DIRECTIONS
SCALING_SETTINGS = tuple(s for s in paper.SCALING_SETTINGS if s != "baseline")
_STATE_FAMILY = frozenset({"State", "COVID", "Cancer"})


# ---------------------------------------------------------------------------------------------------
# Element algebra.

def shares(target, other, kind: str, state_umbrella: bool = False) -> bool:
  """Whether `other` shares the element `kind` ("modality", "area", "task") with `target`."""
  t, o = mat.get(target), mat.get(other)
  if kind == "modality":
    return t.modality == o.modality
  if kind == "area":
    return t.area == o.area
  if kind == "task":
    if t.task_tags & o.task_tags:
      return True
    return state_umbrella and bool(t.task_tags & _STATE_FAMILY) and bool(o.task_tags & _STATE_FAMILY)
  raise ValueError(f"unknown element kind {kind!r}; expected modality, area or task")


def _profile(target, other, state_umbrella):
  return {k for k in mat.ELEMENT_KINDS if shares(target, other, k, state_umbrella)}


def direction_of(train: Sequence, target, state_umbrella: bool = False) -> str | None:
  """The direction type of the two-subset combination `train` -> `target`, or None if it is not one.

  Order does not matter: the subset carrying the fixed element's partner is found either way.
  """
  if len(train) != 2:
    raise ValueError(f"a related combination has two training subsets, got {list(train)}")
  t = mat.get(target)
  a, b = (mat.get(s) for s in train)
  if t.id in (a.id, b.id) or a.id == b.id:
    return None
  pa, pb = _profile(t, a, state_umbrella), _profile(t, b, state_umbrella)
  if pa >= set(mat.ELEMENT_KINDS) or pb >= set(mat.ELEMENT_KINDS):
    return None  # a training subset with the target's whole triplet is not compositional
  if t.pair is not None:
    # Pair modalities never share their modality or area alone, so only the pair type applies.
    for x, y, px, py in ((a, b, pa, pb), (b, a, pb, pa)):
      if (x.pair == t.pair and "task" not in px and y.pair is not None and y.pair != t.pair
          and py == {"task"}):
        return "pair"
    return None
  for fixed in ("modality", "area", "task"):
    if fixed not in pa or fixed not in pb:
      continue
    x, y = (k for k in mat.ELEMENT_KINDS if k != fixed)
    if ({x, y} & pa, {x, y} & pb) in (({x}, {y}), ({y}, {x})):
      return fixed
  return None


@dataclasses.dataclass(frozen=True)
class Combination:
  """Training subsets whose elements together cover an unseen target's triplet."""
  train: tuple[int, ...]
  target: int
  direction: str                 # a direction type, or "three-source"
  state_umbrella: bool = False

  def __str__(self) -> str:
    return f"{' + '.join(f'{s:02d}' for s in self.train)} -> {self.target:02d} ({self.direction})"


def related_combinations(target, direction: str | None = None, statuses=("ID", "OOD"),
                         state_umbrella: bool = False) -> list[Combination]:
  """Every two-subset related combination for `target` (optionally of one direction type).

  Training subsets come from `statuses` (Table 3 trains on OOD subsets too). Pairs are listed once,
  ordered as (element carrier, task carrier) for the pair type and by id otherwise.
  """
  t = mat.get(target)
  if direction is not None and direction not in DIRECTIONS:
    raise ValueError(f"unknown direction type {direction!r}; expected one of {DIRECTIONS}")
  pool = [s.id for s in mat.SUBSETS.values() if s.status in set(statuses) and s.id != t.id]
  out = []
  for a, b in itertools.combinations(pool, 2):
    d = direction_of((a, b), t, state_umbrella)
    if d is None or (direction is not None and d != direction):
      continue
    if d == "pair" and mat.get(b).pair == t.pair:
      a, b = b, a
    out.append(Combination((a, b), t.id, d, state_umbrella))
  return out


def is_three_source(sources: Sequence, target) -> bool:
  """Whether (modality source, area source, task source) -> target is a Table 10 combination."""
  t = mat.get(target)
  m, a, c = (mat.get(s) for s in sources)
  if t.id in (m.id, a.id, c.id) or len({m.id, a.id, c.id}) < 3:
    return False
  return (m.modality == t.modality and m.area != t.area
          and a.area == t.area and a.modality != t.modality
          and shares(t, c, "task") and c.modality != t.modality and c.area != t.area)


def three_source_combinations(target, statuses=("ID", "OOD")) -> list[Combination]:
  """Every (modality source, area source, task source) combination for `target` (Table 10)."""
  t = mat.get(target)
  pool = [s.id for s in mat.SUBSETS.values() if s.status in set(statuses) and s.id != t.id]
  return [Combination((m, a, c), t.id, "three-source")
          for m, a, c in itertools.product(pool, repeat=3) if is_three_source((m, a, c), t)]


def table3_combination(row: int) -> Combination:
  """Table 3 row `row` as a Combination, checked against the direction-type definitions."""
  r = paper.table3_row(row)
  d = direction_of(r.train, r.target, r.state_umbrella)
  if d != r.direction:
    raise AssertionError(f"Table 3 row {row}: {r.train} -> {r.target} is {d!r} under the split rules, "
                         f"but the paper lists it as {r.direction!r}")
  return Combination(r.train, r.target, r.direction, r.state_umbrella)


def table10_combination(index: int) -> Combination:
  """Table 10 row `index` (0-based) as a three-source Combination."""
  r = paper.TABLE10[index]
  sources = (r.modality_src, r.area_src, r.task_src)
  if not is_three_source(sources, r.target):
    raise AssertionError(f"Table 10 row {index}: {sources} -> {r.target} is not a three-source combination")
  return Combination(sources, r.target, "three-source")


def unrelated_pool(target, statuses=("ID",)) -> list[int]:
  """Subsets sharing no MAT element with the target: the Baseline+ pool."""
  return mat.not_sharing(target, statuses=statuses)


def scaling_pool(target, setting: str, statuses=("ID",)) -> list[int]:
  """The subsets of a Fig. 4 setting for `target` (never the target itself)."""
  t = mat.get(target)
  related = mat.sharing(t, statuses=statuses)
  if setting == "all_unrelated":
    return mat.not_sharing(t, statuses=statuses)
  if setting == "all_related":
    return related
  if setting in ("wo_modality", "wo_area", "wo_task"):
    kind = setting[3:]
    return [s for s in related if not shares(t, s, kind)]
  if setting == "all_data":
    return [s.id for s in mat.SUBSETS.values() if s.status in set(statuses) and s.id != t.id]
  raise ValueError(f"unknown scaling setting {setting!r}; expected one of {SCALING_SETTINGS}")


# ---------------------------------------------------------------------------------------------------
# Sized mixtures.

@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  subset: int
  split: str
  n_samples: int


@dataclasses.dataclass(frozen=True)
class Mixture:
  """An exact training mixture for one arm of an experiment."""
  name: str
  target: int
  entries: tuple[MixtureEntry, ...]
  requested_total: int
  target_samples: int = 0        # target train samples deliberately added (Fig. 6); 0 everywhere else

  def __post_init__(self):
    seen = set()
    for e in self.entries:
      if (e.subset, e.split) in seen:
        raise ValueError(f"mixture {self.name}: subset {e.subset:02d} split {e.split} listed twice")
      seen.add((e.subset, e.split))
      if e.n_samples <= 0:
        raise ValueError(f"mixture {self.name}: subset {e.subset:02d} has n_samples={e.n_samples}")
      if e.subset == self.target and e.split != "train":
        raise AssertionError(f"mixture {self.name}: target {self.target:02d} {e.split} data in a training mixture")
    from_target = sum(e.n_samples for e in self.entries if e.subset == self.target)
    if from_target != self.target_samples:
      raise AssertionError(f"mixture {self.name}: {from_target} samples of the target {self.target:02d} "
                           f"in a training mixture (declared target_samples={self.target_samples})")

  @property
  def total(self) -> int:
    return sum(e.n_samples for e in self.entries)

  @property
  def shortfall(self) -> int:
    """How many of the requested samples the pool could not supply under the cap."""
    return max(0, self.requested_total - self.total)

  @property
  def subsets(self) -> tuple[int, ...]:
    return tuple(e.subset for e in self.entries)

  def as_list(self) -> list[tuple[int, str, int]]:
    """[(subset, split, n_samples), ...], the form the input pipeline takes."""
    return [(e.subset, e.split, e.n_samples) for e in self.entries]

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "target": self.target, "requested_total": self.requested_total,
            "total": self.total, "target_samples": self.target_samples,
            "entries": [dataclasses.asdict(e) for e in self.entries]}

  def describe(self) -> str:
    parts = ", ".join(f"{e.subset:02d}:{e.n_samples}" for e in self.entries)
    short = f" (short by {self.shortfall})" if self.shortfall else ""
    return f"{self.name} -> {self.target:02d}: {self.total} samples{short} [{parts}]"


Counts = Mapping[Any, int] | Any


def available(counts: Counts, subset, split: str = "train") -> int:
  """Samples a subset's split holds: `counts.count(subset, split)` (a Manifest) or `counts[subset]`.

  Dict keys may be ids (3), names ("Subset--03", "03") or (id, split) tuples; a missing subset has 0.
  """
  sid = mat.get(subset).id
  if hasattr(counts, "count") and not isinstance(counts, Mapping):
    try:
      return int(counts.count(sid, split))
    except KeyError:
      return 0
  if not isinstance(counts, Mapping):
    raise TypeError(f"counts must be a mapping or have .count(subset, split), got {type(counts).__name__}")
  for key, value in counts.items():
    if isinstance(key, tuple):
      if len(key) == 2 and mat.get(key[0]).id == sid and key[1] == split:
        return int(value)
    elif split == "train" and mat.get(key).id == sid:
      return int(value)
  return 0


def _scaled(value: int, scale: float) -> int:
  if scale <= 0:
    raise ValueError(f"scale must be positive, got {scale}")
  return max(1, int(round(value * scale)))


def even_split(capacities: Mapping[int, int], total: int) -> dict[int, int]:
  """Splits `total` over subsets as evenly as their capacities allow (water-filling).

  Subsets that cannot reach the even share give all they have; the rest share what is left, and the
  remainder of an uneven division goes to the lowest ids. Returns {subset: n} with n > 0 only; the sum
  is min(total, sum of capacities).
  """
  if total < 0:
    raise ValueError(f"total must be >= 0, got {total}")
  items = sorted(((c, s) for s, c in capacities.items() if c > 0))
  alloc, remaining = {}, total
  while items:
    share = remaining // len(items)
    small = [(c, s) for c, s in items if c <= share]
    if not small:
      break
    for c, s in small:
      alloc[s] = c
      remaining -= c
    items = [(c, s) for c, s in items if c > share]
  if items:
    base, extra = divmod(remaining, len(items))
    for i, s in enumerate(sorted(s for _, s in items)):
      alloc[s] = base + (1 if i < extra else 0)
  return {s: n for s, n in sorted(alloc.items()) if n > 0}


def _pool_mixture(name, target, pool, counts, total, cap, allow_shortfall) -> Mixture:
  t = mat.get(target)
  if t.id in pool:
    raise AssertionError(f"mixture {name}: the target {t.id:02d} is in its own training pool")
  caps = {s: min(available(counts, s), cap) for s in pool}
  alloc = even_split(caps, total)
  mixture = Mixture(name, t.id, tuple(MixtureEntry(s, "train", n) for s, n in alloc.items()), total)
  if mixture.shortfall:
    msg = (f"mixture {name} for target {t.id:02d}: pool {pool} holds only {mixture.total} of the "
           f"{total} requested samples under the per-subset cap {cap}")
    if not allow_shortfall:
      raise ValueError(msg + " (pass allow_shortfall=True to train on fewer)")
    logging.warning(msg)
  return mixture


def combination_mixture(combo: Combination, counts: Counts, per_subset_cap: int = PER_SUBSET_CAP,
                        total: int | None = None, scale: float = 1.0) -> Mixture:
  """The "Trained" arm: every subset of the combination, up to the cap (or `total` split evenly)."""
  cap = _scaled(per_subset_cap, scale)
  name = f"related[{'+'.join(f'{s:02d}' for s in combo.train)}]"
  for s in combo.train:
    if available(counts, s) == 0:
      raise ValueError(f"{name}: training subset {s:02d} has no train samples in the given counts")
  if total is None:
    caps = {s: min(available(counts, s), cap) for s in combo.train}
    return Mixture(name, combo.target, tuple(MixtureEntry(s, "train", n) for s, n in caps.items()), sum(caps.values()))
  return _pool_mixture(name, combo.target, list(combo.train), counts, _scaled(total, scale) if total else 0,
                       cap, allow_shortfall=False)


def baseline_plus_mixture(combo_or_target, counts: Counts, total: int, per_subset_cap: int = PER_SUBSET_CAP,
                          statuses=("ID",), allow_shortfall: bool = False) -> Mixture:
  """Baseline+: `total` samples (the related arm's total) drawn evenly from the unrelated pool."""
  target = combo_or_target.target if isinstance(combo_or_target, Combination) else mat.get(combo_or_target).id
  pool = unrelated_pool(target, statuses)
  return _pool_mixture("unrelated", target, pool, counts, total, per_subset_cap, allow_shortfall)


def cg_mixtures(combo: Combination, counts: Counts, per_subset_cap: int = PER_SUBSET_CAP,
                total: int | None = None, scale: float = 1.0) -> dict[str, Mixture]:
  """The trained arms of one CG experiment: {"related": ..., "baseline_plus": ... of the same size}.

  The untrained Baseline has no mixture.
  """
  related = combination_mixture(combo, counts, per_subset_cap, total, scale)
  plus = baseline_plus_mixture(combo, counts, related.total, _scaled(per_subset_cap, scale))
  return {"related": related, "baseline_plus": plus}


def scaling_mixture(target, setting: str, counts: Counts, total: int = SCALING_TOTAL,
                    per_subset_cap: int = PER_SUBSET_CAP, scale: float = 1.0, statuses=("ID",),
                    allow_shortfall: bool = True) -> Mixture:
  """A Fig. 4 setting: `total` samples (15,000) split evenly over the setting's pool under the cap.

  Some settings cannot reach the total under the cap with the registry's pools (e.g. w/o Task for 03
  keeps two ID subsets): the mixture is then smaller, `Mixture.shortfall` says by how much and a
  warning is logged; `allow_shortfall=False` raises instead.
  """
  pool = scaling_pool(target, setting, statuses)
  if not pool:
    raise ValueError(f"scaling setting {setting!r} for target {mat.get(target).id:02d} has an empty pool")
  return _pool_mixture(setting, target, pool, counts, _scaled(total, scale), _scaled(per_subset_cap, scale),
                       allow_shortfall)


def multitask_mixture(counts: Counts, per_subset_cap: int = PER_SUBSET_CAP, scale: float = 1.0,
                      subsets: Iterable[int] | None = None) -> list[tuple[int, str, int]]:
  """Tables 1-2 multi-task training: every ID subset up to the cap, as [(subset, "train", n)].

  No target is held out here: multi-task training tests on the subsets it trained on (ID) and on the
  OOD subsets, which have no training data in the paper.
  """
  cap = _scaled(per_subset_cap, scale)
  ids = mat.ID_SUBSETS if subsets is None else tuple(mat.get(s).id for s in subsets)
  return [(s, "train", min(available(counts, s), cap)) for s in ids if available(counts, s) > 0]


def add_target_samples(mixture: Mixture, counts: Counts, n: int) -> Mixture:
  """Fig. 6: the same mixture plus `n` training samples of the target itself, declared as such."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  if mixture.target_samples:
    raise ValueError(f"mixture {mixture.name} already holds {mixture.target_samples} target samples")
  have = available(counts, mixture.target)
  if n > have:
    raise ValueError(f"target {mixture.target:02d} has {have} train samples, {n} requested")
  if n == 0:
    return mixture
  entries = mixture.entries + (MixtureEntry(mixture.target, "train", n),)
  return Mixture(f"{mixture.name}+target{n}", mixture.target, entries, mixture.requested_total + n, n)


def release_counts(per_id_subset: int = PER_SUBSET_CAP, ood_train: int = 0) -> dict[int, int]:
  """Train counts shaped like the real release: every ID subset at the cap, OOD subsets at `ood_train`.

  The release's OOD train sizes are not published (some have a few hundred samples); pass a guess.
  """
  out = {s: per_id_subset for s in mat.ID_SUBSETS}
  out.update({s: ood_train for s in mat.OOD_SUBSETS})
  return out
