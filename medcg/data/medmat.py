"""Reader for the released Med-MAT JSON files (both schemas) into one typed, validated record.

The release has two schemas (see ../shared/reference/medmat.md §1):

- Schema A, `Aggregated_Subsets/Subset--NN-<split>.json` (and the per-source-dataset files
  `Original_Medical_Datasets/ori--NN-<split>.json`): `id`, `caption`, `image` (relative to the root),
  `Question`, `Question-choice` (question + "\\nA: opt\\nB: opt..." + answer instruction),
  `Answer-choice` (the letter) and `data-no`.
- Schema B, root-level `Subset-NN-<split>.json` (the later "Accessable Datasets" upload): `id`,
  `image` (an absolute path on the authors' cluster ending in `images/<file>`), `question`,
  `choices` ({letter: text}) and `caption`, with no answer letter: the letter is the one option whose
  text equals the caption.

Detection subsets (38-50; SynthMAT writes them, the release does not) use schema A without options:
`Question-choice` is the question itself (no "A: ..." lines; it carries its own box instruction) and
`Answer-choice` is the object's box as text, "[x1, y1, x2, y2]" normalised 0-1 (`detection.format_box`);
`caption` names the object. Segmentation subsets (51-53) have no question-answer form and are refused.

Every sample is checked (classification: answer letter among the options, caption equals the answer's
text; detection: no options and exactly one well-formed box; image present and readable). Every
error names the file, the record index and the field. By default the first bad record raises
`MedMatError`; with `on_error="skip"` bad records are collected as `Skipped` entries (the converter
writes them into the manifest) and the rest are returned.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

from PIL import Image

from medcg import mat
from medcg.eval import detection
from medcg.errors import UserError

LETTERS = ("A", "B", "C", "D")
SPLITS = ("train", "test")
AGGREGATED_DIR = "Aggregated_Subsets"
ORIGINAL_DIR = "Original_Medical_Datasets"
SCHEMA_A_FIELDS = ("id", "caption", "image", "Question", "Question-choice", "Answer-choice", "data-no")
SCHEMA_B_FIELDS = ("id", "image", "question", "choices", "caption")

# File names of the release. Schema A uses a double hyphen, schema B a single one; the source-dataset
# files are spelled `ori--NN` on Hugging Face and `Ori--NN` on GitHub.
_SCHEMA_A_RE = re.compile(r"^Subset--(\d+)-([A-Za-z]+)\.json$")
_ORIGINAL_RE = re.compile(r"^[Oo]ri--(\d+)-([A-Za-z]+)\.json$")
_SCHEMA_B_RE = re.compile(r"^Subset-(\d+)-([A-Za-z]+)\.json$")
_OPTION_RE = re.compile(r"^([A-D]):\s?(.*)$")

OnError = Literal["fail", "skip"]


class MedMatError(UserError, ValueError):
  """A bad Med-MAT source file or record. `file`, `index` and `field` say where."""

  def __init__(self, file: str | os.PathLike, message: str, index: int | None = None,
               field: str | None = None):
    self.file, self.index, self.field, self.reason = os.fspath(file), index, field, message
    where = self.file
    if index is not None:
      where += f" [record {index}]"
    if field is not None:
      where += f" field {field!r}"
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Record:
  """One Med-MAT sample (multiple choice, or a detection box question), schema-independent."""
  sample_id: str
  subset: int
  split: str
  triplet: tuple[str, str, str]   # (modality, area, coarse CG task) from medcg.mat
  question: str                   # the instruction, without the options
  options: dict[str, str]         # letter -> option text, letters A.. in order, 2 to 4 (detection: none)
  answer: str                     # the correct letter (detection: the box text "[x1, y1, x2, y2]")
  caption: str                    # ground-truth text; multi-label answers stay comma-joined (detection: the object)
  image_path: str                 # absolute path of the image file
  data_no: str                    # source dataset number(s)
  source: str                     # the JSON file it came from
  index: int                      # 0-based position in that file

  @property
  def option_list(self) -> list[str]:
    """Option texts in letter order."""
    return [self.options[k] for k in LETTERS if k in self.options]


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A source record left out under `on_error="skip"`, and why."""
  file: str
  index: int | None
  field: str | None
  reason: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One JSON file of the release: which schema, which subset (or source dataset) and split."""
  path: str
  schema: Literal["A", "B"]
  kind: Literal["subset", "original"]
  number: int     # subset id (kind "subset") or source dataset number (kind "original")
  split: str


@dataclasses.dataclass
class ReadResult:
  """The valid records of a file plus the ones skipped (empty unless `on_error="skip"`)."""
  records: list[Record]
  skipped: list[Skipped]


def _classify(path: Path) -> SourceFile | None:
  for regex, schema, kind, folder in ((_SCHEMA_A_RE, "A", "subset", AGGREGATED_DIR),
                                      (_ORIGINAL_RE, "A", "original", ORIGINAL_DIR),
                                      (_SCHEMA_B_RE, "B", "subset", None)):
    m = regex.match(path.name)
    if m and (folder is None or path.parent.name == folder):
      number, split = int(m.group(1)), m.group(2)
      if split not in SPLITS:
        raise MedMatError(path, f"unknown split {split!r} in the file name; expected one of {SPLITS}")
      return SourceFile(str(path), schema, kind, number, split)
  return None


def discover(root: str | os.PathLike) -> list[SourceFile]:
  """All Med-MAT JSON files under a release root, in a stable order."""
  root = Path(root)
  if not root.is_dir():
    raise MedMatError(root, "Med-MAT root is not a directory")
  candidates = sorted(root.glob("Subset-*.json"))
  for folder in (AGGREGATED_DIR, ORIGINAL_DIR):
    candidates += sorted((root / folder).glob("*.json"))
  out = [sf for sf in (_classify(p) for p in candidates) if sf is not None]
  return out


def subset_files(root: str | os.PathLike, prefer: Iterable[str] = ("A", "B")
                 ) -> dict[int, dict[str, SourceFile]]:
  """Per subset id and split, the file to read. Where both schemas exist, the first of `prefer` wins."""
  rank = {schema: i for i, schema in enumerate(prefer)}
  out: dict[int, dict[str, SourceFile]] = {}
  for sf in discover(root):
    if sf.kind != "subset" or sf.schema not in rank:
      continue
    try:
      mat.get(sf.number)
    except KeyError as e:
      raise MedMatError(sf.path, f"subset number {sf.number} is not in the registry ({e.args[0]})") from e
    current = out.setdefault(sf.number, {}).get(sf.split)
    if current is None or rank[sf.schema] < rank[current.schema]:
      out[sf.number][sf.split] = sf
  return dict(sorted(out.items()))


def _load_json(path: Path) -> list[Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise MedMatError(path, f"malformed JSON at line {e.lineno} col {e.colno}: {e.msg}") from e
  except UnicodeDecodeError as e:
    raise MedMatError(path, f"not UTF-8 text at byte {e.start}: {e.reason}") from e
  except OSError as e:
    raise MedMatError(path, f"cannot read file: {e.strerror}") from e
  if not isinstance(data, list):
    raise MedMatError(path, f"expected a JSON array of records, found {type(data).__name__}")
  return data


def _text(path: Path, index: int, rec: dict, field: str) -> str:
  value = rec[field]
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise MedMatError(path, f"expected a string, found {type(value).__name__}", index, field)
  text = str(value).strip()
  if not text:
    raise MedMatError(path, "is empty", index, field)
  return text


def _check_letters(path: Path, index: int, field: str, letters: list[str]) -> None:
  if not 2 <= len(letters) <= 4:
    raise MedMatError(path, f"{len(letters)} options {letters}; Med-MAT questions have 2 to 4", index, field)
  if tuple(letters) != LETTERS[:len(letters)]:
    raise MedMatError(path, f"option letters {letters} are not {list(LETTERS[:len(letters)])}", index, field)


def parse_question_choice(path: Path, index: int, text: str) -> dict[str, str]:
  """Options of a schema-A `Question-choice`: the run of "A: ...", "B: ..." lines after the question."""
  lines = text.split("\n")
  starts = [i for i, line in enumerate(lines) if line.startswith("A:")]
  if not starts:
    raise MedMatError(path, "no option lines ('A: ...') found", index, "Question-choice")
  options: dict[str, str] = {}
  for line in lines[starts[-1]:]:
    m = _OPTION_RE.match(line)
    if len(options) == len(LETTERS) or not m or m.group(1) != LETTERS[len(options)]:
      break
    options[m.group(1)] = m.group(2).strip()
  _check_letters(path, index, "Question-choice", list(options))
  empty = [k for k, v in options.items() if not v]
  if empty:
    raise MedMatError(path, f"option {empty[0]} is empty", index, "Question-choice")
  return options


def resolve_image(root: Path, image: str, schema: str) -> Path:
  """Where an image lives locally. Schema B paths are absolute on the authors' machine; the part from
  the last `images/` component on is taken relative to the root."""
  p = Path(image)
  if schema == "B" and "images" in p.parts:
    last = len(p.parts) - 1 - p.parts[::-1].index("images")
    return root.joinpath(*p.parts[last:])
  return p if p.is_absolute() else root / p


def check_image(path: Path, file: Path, index: int) -> None:
  """Raises MedMatError unless `path` is an image Pillow can open and verify."""
  if not path.is_file():
    raise MedMatError(file, f"image file not found: {path}", index, "image")
  try:
    with Image.open(path) as img:
      img.verify()
  except Exception as e:  # Pillow raises many types (UnidentifiedImageError, SyntaxError, OSError...)
    raise MedMatError(file, f"unreadable image {path}: {e}", index, "image") from e


def _detection_fields(path: Path, index: int, rec: dict) -> tuple[str, dict[str, str], str]:
  """(question, no options, canonical box text) of a detection record; errors name the field."""
  question = _text(path, index, rec, "Question")
  choice = _text(path, index, rec, "Question-choice")
  if any(_OPTION_RE.match(line) for line in choice.split("\n")):
    raise MedMatError(path, "a detection question has no options, found option lines ('A: ...')", index,
                      "Question-choice")
  answer = _text(path, index, rec, "Answer-choice")
  boxes = detection.parse_boxes(answer)
  if len(boxes) != 1:
    raise MedMatError(path, f"expected exactly one box '[x1, y1, x2, y2]' (0-1, x1 < x2, y1 < y2), found "
                      f"{len(boxes)} in {answer!r}", index, "Answer-choice")
  return choice, {}, detection.format_box(boxes[0])


def _subset_of(sf: SourceFile, override: int | None) -> int:
  if override is not None:
    return mat.get(override).id
  if sf.kind == "subset":
    return sf.number
  owners = [s.id for s in mat.SUBSETS.values() if sf.number in s.sources]
  if len(owners) != 1:
    raise MedMatError(sf.path, f"source dataset {sf.number} belongs to subsets {owners or 'none'}; "
                      "pass subset= to say which one")
  return owners[0]


def _record(sf: SourceFile, root: Path, index: int, rec: Any, subset: int, check_images: bool) -> Record:
  path = Path(sf.path)
  if not isinstance(rec, dict):
    raise MedMatError(path, f"expected a JSON object, found {type(rec).__name__}", index)
  fields = SCHEMA_A_FIELDS if sf.schema == "A" else SCHEMA_B_FIELDS
  for field in fields:
    if field not in rec:
      raise MedMatError(path, f"missing (schema {sf.schema} record has {sorted(rec)})", index, field)
  caption = _text(path, index, rec, "caption")
  image = _text(path, index, rec, "image")
  raw_id = rec["id"]
  status = mat.get(subset).status
  if status == "seg":
    raise MedMatError(path, f"subset {subset:02d} is a segmentation subset; medcg reads classification (01-37) "
                      "and detection (38-50) subsets only", index)
  if status == "det":
    if sf.schema != "A":
      raise MedMatError(path, f"detection subset {subset:02d} needs schema A (Question-choice / Answer-choice)",
                        index)
    question, options, answer = _detection_fields(path, index, rec)
    data_no = _text(path, index, rec, "data-no")
    stem = Path(sf.path).stem
    sample_id = f"{stem}-{int(raw_id):06d}" if str(raw_id).isdigit() else f"{stem}-{raw_id}"
  elif sf.schema == "A":
    question = _text(path, index, rec, "Question")
    options = parse_question_choice(path, index, _text(path, index, rec, "Question-choice"))
    answer = _text(path, index, rec, "Answer-choice")
    if answer not in options:
      raise MedMatError(path, f"answer letter {answer!r} is not among the options {list(options)}",
                        index, "Answer-choice")
    if options[answer] != caption:
      raise MedMatError(path, f"caption {caption!r} differs from the text of answer option {answer} "
                        f"({options[answer]!r})", index, "caption")
    data_no = _text(path, index, rec, "data-no")
    stem = Path(sf.path).stem
    sample_id = f"{stem}-{int(raw_id):06d}" if str(raw_id).isdigit() else f"{stem}-{raw_id}"
  else:
    question = _text(path, index, rec, "question")
    choices = rec["choices"]
    if not isinstance(choices, dict):
      raise MedMatError(path, f"expected an object {{letter: text}}, found {type(choices).__name__}",
                        index, "choices")
    letters = sorted(choices)
    _check_letters(path, index, "choices", letters)
    options = {}
    for k in letters:
      if not isinstance(choices[k], str) or not choices[k].strip():
        raise MedMatError(path, f"option {k} is not a non-empty string", index, "choices")
      options[k] = choices[k].strip()
    matches = [k for k, v in options.items() if v == caption]
    if not matches:
      raise MedMatError(path, f"caption {caption!r} matches no option {options}", index, "caption")
    if len(matches) > 1:
      raise MedMatError(path, f"caption {caption!r} matches several options {matches}", index, "caption")
    answer = matches[0]
    data_no = ",".join(str(n) for n in mat.get(subset).sources)
    sample_id = str(raw_id)
  image_path = resolve_image(root, image, sf.schema)
  if check_images:
    check_image(image_path, path, index)
  return Record(sample_id=sample_id, subset=subset, split=sf.split, triplet=mat.get(subset).triplet,
                question=question, options=options, answer=answer, caption=caption,
                image_path=str(image_path), data_no=data_no, source=sf.path, index=index)


def read_file(source: SourceFile | str | os.PathLike, root: str | os.PathLike | None = None, *,
              on_error: OnError = "fail", check_images: bool = True, subset: int | None = None) -> ReadResult:
  """Reads and validates one release JSON file.

  Args:
    source: a `SourceFile` from `discover`, or the path of a file named as in the release.
    root: the release root that image paths are relative to (default: inferred from the file).
    on_error: "fail" raises `MedMatError` on the first bad record; "skip" collects it in `skipped`.
      A file that cannot be parsed at all always raises.
    check_images: open and verify every image with Pillow.
    subset: the subset id for `ori--NN` files whose source dataset belongs to several subsets.
  """
  if on_error not in ("fail", "skip"):
    raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
  if not isinstance(source, SourceFile):
    path = Path(source)
    sf = _classify(path)
    if sf is None:
      raise MedMatError(path, "not a Med-MAT file name (expected Aggregated_Subsets/Subset--NN-<split>.json, "
                        "Original_Medical_Datasets/ori--NN-<split>.json or Subset-NN-<split>.json)")
  else:
    sf = source
  path = Path(sf.path)
  if root is None:
    root = path.parent if sf.schema == "B" else path.parent.parent
  root = Path(root)
  subset_id = _subset_of(sf, subset)
  records, skipped, seen = [], [], {}
  for index, rec in enumerate(_load_json(path)):
    try:
      record = _record(sf, root, index, rec, subset_id, check_images)
      if record.sample_id in seen:
        raise MedMatError(path, f"duplicate sample id {record.sample_id!r} (also record {seen[record.sample_id]})",
                          index, "id")
    except MedMatError as e:
      if on_error == "fail":
        raise
      skipped.append(Skipped(e.file, e.index, e.field, e.reason))
      continue
    seen[record.sample_id] = index
    records.append(record)
  return ReadResult(records, skipped)


def read_subset(root: str | os.PathLike, subset: int | str, split: str, *, on_error: OnError = "fail",
                check_images: bool = True, prefer: Iterable[str] = ("A", "B")) -> ReadResult:
  """Reads one subset's split from a release root (schema A preferred where both exist)."""
  sid = mat.get(subset).id
  files = subset_files(root, prefer)
  if sid not in files or split not in files[sid]:
    have = sorted(f"{k:02d}-{s}" for k, v in files.items() for s in v)
    raise MedMatError(root, f"no file for subset {sid:02d} split {split!r}; found {have}")
  return read_file(files[sid][split], root, on_error=on_error, check_images=check_images)
