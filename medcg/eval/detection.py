"""Boxes as text, IoU and cumulative IoU (cIoU) for the detection subsets.

Box text. medcg's detection answers (SynthMAT subsets 38-50) write one tight box per object as
`format_box(box)`: "[x1, y1, x2, y2]" with corners normalised to 0-1 by the image width and height,
three decimals, (x1, y1) the top-left and (x2, y2) the bottom-right corner, e.g. "[0.125, 0.300, 0.610, 0.875]".
`parse_boxes` also reads the forms other models produce:
  * "[x1, y1, x2, y2]" or "(x1, y1, x2, y2)" with 0-1 decimals, or with integers on a 0-100 grid
    (MiniGPT-v2 / Qwen-style integers); a box whose numbers all lie in [0, 1] and include a decimal point
    is 0-1, otherwise the numbers must lie in [0, 100] and are divided by 100;
  * MiniGPT-v2 "{<x1><y1><x2><y2>}" (integers 0-100).
A box with x2 <= x1 or y2 <= y1, or numbers out of range, is malformed: not a box.

Scores. IoU per sample; cIoU = sum of intersections / sum of unions over the evaluated samples (the
cumulative IoU of referring-expression benchmarks, used by MiniGPT-v2 and by Med-MAT §6). Areas are in
normalised units unless `image_size` (width, height) is given per sample, in which case they are pixels,
so big images weigh more, as in the pixel-level definition. An unparsable answer is counted and scored
as an empty prediction: intersection 0, union = the ground-truth area.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

Box = tuple[float, float, float, float]

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BRACKET = re.compile(r"[\[(]" + ",".join([_NUM] * 4) + r"[\])]")
_MINIGPT = re.compile(r"\{\s*" + "".join([r"<\s*(-?\d+)\s*>"] * 4) + r"\s*\}")


def format_box(box: Sequence[float]) -> str:
  """The canonical answer text for a 0-1 normalised box: "[0.125, 0.300, 0.610, 0.875]"."""
  box = _check(tuple(float(v) for v in box), "box")
  return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def _check(box: Box, where: str) -> Box:
  if len(box) != 4:
    raise ValueError(f"{where}: a box has 4 numbers, got {box}")
  x1, y1, x2, y2 = box
  if not all(0.0 <= v <= 1.0 for v in box):
    raise ValueError(f"{where}: box {box} is not normalised to [0, 1]")
  if x2 <= x1 or y2 <= y1:
    raise ValueError(f"{where}: box {box} has x2 <= x1 or y2 <= y1")
  return box


def _valid(box: Box) -> bool:
  x1, y1, x2, y2 = box
  return all(0.0 <= v <= 1.0 for v in box) and x2 > x1 and y2 > y1


def parse_boxes(text: str) -> list[Box]:
  """Every well-formed box in `text`, in order of appearance, normalised to 0-1 (see module docstring)."""
  found = []
  for m in _BRACKET.finditer(text):
    raw = m.groups()
    values = [float(v) for v in raw]
    if all(0.0 <= v <= 1.0 for v in values) and any("." in v for v in raw):
      box = tuple(values)
    elif all(0.0 <= v <= 100.0 for v in values):
      box = tuple(v / 100.0 for v in values)
    else:
      continue
    found.append((m.start(), box))
  for m in _MINIGPT.finditer(text):
    values = [int(v) for v in m.groups()]
    if all(0 <= v <= 100 for v in values):
      found.append((m.start(), tuple(v / 100.0 for v in values)))
  return [box for _, box in sorted(found) if _valid(box)]


def parse_box(text: str) -> Box | None:
  """The first well-formed box in `text`, or None."""
  boxes = parse_boxes(text)
  return boxes[0] if boxes else None


def area(box: Box | None) -> float:
  if box is None:
    return 0.0
  return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersection(a: Box | None, b: Box | None) -> float:
  if a is None or b is None:
    return 0.0
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  return max(0.0, w) * max(0.0, h)


def iou(a: Box | None, b: Box | None) -> float:
  """Intersection over union of two boxes (0 when either is None or the union is empty)."""
  inter = intersection(a, b)
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class DetectionRecord:
  sample_id: str
  subset: int
  output: str
  target: Box                       # ground truth, 0-1 normalised
  image_size: tuple[int, int] | None = None   # (width, height) to weigh cIoU by pixels


def score(records: Iterable[DetectionRecord], iou_threshold: float = 0.5) -> dict:
  """cIoU, mean IoU, accuracy at `iou_threshold` and the unparsed count over `records`.

  Returns {"n", "unparsed", "unparsed_rate", "ciou", "mean_iou", "acc_at_iou", "iou_threshold",
  "per_sample": {sample_id: {"box", "iou"}}}.
  """
  inter_sum = union_sum = iou_sum = 0.0
  hits = unparsed = n = 0
  per_sample = {}
  for r in sorted(records, key=lambda r: r.sample_id):
    if r.sample_id in per_sample:
      raise ValueError(f"detection sample {r.sample_id!r} scored twice")
    gt = _check(tuple(float(v) for v in r.target), f"sample {r.sample_id} target")
    pred = parse_box(r.output)
    scale = 1.0
    if r.image_size is not None:
      w, h = r.image_size
      if w <= 0 or h <= 0:
        raise ValueError(f"sample {r.sample_id}: image_size {r.image_size} must be positive")
      scale = float(w * h)
    inter = intersection(pred, gt)
    union = area(pred) + area(gt) - inter
    inter_sum += scale * inter
    union_sum += scale * union
    value = inter / union if union > 0 else 0.0
    iou_sum += value
    hits += int(value >= iou_threshold)
    unparsed += int(pred is None)
    n += 1
    per_sample[r.sample_id] = {"box": None if pred is None else list(pred), "iou": value}
  return {"n": n, "unparsed": unparsed, "unparsed_rate": unparsed / n if n else 0.0,
          "ciou": inter_sum / union_sum if union_sum > 0 else 0.0,
          "mean_iou": iou_sum / n if n else 0.0, "acc_at_iou": hits / n if n else 0.0,
          "iou_threshold": iou_threshold, "per_sample": per_sample}


def score_by_subset(records: Sequence[DetectionRecord], iou_threshold: float = 0.5) -> dict[str, dict]:
  """`score` per subset ("38", "39", ...), plus "all"."""
  out = {"all": score(records, iou_threshold)}
  for sid in sorted({r.subset for r in records}):
    out[f"{sid:02d}"] = score([r for r in records if r.subset == sid], iou_threshold)
  return out
