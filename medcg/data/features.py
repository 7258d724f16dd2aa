"""The shard record: one `tf.train.Example` per Med-MAT sample, parsed without TensorFlow.

The keys and types are the contract in DEVELOPING.md ("Shard records"). The tfds builder
(`tfds_builder.py`) writes them; the grain pipeline reads them through `parse_example`, which uses
`medcg.data.example_proto` (the Example schema built at import), so the training and evaluation path
imports neither TensorFlow nor tensorflow_datasets.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from medcg import mat
from medcg.data import example_proto
from medcg.eval import detection

# Keys by proto list kind; `options` is the one variable-length field (2-4 option texts, none for detection).
TEXT_KEYS = ("sample_id", "split", "modality", "area", "task", "question", "answer", "caption", "data_no")
INT_KEYS = ("subset",)
BYTES_KEYS = ("image",)
LIST_KEYS = ("options",)
FEATURE_KEYS = BYTES_KEYS + INT_KEYS + TEXT_KEYS + LIST_KEYS
LETTERS = ("A", "B", "C", "D")


class RecordError(ValueError):
  """A serialized record that does not hold a valid Med-MAT example."""


def _one(feature, key: str, kind: str, where: str):
  values = getattr(feature, kind).value
  if len(values) != 1:
    raise RecordError(f"{where}: key {key!r} holds {len(values)} values, expected exactly 1")
  return values[0]


def parse_example(raw: bytes, where: str = "record") -> dict[str, Any]:
  """Decodes one serialized `tf.train.Example` into python values (TF-free).

  Returns a dict with `image` (PNG bytes), `subset` (int), `options` (list of str, letter order
  A..D) and every other key of the contract as str. `where` names the record in error messages
  (e.g. "shard med_mat-train.tfrecord-00000-of-00001 record 17").

  Checked per the subset's kind: classification records hold 2-4 options and a letter among them;
  detection records (38-50) hold no options and an answer that is exactly one well-formed box.
  """
  example = example_proto.Example()
  try:
    example.ParseFromString(raw)
  except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass.
    raise RecordError(f"{where}: not a serialized tf.train.Example ({e})") from e
  feats = example.features.feature
  missing = [k for k in FEATURE_KEYS if k not in feats]
  if missing:
    raise RecordError(f"{where}: missing keys {missing}; has {sorted(feats)}")
  out: dict[str, Any] = {}
  for key in BYTES_KEYS:
    out[key] = _one(feats[key], key, "bytes_list", where)
  for key in INT_KEYS:
    out[key] = int(_one(feats[key], key, "int64_list", where))
  for key in TEXT_KEYS:
    out[key] = _one(feats[key], key, "bytes_list", where).decode("utf-8")
  options = [v.decode("utf-8") for v in feats["options"].bytes_list.value]
  try:
    status = mat.get(out["subset"]).status
  except KeyError as e:
    raise RecordError(f"{where}: key 'subset': {e.args[0]}") from None
  if status == "det":
    if options:
      raise RecordError(f"{where}: detection subset {out['subset']:02d} record holds {len(options)} options, "
                        "expected none")
    boxes = detection.parse_boxes(out["answer"])
    if len(boxes) != 1:
      raise RecordError(f"{where}: detection answer {out['answer']!r} holds {len(boxes)} well-formed boxes, "
                        "expected exactly one '[x1, y1, x2, y2]' (0-1)")
  elif status == "seg":
    raise RecordError(f"{where}: subset {out['subset']:02d} is a segmentation subset; records hold "
                      "classification or detection samples only")
  else:
    if not 2 <= len(options) <= 4:
      raise RecordError(f"{where}: key 'options' holds {len(options)} options, expected 2 to 4")
    if out["answer"] not in LETTERS[:len(options)]:
      raise RecordError(f"{where}: answer {out['answer']!r} is not one of the {len(options)} option letters")
  out["options"] = options
  return out


def is_detection(example: dict[str, Any]) -> bool:
  """Whether a parsed record is a detection sample (no options; the answer is a box)."""
  return not example["options"]


def decode_image(png: bytes) -> np.ndarray:
  """Decodes the stored image bytes to a uint8 (H, W, 3) RGB array with Pillow."""
  with Image.open(io.BytesIO(png)) as img:
    return np.asarray(img.convert("RGB"))


def answer_index(example: dict[str, Any]) -> int:
  """The 0-based index of the correct option (A -> 0); -1 for a detection record (no options)."""
  if is_detection(example):
    return -1
  return LETTERS.index(example["answer"])
