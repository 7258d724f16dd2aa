"""Tiny Med-MAT release roots in both schemas (16-24 px PNGs) for the reader and converter tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

LETTERS = "ABCD"
INSTRUCTION = "Answer with the option's letter from the given choices directly."

# subset -> (question, label set). 05: 2 options, 17: 3 options, 02: 4 options, 15: multi-label.
SCHEMA_A = {
    5: ("Please analyze this brain CT scan and determine if there is a hemorrhage.", ["Normal", "Hemorrhage"]),
    17: ("Assess the quality of this retinal image.", ["Outlier", "Good", "Bad"]),
    2: ("Review this kidney CT scan and determine the possible condition it represents.",
        ["Stone", "Cyst", "Normal", "Tumor"]),
    15: ("List the eye diseases in this fundus image, separating multiple conditions with commas.",
         ["Normal", "Glaucoma", "Cataract, Glaucoma", "Myopia"]),
}
SCHEMA_B = {
    34: ("You are looking at a fundus image. Please determine the Diabetic Retinopathy level.",
         ["No diabetic retinopathy signs", "Moderate non-proliferative diabetic retinopathy",
          "Very severe non-proliferative diabetic retinopathy", "Advanced diabetic retinopathy"]),
}


def write_png(path: Path, rng: random.Random, size=(24, 20)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
  img.putpixel((1, 1), (255, 0, 0))
  img.save(path)


def question_choice(question: str, options: list[str]) -> str:
  lines = [f"{LETTERS[i]}: {opt}" for i, opt in enumerate(options)]
  return "\n".join([question, *lines, INSTRUCTION])


def schema_a_records(root: Path, subset: int, split: str, n: int, rng: random.Random) -> list[dict]:
  question, labels = SCHEMA_A[subset]
  out = []
  for i in range(n):
    caption = labels[i % len(labels)]
    options = list(labels)
    rng.shuffle(options)
    image = f"med-mat/Fixture_{subset:02d}/{split}/{caption.replace(', ', '_')}/{i}.png"
    write_png(root / image, rng)
    out.append({"id": i + 1, "caption": caption, "image": image, "Question": question, "Answer": caption,
                "Question-choice": question_choice(question, options),
                "Answer-choice": LETTERS[options.index(caption)], "data-no": "7"})
  return out


def schema_b_records(root: Path, subset: int, split: str, n: int, rng: random.Random) -> list[dict]:
  question, labels = SCHEMA_B[subset]
  out = []
  for i in range(n):
    caption = labels[i % len(labels)]
    options = list(labels)
    rng.shuffle(options)
    name = f"Subset-{subset}-{split}--{i + 1}.png"
    write_png(root / "images" / name, rng)
    out.append({"id": f"Subset-{subset}-{split}--{i + 1}", "image": f"/mnt/cluster/Med-MAT/images/{name}",
                "question": question, "choices": {LETTERS[k]: o for k, o in enumerate(options)},
                "caption": caption})
  return out


def schema_a_path(root: Path, subset: int, split: str) -> Path:
  return root / "Aggregated_Subsets" / f"Subset--{subset:02d}-{split}.json"


def schema_b_path(root: Path, subset: int, split: str) -> Path:
  return root / f"Subset-{subset:02d}-{split}.json"


def write_json(path: Path, records) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(records, indent=1))
  return path


def make_release(root: Path, n_train: int = 6, n_test: int = 4, seed: int = 0,
                 schema_a=tuple(SCHEMA_A), schema_b=tuple(SCHEMA_B)) -> dict[tuple[int, str], int]:
  """Writes a small release root; returns {(subset, split): record count}."""
  rng = random.Random(seed)
  counts = {}
  for split, n in (("train", n_train), ("test", n_test)):
    for subset in schema_a:
      write_json(schema_a_path(root, subset, split), schema_a_records(root, subset, split, n, rng))
      counts[(subset, split)] = n
    for subset in schema_b:
      write_json(schema_b_path(root, subset, split), schema_b_records(root, subset, split, n, rng))
      counts[(subset, split)] = n
  return counts
