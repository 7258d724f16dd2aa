"""Per-sample evaluation records -> accuracy by subset, triplet, MAT element and ID/OOD, written atomically.

Every number is a count first: `{"n", "correct", "accuracy"}` with accuracy = correct / n (a fraction;
reports print percent) and its 95 % Wilson `interval`; each subset also has, when the records say how many
options were offered, its `chance` accuracy. `outcomes` keeps each subset's per-sample 0/1 string, so two
runs on the same test samples can be compared sample by sample (`medcg.eval.stats.compare`). Overall accuracy is over samples (micro); `macro_subset` averages the subsets'
accuracies, which is how the paper's tables read. Aggregation sorts by key, so the result does not depend
on record order, and a duplicated `sample_id` is an error (an evaluation that saw a sample twice is wrong).
Unparsed answers are wrong and their rate is reported with the count of every parse stage.

Detection samples (subsets 38-50: the answer is a box) are scored apart from the accuracies above:
`results["detection"]` holds cIoU, mean IoU, accuracy at IoU 0.5, n and the parse-failure rate, overall
and per subset (`medcg.eval.detection.score`). Their records carry the parsed box and its IoU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from medcg import fileio
from medcg import mat
from medcg.fileio import atomic_write_text  # noqa: F401 (re-exported)
from medcg.eval import detection
from medcg.eval import mcq
from medcg.eval import stats

OPTIONAL_KEYS = ("box", "iou", "num_options")
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SampleRecord:
  """One evaluated sample. `parsed` is the predicted letter or None; `stage` how it was obtained.

  Detection samples: `parsed` is the canonical text of the first box in the output (None: no box),
  `box` its four numbers, `iou` its IoU with the ground truth `answer`, `correct` is IoU >= 0.5.
  """
  sample_id: str
  subset: int
  triplet: tuple[str, str, str]
  prompt: str
  output: str
  parsed: str | None
  stage: str
  correct: bool
  answer: str
  box: tuple[float, float, float, float] | None = None
  iou: float | None = None
  num_options: int | None = None   # options offered (chance is 1 / num_options); None in older records

  @property
  def is_detection(self) -> bool:
    return mat.get(self.subset).status == "det"

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "record") -> "SampleRecord":
    """Validates a dict (e.g. one JSONL line); errors name `where` and the key at fault."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.name not in OPTIONAL_KEYS]
    if missing:
      raise ValueError(f"{where}: missing keys {missing}")
    triplet = tuple(d["triplet"])
    if len(triplet) != 3 or not all(isinstance(x, str) for x in triplet):
      raise ValueError(f"{where}: 'triplet' must be three strings, got {d['triplet']!r}")
    try:
      subset = mat.get(d["subset"]).id
    except KeyError as e:
      raise ValueError(f"{where}: 'subset': {e}") from None
    if not isinstance(d["correct"], bool):
      raise ValueError(f"{where}: 'correct' must be a bool, got {d['correct']!r}")
    box, iou = d.get("box"), d.get("iou")
    if box is not None and (not isinstance(box, (list, tuple)) or len(box) != 4):
      raise ValueError(f"{where}: 'box' must be null or 4 numbers, got {box!r}")
    if mat.get(subset).status == "det" and iou is None:
      raise ValueError(f"{where}: detection sample (subset {subset:02d}) without 'iou'")
    num_options = d.get("num_options")
    if num_options is not None and (not isinstance(num_options, int) or num_options < 1):
      raise ValueError(f"{where}: 'num_options' must be a positive integer, got {num_options!r}")
    return cls(str(d["sample_id"]), subset, triplet, str(d["prompt"]), str(d["output"]),
               None if d["parsed"] is None else str(d["parsed"]), str(d["stage"]), d["correct"],
               str(d["answer"]), None if box is None else tuple(float(v) for v in box),
               None if iou is None else float(iou), num_options)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["triplet"] = list(self.triplet)
    if self.is_detection:
      d["box"] = None if self.box is None else list(self.box)
      del d["num_options"]
    else:  # classification rows keep their schema
      del d["box"], d["iou"]
      if self.num_options is None:
        del d["num_options"]
    return d


def score_generation(sample_id: str, subset: int | str, triplet: Sequence[str], prompt: str, output: str,
                     options: Sequence[str], answer: str) -> SampleRecord:
  """Parses a generated answer (`mcq.parse_answer`) and scores it against the answer letter."""
  letter, stage = mcq.parse_answer(output, options)
  answer = answer.strip().upper()
  if answer not in mcq.option_letters(options):
    raise ValueError(f"sample {sample_id}: answer {answer!r} is not one of the {len(options)} options")
  return SampleRecord(str(sample_id), mat.get(subset).id, tuple(triplet), prompt, output, letter, stage,
                      letter == answer, answer, num_options=len(options))


def score_choice(sample_id: str, subset: int | str, triplet: Sequence[str], prompt: str, index: int | None,
                 stage: str, options: Sequence[str], answer: str) -> SampleRecord:
  """Scores an option chosen by likelihood (`mcq.choose_by_loglik`); `index` None is a tie."""
  letters = mcq.option_letters(options)
  letter = None if index is None else letters[index]
  answer = answer.strip().upper()
  output = "" if letter is None else options[index]
  return SampleRecord(str(sample_id), mat.get(subset).id, tuple(triplet), prompt, output, letter, stage,
                      letter == answer, answer, num_options=len(options))


def score_detection(sample_id: str, subset: int | str, triplet: Sequence[str], prompt: str, output: str,
                    answer: str, iou_threshold: float = 0.5) -> SampleRecord:
  """Parses the first box of a generated answer and scores its IoU against the ground-truth box text."""
  target = detection.parse_box(answer)
  if target is None:
    raise ValueError(f"sample {sample_id}: ground-truth answer {answer!r} is not a box")
  box = detection.parse_box(output)
  value = detection.iou(box, target)
  return SampleRecord(str(sample_id), mat.get(subset).id, tuple(triplet), prompt, output,
                      None if box is None else detection.format_box(box), "box" if box else "unparsed",
                      value >= iou_threshold, answer, box, value)


def detection_summary(records: Sequence[SampleRecord], iou_threshold: float = 0.5) -> dict[str, Any]:
  """{"overall": {...}, "per_subset": {"39": {...}}} with ciou, mean_iou, acc_at_iou, n, parse_failure_rate."""
  def entry(scored: Mapping[str, Any]) -> dict[str, Any]:
    return {"n": scored["n"], "ciou": scored["ciou"], "mean_iou": scored["mean_iou"],
            "acc_at_iou": scored["acc_at_iou"], "unparsed": scored["unparsed"],
            "parse_failure_rate": scored["unparsed_rate"]}

  det = [detection.DetectionRecord(r.sample_id, r.subset, r.output, detection.parse_box(r.answer))
         for r in records]
  by = detection.score_by_subset(det, iou_threshold) if det else {}
  return {"iou_threshold": iou_threshold,
          "overall": entry(by["all"]) if det else entry(detection.score([], iou_threshold)),
          "per_subset": {k: {**entry(v), "triplet": list(mat.get(int(k)).triplet)}
                         for k, v in by.items() if k != "all"}}


def _acc(n: int, correct: int) -> dict[str, Any]:
  return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
          "interval": list(stats.wilson(correct, n))}


def _group(records: Sequence[SampleRecord], key) -> dict[str, dict[str, Any]]:
  counts: dict[str, list[int]] = {}
  for r in records:
    c = counts.setdefault(key(r), [0, 0])
    c[0] += 1
    c[1] += int(r.correct)
  return {k: _acc(*counts[k]) for k in sorted(counts)}


def outcomes(records: Sequence[SampleRecord]) -> dict[str, dict[str, str]]:
  """Per subset, every sample's 0/1 in sample-id order and a digest of the ids: what a paired test between
  two runs on the same test samples needs (`medcg.eval.stats.compare`), one character per sample."""
  return {key: {"ids_digest": stats.outcomes_digest([r.sample_id for r in rs]),
                "correct": "".join("1" if r.correct else "0" for r in rs)}
          for key, rs in _by_subset(records).items()}


def _by_subset(records: Sequence[SampleRecord]) -> dict[str, list[SampleRecord]]:
  """{"03": that subset's records in sample-id order}, keys sorted."""
  by: dict[str, list[SampleRecord]] = {}
  for r in sorted(records, key=lambda r: r.sample_id):
    by.setdefault(f"{r.subset:02d}", []).append(r)
  return dict(sorted(by.items()))


def triplet_key(triplet: Sequence[str]) -> str:
  """"CT|Lung|COVID": how triplets are keyed in results.json."""
  return "|".join(triplet)


def aggregate(records: Iterable[SampleRecord | Mapping[str, Any]]) -> dict[str, Any]:
  """The results dict of a set of records (see the module docstring)."""
  recs = []
  for i, r in enumerate(records):
    recs.append(r if isinstance(r, SampleRecord) else SampleRecord.from_dict(r, where=f"record {i}"))
  seen: dict[str, int] = {}
  for i, r in enumerate(recs):
    if r.sample_id in seen:
      raise ValueError(f"record {i}: sample_id {r.sample_id!r} already seen at record {seen[r.sample_id]}")
    seen[r.sample_id] = i
  recs.sort(key=lambda r: r.sample_id)
  det = [r for r in recs if r.is_detection]
  recs = [r for r in recs if not r.is_detection]   # accuracies are over classification samples
  per_subset = _group(recs, lambda r: f"{r.subset:02d}")
  by_subset = _by_subset(recs)
  for key, v in per_subset.items():
    s = mat.get(int(key))
    v["triplet"] = list(s.triplet)
    v["status"] = s.status
    offered = [r.num_options for r in by_subset[key]]
    if all(k is not None for k in offered):  # chance: the expected accuracy of a uniform guess
      v["chance"] = sum(1.0 / k for k in offered) / len(offered)
  stages = {}
  for r in recs:
    stages[r.stage] = stages.get(r.stage, 0) + 1
  n = len(recs)
  unparsed = sum(1 for r in recs if r.parsed is None)
  subset_accs = [v["accuracy"] for v in per_subset.values()]
  extra = {"detection": detection_summary(det)} if det else {}
  return {
      "schema_version": SCHEMA_VERSION,
      "overall": _acc(n, sum(int(r.correct) for r in recs)),
      "macro_subset": sum(subset_accs) / len(subset_accs) if subset_accs else 0.0,
      "per_subset": per_subset,
      "per_triplet": _group(recs, lambda r: triplet_key(r.triplet)),
      "per_element": {
          "modality": _group(recs, lambda r: r.triplet[0]),
          "area": _group(recs, lambda r: r.triplet[1]),
          "task": _group(recs, lambda r: r.triplet[2]),
      },
      "per_status": _group(recs, lambda r: mat.get(r.subset).status),
      "parse": {"stages": dict(sorted(stages.items())), "unparsed": unparsed,
                "failure_rate": unparsed / n if n else 0.0},
      "counts": {"samples": n, "subsets": len(per_subset)},
      "outcomes": outcomes(recs),
      **extra,
  }


def fingerprint(obj: Any) -> str:
  """A short sha256 of a JSON-able object (a resolved config, a checkpoint's metadata), key-order free."""
  blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def write_samples(path: str | os.PathLike, records: Iterable[SampleRecord]) -> None:
  """Per-sample JSONL, sorted by sample_id, written atomically."""
  lines = [json.dumps(r.to_dict(), ensure_ascii=False, sort_keys=True)
           for r in sorted(records, key=lambda r: r.sample_id)]
  atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_samples(path: str | os.PathLike) -> list[SampleRecord]:
  """Reads a samples JSONL; a bad line raises naming the file and line number."""
  return [SampleRecord.from_dict(d, where=f"{path}:{lineno}") for lineno, d in fileio.read_jsonl(path)]


def write_results(workdir: str | os.PathLike, records: Sequence[SampleRecord], config: Any = None,
                  checkpoint: Any = None, extra: Mapping[str, Any] | None = None,
                  config_fingerprint: str | None = None, checkpoint_fingerprint: str | None = None
                  ) -> dict[str, Any]:
  """Writes samples.jsonl and results.json into `workdir` and returns the results dict.

  `config` (the resolved config as a dict) and `checkpoint` (a path, step and/or metadata) are stored
  with their fingerprints so a table can say exactly which run and weights a number came from; pass a
  fingerprint explicitly (e.g. a hash of the checkpoint files) to use it instead of `fingerprint(...)`.
  """
  workdir = fileio.path(workdir)
  results = aggregate(records)
  results["config"] = config
  results["config_fingerprint"] = config_fingerprint or fingerprint(config)
  results["checkpoint"] = checkpoint
  results["checkpoint_fingerprint"] = checkpoint_fingerprint or fingerprint(checkpoint)
  if extra:
    results.update(extra)
  write_samples(workdir / SAMPLES_FILE, records)
  atomic_write_text(workdir / RESULTS_FILE, json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
  return results


def load_results(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a results.json (or the one inside a workdir)."""
  path = fileio.path(path)
  if path.is_dir():
    path = path / RESULTS_FILE
  try:
    results = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  for key in ("overall", "per_subset"):
    if key not in results:
      raise ValueError(f"{path}: missing key {key!r}; is this a medcg results.json?")
  return results


def subset_accuracy(results: Mapping[str, Any], subset: int | str) -> float | None:
  """A subset's accuracy (fraction) in a results dict, or None when it was not evaluated."""
  entry = results["per_subset"].get(f"{mat.get(subset).id:02d}")
  return None if entry is None else entry["accuracy"]
