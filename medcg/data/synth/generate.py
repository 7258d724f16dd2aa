"""SynthMAT: a synthetic Med-MAT written in the release's own layout and schema A.

Real Med-MAT images come from ~100 sources that cannot be fetched here, so tests and the default demo
use SynthMAT. `write_synthmat` writes, for every classification subset 01-37 (and for the detection
subsets 38-50 when asked: `subsets=` naming them, or `detection=True`),
  Aggregated_Subsets/Subset--NN-train.json and Subset--NN-test.json   (schema A, reference/medmat.md §1.2)
  med-mat/SynthMAT/Subset--NN/<split>/<id:06d>.png
so the reader, converter and pipeline exercise exactly the code real data goes through. Images are
compositional by construction (see `imaging`): modality -> image formation, area -> anatomy and
finding sites, task -> what the label changes.

A detection record has no options: `Question-choice` is the question itself (it asks for the box as
"[x1, y1, x2, y2]"), `Answer-choice` and `Answer` are the object's tight box (`detection.format_box`,
0-1 normalised) and `caption` names the object ("polyp"), so label histograms stay meaningful.

Every sample draws from its own generator seeded by (seed, subset, split, index), so a subset can be
generated alone or in parallel and gives byte-identical JSON and PNGs for the same seed.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medcg import mat
from medcg.data.synth.imaging import render, render_detection
from medcg.data.synth.spec import DET_LABELS, DET_TEMPLATES, LABELS, TEMPLATES
from medcg.eval import detection

__all__ = ["LABELS", "TEMPLATES", "DET_LABELS", "DET_TEMPLATES", "render", "render_detection", "write_synthmat",
           "samples", "split_labels", "SPLITS"]

SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
DATASET_DIR = "med-mat/SynthMAT"


def _labels(subset_id: int) -> tuple[str, ...]:
  return LABELS[subset_id] if subset_id in LABELS else DET_LABELS[subset_id]


def _subset_ids(subsets: Iterable[int | str] | None, detection_too: bool = False) -> list[int]:
  if subsets is None:
    return sorted(LABELS) + (sorted(DET_LABELS) if detection_too else [])
  out = [] if not detection_too else sorted(DET_LABELS)
  for s in subsets:
    sid = mat.get(s).id
    if sid not in LABELS and sid not in DET_LABELS:
      raise ValueError(f"SynthMAT generates classification subsets 01-37 and detection subsets 38-50, got {s!r}")
    out.append(sid)
  return sorted(set(out))


def split_labels(subset_id: int, split: str, count: int, seed: int) -> list[str]:
  """The label of every sample of a split, as balanced as the count allows, in a seeded order.

  `count` is rounded down to a multiple of the label count for the test split (strictly balanced,
  as the paper's test sets are) and kept as is for train (balanced up to one sample per label).
  """
  labels = _labels(subset_id)
  if split == "test":
    count = count // len(labels) * len(labels)
  rng = np.random.default_rng([seed, subset_id, _SPLIT_CODE[split]])
  order = rng.permutation(count)
  return [labels[i % len(labels)] for i in order]


def _question_choice(question: str, options: list[str]) -> str:
  lines = [f"{LETTERS[i]}: {opt}" for i, opt in enumerate(options)]
  return "\n".join([question, *lines, ANSWER_INSTRUCTION])


def make_record(subset_id: int, split: str, index: int, label: str, rng: np.random.Generator) -> dict:
  """The schema-A record of sample `index` (1-based): question template, 2-4 shuffled options, letter."""
  s = mat.get(subset_id)
  labels = LABELS[subset_id]
  others = [lab for lab in labels if lab != label]
  n_options = min(4, len(labels))
  options = [label] + [others[i] for i in rng.choice(len(others), n_options - 1, replace=False)]
  options = [options[i] for i in rng.permutation(n_options)]
  question = TEMPLATES[subset_id][int(rng.integers(len(TEMPLATES[subset_id])))]
  return {
      "id": index,
      "caption": label,
      "image": f"{DATASET_DIR}/{s.name}/{split}/{index:06d}.png",
      "Question": question,
      "Answer": label,
      "Question-choice": _question_choice(question, options),
      "Answer-choice": LETTERS[options.index(label)],
      "data-no": str(s.sources[int(rng.integers(len(s.sources)))]),
  }


def make_detection_record(subset_id: int, split: str, index: int, box, rng: np.random.Generator) -> dict:
  """The schema-A record of detection sample `index` (1-based): a box question, no options, the box text."""
  s = mat.get(subset_id)
  question = DET_TEMPLATES[subset_id][int(rng.integers(len(DET_TEMPLATES[subset_id])))]
  answer = detection.format_box(box)
  return {
      "id": index,
      "caption": DET_LABELS[subset_id][0],
      "image": f"{DATASET_DIR}/{s.name}/{split}/{index:06d}.png",
      "Question": question,
      "Answer": answer,
      "Question-choice": question,
      "Answer-choice": answer,
      "data-no": str(s.sources[int(rng.integers(len(s.sources)))]),
  }


def samples(subset_id: int, split: str, count: int, *, seed: int = 0, image_size: int = 64
            ) -> Iterator[tuple[dict, np.ndarray]]:
  """Yields (schema-A record, uint8 image) for one subset and split, in id order."""
  if split not in _SPLIT_CODE:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  for i, label in enumerate(split_labels(subset_id, split, count, seed)):
    rng = np.random.default_rng([seed, subset_id, _SPLIT_CODE[split], i])
    if subset_id in DET_LABELS:  # the box comes from the drawing, so draw first
      image, box = render_detection(subset_id, rng, image_size)
      yield make_detection_record(subset_id, split, i + 1, box, rng), image
      continue
    record = make_record(subset_id, split, i + 1, label, rng)
    yield record, render(subset_id, label, rng, image_size)


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _remove_stale(image_dir: Path, keep: set[str]) -> None:
  """Drops images of an earlier, larger run and temp files of an interrupted one (SynthMAT's own folder)."""
  for p in image_dir.iterdir():
    if p.name not in keep and (p.suffix == ".png" or ".tmp" in p.name):
      p.unlink()


def _png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _write_subset(root: Path, sid: int, counts: dict[str, int], seed: int, image_size: int,
                  on_image=None) -> dict:
  """Writes one subset's images and JSON files; returns its per-split counts and label histograms."""
  name = mat.get(sid).name
  per_split = {}
  for split, count in counts.items():
    image_dir = root / DATASET_DIR / name / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for record, image in samples(sid, split, count, seed=seed, image_size=image_size):
      _atomic_write(root / record["image"], _png_bytes(image))
      records.append(record)
      if on_image is not None:
        on_image()
    text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(root / "Aggregated_Subsets" / f"{name}-{split}.json", text.encode("utf-8"))
    _remove_stale(image_dir, {Path(r["image"]).name for r in records})
    hist = {lab: 0 for lab in _labels(sid)}
    for r in records:
      hist[r["caption"]] += 1
    per_split[split] = {"count": len(records), "labels": hist}
  return {"triplet": list(mat.get(sid).triplet), **per_split}


def write_synthmat(out_dir: str | os.PathLike, *, image_size: int = 64, per_subset: int = 300,
                   test_per_subset: int = 60, seed: int = 0, subsets: Iterable[int | str] | None = None,
                   progress: bool = True, workers: int = 1, detection: bool = False) -> dict:
  """Writes SynthMAT in the Med-MAT release layout and returns a summary.

  Args:
    out_dir: the release root; gets `Aggregated_Subsets/` and `med-mat/SynthMAT/`.
    image_size: square image side in pixels (32 for tests, 64-336 for experiments).
    per_subset: train samples per subset (label-balanced up to one sample).
    test_per_subset: test samples per subset, rounded down to a multiple of the label count so the
      test split is strictly label-balanced (at least one per label when > 0).
    seed: same seed -> byte-identical JSON and PNGs (non-negative).
    subsets: subset ids (default: all classification subsets 01-37); detection ids 38-50 are allowed.
    progress: show a tqdm bar.
    workers: processes generating subsets in parallel; the output does not depend on it.
    detection: also write every detection subset 38-50 (one object per image, its box as the answer).

  Images are written first (temp name + rename), each subset's JSON last, also atomically: a JSON file
  that exists always describes images that exist. Re-running overwrites cleanly and removes images a
  previous run left beyond the new counts.
  """
  if per_subset < 0 or test_per_subset < 0:
    raise ValueError(f"per_subset and test_per_subset must be >= 0, got {per_subset}, {test_per_subset}")
  if seed < 0 or workers < 1:
    raise ValueError(f"seed must be >= 0 and workers >= 1, got seed={seed}, workers={workers}")
  ids = _subset_ids(subsets, detection)
  root = Path(out_dir)
  counts = {sid: {"train": per_subset,
                  "test": max(test_per_subset, len(_labels(sid))) if test_per_subset else 0} for sid in ids}
  sizes = {sid: sum(len(split_labels(sid, sp, n, seed)) for sp, n in counts[sid].items()) for sid in ids}
  (root / "Aggregated_Subsets").mkdir(parents=True, exist_ok=True)
  summary = {"root": str(root), "image_size": image_size, "seed": seed, "subsets": {}, "num_images": 0}
  start = time.perf_counter()
  with tqdm(total=sum(sizes.values()), desc="SynthMAT", unit="img", disable=not progress) as bar:
    if workers == 1:
      results = {sid: _write_subset(root, sid, counts[sid], seed, image_size, lambda: bar.update(1))
                 for sid in ids}
    else:
      # Subsets are independent (per-sample seeds), so processes can split them; "spawn" avoids
      # forking a process that may already run threads (jax, BLAS).
      ctx = multiprocessing.get_context("spawn")
      results = {}
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(_write_subset, root, sid, counts[sid], seed, image_size): sid for sid in ids}
        for fut in concurrent.futures.as_completed(futures):
          results[futures[fut]] = fut.result()
          bar.update(sizes[futures[fut]])
  for sid in ids:
    summary["subsets"][mat.get(sid).name] = results[sid]
    summary["num_images"] += sum(results[sid][sp]["count"] for sp in counts[sid])
  summary["seconds"] = round(time.perf_counter() - start, 3)
  return summary
