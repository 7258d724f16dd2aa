"""Judge inputs: samples (question, image, criteria, level/capability) and model answers.

Two sample sources share one `Sample` record:
  * MLLM-Bench `questions.json` (id, image_path, question, meta.level/capability/"question type"), with
    per-sample criteria from a separate file or a `criteria` field;
  * Med-MAT release files (schema A `Question` / `Answer` / `image`, or schema B, read by
    `medcg.data.medmat`), judged as free-form answers: the ground-truth label becomes the criterion,
    the subset's MAT triplet the level / capability.

Answers of any model are JSONL (or an MLLM-Bench JSON list) keyed by sample id. Problems that concern
a whole file (unreadable JSON, duplicate ids, mixed model ids) raise `JudgeDataError` naming the file
and record (a UserError: command lines print it as one line); problems of one sample (no answer, no
criteria, unreadable image) become `Skip` entries that the report lists, so nothing is dropped silently.
Every file (questions, criteria, answers, images) may be local or gs:// (`medcg.fileio`); Med-MAT release
files are read by `medcg.data.medmat`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Iterable

from PIL import Image

from medcg import fileio
from medcg.data import medmat
from medcg.errors import UserError

# Label spellings seen in MLLM-Bench's questions.json, mapped to one form before grouping.
_LABEL_TYPOS = {"comparision": "Comparison", "recognization": "Recognition"}


# Record fields that name the answering model, first present wins (MLLM-Bench's answer files: gen_model_id).
MODEL_ID_FIELDS = ("model", "model_id", "gen_model_id", "name")

# MLLM-Bench's question types; the prompt's "unable to decide" situation one applies to close-ended ones.
QUESTION_TYPES = ("open-ended", "close-ended", "compound")


class JudgeDataError(UserError, ValueError):
  """A judge input file is malformed; the message names the file and the record."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One item to judge."""
  id: str
  question: str
  image_path: str
  level: str
  capability: str
  question_type: str
  criteria: str | None


@dataclasses.dataclass(frozen=True)
class Answer:
  """One model's answer to one sample."""
  sample_id: str
  model: str
  text: str
  decoding: dict


@dataclasses.dataclass(frozen=True)
class Skip:
  """A sample (or a sample x model pair) left out of judging, with the reason."""
  sample_id: str
  model: str | None
  reason: str


@dataclasses.dataclass(frozen=True)
class LoadedImage:
  """Image bytes ready to send (content hash for cache keys, MIME type for data URLs)."""
  data: bytes
  mime: str
  sha256: str


def normalize_label(label: Any) -> str:
  """Level / capability label in one canonical form: collapsed whitespace, known typos fixed."""
  words = str(label).split()
  return " ".join(_LABEL_TYPOS.get(w.lower(), w) for w in words)


def _read_text(path: str) -> str:
  try:
    return fileio.read_text(path)
  except FileNotFoundError:
    raise JudgeDataError(f"{path}: file not found") from None


def _read_json(path: str) -> Any:
  try:
    return json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise JudgeDataError(f"{path}: not valid JSON ({e})") from None


def _parent(path: str) -> str:
  """The folder of a file, absolute (gs:// paths as they are)."""
  return os.fspath(fileio.path(fileio.absolute(path)).parent)


def _resolve_image(path: str, roots: Iterable[str]) -> str:
  if os.path.isabs(path) or fileio.is_remote(path):
    return path
  candidates = [fileio.join(root, os.path.normpath(path)) if fileio.is_remote(root)
                else os.path.normpath(os.path.join(root, path)) for root in roots]
  for c in candidates:
    if fileio.exists(c):
      return c
  return candidates[0]  # the load step reports it as unreadable, with this path


def load_criteria(path: str) -> dict[str, str]:
  """Per-sample criteria: a JSON object {id: text}, a JSON list or JSONL of {id, criteria}."""
  if path.endswith(".jsonl"):
    records = list(_iter_jsonl(path))
  else:
    data = _read_json(path)
    if isinstance(data, dict):
      return {str(k): _criteria_text(v, path, k) for k, v in data.items()}
    if not isinstance(data, list):
      raise JudgeDataError(f"{path}: expected an object or a list of records, got {type(data).__name__}")
    records = list(enumerate(data))
  out = {}
  for idx, rec in records:
    if not isinstance(rec, dict) or "id" not in rec or "criteria" not in rec:
      raise JudgeDataError(f"{path}: record {idx} needs fields 'id' and 'criteria'")
    sid = str(rec["id"])
    if sid in out:
      raise JudgeDataError(f"{path}: record {idx}: duplicate sample id {sid!r}")
    out[sid] = _criteria_text(rec["criteria"], path, idx)
  return out


def _criteria_text(value: Any, path: str, where: Any) -> str:
  if isinstance(value, list):  # numbered list of criteria lines
    return "\n".join(f"{i}. {str(v).strip()}" for i, v in enumerate(value, 1))
  if not isinstance(value, str):
    raise JudgeDataError(f"{path}: record {where}: criteria must be text or a list of text")
  return value.strip()


def load_mllm_bench(questions_path: str, criteria_path: str | None = None,
                    image_root: str | None = None) -> list[Sample]:
  """Reads MLLM-Bench `questions.json`; criteria from `criteria_path` or a per-sample field.

  Relative `image_path`s resolve against `image_root`, else the file's folder or its parent (the
  release writes `./data/images/<id>.jpg` relative to the repository root).
  """
  data = _read_json(questions_path)
  if not isinstance(data, list):
    raise JudgeDataError(f"{questions_path}: expected a JSON list of questions")
  criteria = load_criteria(criteria_path) if criteria_path else {}
  qdir = _parent(questions_path)
  roots = [image_root] if image_root else [qdir, _parent(qdir)]
  samples, seen = [], set()
  for idx, rec in enumerate(data):
    where = f"{questions_path}: record {idx}"
    if not isinstance(rec, dict):
      raise JudgeDataError(f"{where}: expected an object")
    for key in ("id", "image_path", "question", "meta"):
      if key not in rec:
        raise JudgeDataError(f"{where}: missing field {key!r}")
    sid = str(rec["id"])
    if sid in seen:
      raise JudgeDataError(f"{where}: duplicate sample id {sid!r}")
    seen.add(sid)
    meta = rec["meta"]
    if not isinstance(meta, dict):
      raise JudgeDataError(f"{where} (id {sid}): 'meta' must be an object")
    for key in ("level", "capability", "question type"):
      if key not in meta:
        raise JudgeDataError(f"{where} (id {sid}): missing meta field {key!r}")
    crit = criteria.get(sid)
    if crit is None:
      crit = rec.get("criteria", meta.get("criteria"))
      crit = _criteria_text(crit, questions_path, idx) if crit is not None else None
    samples.append(Sample(
        id=sid, question=str(rec["question"]),
        image_path=_resolve_image(str(rec["image_path"]), roots),
        level=normalize_label(meta["level"]), capability=normalize_label(meta["capability"]),
        question_type=normalize_label(meta["question type"]).lower(), criteria=crit or None))
  unknown = sorted(set(criteria) - seen)
  if unknown:
    raise JudgeDataError(f"{criteria_path}: criteria for ids not in {questions_path}: {unknown[:5]}")
  return samples


def medmat_criteria(answer: str) -> str:
  """The criterion a Med-MAT free-form sample is judged by: its ground-truth label."""
  return (f"1. The correct finding for this image is: {answer.strip()}.\n"
          "2. Prefer the answer that states this finding clearly; an answer naming another finding is wrong.")


def load_medmat_freeform(path: str, root: str | None = None) -> tuple[list[Sample], list[Skip]]:
  """Reads a Med-MAT release file (either schema, via `medcg.data.medmat`) as free-form samples.

  The question is the instruction without options, the ground-truth caption becomes the criterion,
  level = "<modality>-<area>" and capability = the MAT triplet. Records the reader rejects come back
  as `Skip`s with its reason (file, record, field). `root` is the release root image paths are
  relative to (default: inferred from the file's place in the release).
  """
  try:
    result = medmat.read_file(path, root, on_error="skip", check_images=False)
  except medmat.MedMatError as e:
    raise JudgeDataError(str(e)) from None
  samples = []
  for r in result.records:
    modality, area, task = r.triplet
    samples.append(Sample(
        id=r.sample_id, question=r.question, image_path=r.image_path, level=f"{modality}-{area}",
        capability=f"{modality}-{area}-{task}", question_type="close-ended",
        criteria=medmat_criteria(r.caption)))
  skips = [Skip(f"{sk.file}[{sk.index}]", None, f"Med-MAT record rejected (field {sk.field}): {sk.reason}")
           for sk in result.skipped]
  return samples, skips


def _iter_jsonl(path: str):
  for lineno, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      yield f"line {lineno}", json.loads(line)
    except json.JSONDecodeError as e:
      raise JudgeDataError(f"{path}: line {lineno}: not valid JSON ({e})") from None


def _first(rec: dict, keys: tuple[str, ...]):
  for k in keys:
    if k in rec:
      return rec[k]
  return None


@dataclasses.dataclass(frozen=True)
class AnswerFile:
  """One model's answers and where its name came from (`name_from`: "NAME=PATH", the records' field, or
  "folder" / "file name")."""
  path: str
  name: str
  name_from: str
  answers: dict[str, Answer]


def read_answers(path: str, name: str | None = None) -> AnswerFile:
  """Reads one model's answers: JSONL lines (or an MLLM-Bench JSON list) keyed by sample id.

  Accepted field names: `sample_id` | `unique_idx` | `id`, `answer`, a model id (MODEL_ID_FIELDS: `model` |
  `model_id` | `gen_model_id` | `name`), `decoding` | `gen_kwargs`. A record with an `output` field (medcg's
  evaluation `samples.jsonl`, where `answer` is the ground truth) is judged on its `output`.

  The model's name, first that applies: `name` (from NAME=PATH); the records' model id, when every record
  that carries one names the same model (several: an error, unless `name` is given); the file name without
  its extension, or the folder for `samples.jsonl` (medcg's evaluation output, e.g. `step_444`).
  """
  if path.endswith(".jsonl"):
    records = _iter_jsonl(path)
  else:
    data = _read_json(path)
    if not isinstance(data, list):
      raise JudgeDataError(f"{path}: expected a JSON list of answers (or a .jsonl file)")
    records = ((f"record {i}", r) for i, r in enumerate(data))
  answers, file_models = {}, {}  # model id -> the field it was read from
  for where, rec in records:
    if not isinstance(rec, dict):
      raise JudgeDataError(f"{path}: {where}: expected an object")
    sid = _first(rec, ("sample_id", "unique_idx", "id"))
    text = _first(rec, ("output", "answer"))
    if sid is None or text is None:
      raise JudgeDataError(f"{path}: {where}: needs a sample id ('sample_id') and 'answer'")
    if not isinstance(text, str):
      raise JudgeDataError(f"{path}: {where}: the answer must be text, got {type(text).__name__}")
    sid = str(sid)
    if sid in answers:
      raise JudgeDataError(f"{path}: {where}: duplicate sample id {sid!r}")
    field = next((k for k in MODEL_ID_FIELDS if k in rec), None)
    if field is not None:
      file_models.setdefault(str(rec[field]), field)
    decoding = _first(rec, ("decoding", "gen_kwargs")) or {}
    if not isinstance(decoding, dict):
      raise JudgeDataError(f"{path}: {where}: decoding settings must be an object")
    answers[sid] = Answer(sample_id=sid, model="", text=text, decoding=decoding)
  if name:
    name_from = "NAME=PATH"
  elif len(file_models) > 1:
    raise JudgeDataError(f"{path}: answers from several models {sorted(file_models)}; use one file per model "
                         "(or name the whole file with NAME=PATH)")
  elif file_models:
    (name, field), = file_models.items()
    name_from = f"records' {field!r} field"
  else:
    name, name_from = os.path.splitext(os.path.basename(path))[0], "file name"
    if name == "samples":  # medcg evaluation output: the run folder names the model
      name, name_from = os.path.basename(_parent(path)), "folder"
  return AnswerFile(path=path, name=name, name_from=name_from,
                    answers={k: dataclasses.replace(a, model=name) for k, a in answers.items()})


def load_answers(path: str, model: str | None = None) -> tuple[str, dict[str, Answer]]:
  """(model name, {sample id: Answer}) of `read_answers(path, model)`."""
  f = read_answers(path, model)
  return f.name, f.answers


def load_image(path: str) -> LoadedImage:
  """Reads and checks an image; formats a judge API may reject are re-encoded as PNG.

  Raises OSError (with the path) when the file is missing or not a decodable image.
  """
  try:
    data = fileio.path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
      fmt = img.format
      img.load()  # decode fully: a truncated file fails here, not at the judge
      if fmt not in ("PNG", "JPEG", "WEBP", "GIF"):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        data, fmt = buf.getvalue(), "PNG"
  except (OSError, Image.DecompressionBombError, ValueError) as e:
    raise OSError(f"cannot read image {path}: {e}") from None
  return LoadedImage(data=data, mime=f"image/{fmt.lower()}", sha256=hashlib.sha256(data).hexdigest())
