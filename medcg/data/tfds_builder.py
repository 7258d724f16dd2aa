"""The `med_mat` TFDS builder and the resumable, atomic converter behind `python -m medcg.data convert`.

Shards are a standard TFDS dataset (one builder config per subset, `subset_03`, splits as present in
the source), so `tfds.builder_from_directory(out/med_mat/subset_03/1.0.0)` and
`tfds.load("med_mat/subset_03", data_dir=out)` work for tf.data users. medcg itself reads them
through `shards.py` and `manifest.json`, without TensorFlow.

TFRecord (the default, so the output is what `tfds.load` reads with tf.data) needs TensorFlow at
conversion time only, because tfds writes it with `tf.io`. ArrayRecord (`--format array_record`)
needs no TensorFlow. Either way medcg reads records by index, so grain gets exact mixtures and exact
global shuffles from both.

Atomicity: each subset is built in `out/.tmp/` and moved into place with `os.replace`; completed
subsets are recorded in `manifest.partial.json`; `manifest.json` (the only file readers trust) is
written last. A re-run keeps subsets that are complete with identical settings and source files,
and rebuilds the rest.

Object stores. tfds, the TFRecord indexer and the in-place moves above need a local disk, so an `--out` on
`gs://` is built exactly as a local one in a local staging directory (`--staging`; by default one under the
system temp dir named by a hash of `--out`, so an interrupted convert resumes there) and then published:
`manifest.partial.json` goes up first and any old `manifest.json` is deleted, files missing remotely or
differing in size or crc32c are uploaded, files of subsets no longer converted are deleted, and
`manifest.json` is written last. The manifest is what makes a dataset visible to readers (`Manifest.load`
refuses a root without one), so they see the old dataset, "incomplete", or the new one, never a mix; a re-run
with nothing changed uploads nothing. The source (`--src`) must be local.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core import writer as tfds_writer
from PIL import Image
from tqdm import tqdm

import medcg
from medcg import fileio
from medcg import mat
from medcg.data import example_proto
from medcg.data import features as features_lib
from medcg.data import medmat
from medcg.data import shards as shards_lib
from medcg.errors import UserError

NAME = "med_mat"
VERSION = "1.0.0"
DEFAULT_IMAGE_SIZE = 336
DEFAULT_SHARD_SIZE = 1024
TMP_DIR = ".tmp"


# Classification (01-37) and detection (38-50) subsets; segmentation masks have no question-answer form.
CONVERTIBLE_SUBSETS = mat.CLASSIFICATION_SUBSETS + mat.DETECTION_SUBSETS


def config_name(subset: int | str) -> str:
  """The builder config name of a subset ("subset_03")."""
  return f"subset_{mat.get(subset).id:02d}"


@dataclasses.dataclass(eq=False)
class MedMatConfig(tfds.core.BuilderConfig):
  """One Med-MAT subset."""
  subset: int = 0


def _configs() -> list[MedMatConfig]:
  out = []
  for sid in CONVERTIBLE_SUBSETS:
    s = mat.get(sid)
    out.append(MedMatConfig(name=config_name(sid), version=VERSION, subset=sid,
                            description=f"Med-MAT {s.name}: {s.task} ({s.modality}, {s.area}, {s.coarse_task})"))
  return out


def encode_square_png(path: str | os.PathLike, size: int) -> bytes:
  """Loads an image, converts it to RGB, resizes it to size x size (bicubic) and encodes it as PNG."""
  with Image.open(path) as img:
    img = img.convert("RGB")
    if img.size != (size, size):
      img = img.resize((size, size), Image.Resampling.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


class _RecordsPerShard(tfds.core.utils.shard_utils.ShardConfig):
  """Shard by record count (`--shard_size`) rather than tfds' byte-size heuristic."""

  def __init__(self, records_per_shard: int):
    super().__init__()
    object.__setattr__(self, "_records_per_shard", records_per_shard)

  def get_number_shards(self, total_size: int, num_examples: int, uses_precise_sharding: bool = True) -> int:
    return max(1, math.ceil(num_examples / self._records_per_shard))


@dataclasses.dataclass(eq=False)
class _ShardedDownloadConfig(tfds.download.DownloadConfig):
  records_per_shard: int = DEFAULT_SHARD_SIZE

  def get_shard_config(self):
    return _RecordsPerShard(self.records_per_shard)


class _CanonicalExampleWriter(tfds_writer.ExampleWriter):
  """Writes every record in canonical form (`example_proto.canonical`): same source, same shard bytes.

  tfds serializes each `tf.train.Example` with the protobuf default, which writes the feature map in hash-table
  order; that order differs between processes, so two conversions of one source gave different shard sha256.
  """

  def write(self, path, examples):
    return super().write(path, ((key, example_proto.canonical(raw)) for key, raw in examples))


class MedMat(tfds.core.GeneratorBasedBuilder):
  """Med-MAT samples, one config per classification (01-37) or detection (38-50) subset.

  A detection sample has no options and its `answer` is the box text "[x1, y1, x2, y2]" (0-1).
  """

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "Both released schemas; images resized to a square PNG."}
  BUILDER_CONFIGS = _configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point manual_dir at a Med-MAT root: Aggregated_Subsets/Subset--NN-<split>.json (schema A) with the "
      "med-mat/ image folders, or root-level Subset-NN-<split>.json (schema B) with images/; SynthMAT "
      "(`python -m medcg.data synth`) writes the same layout.")

  def __init__(self, *, image_size: int = DEFAULT_IMAGE_SIZE, on_error: str = "fail", **kwargs):
    self.image_size = int(image_size)
    self.on_error = on_error
    self.skipped: dict[str, list[medmat.Skipped]] = collections.defaultdict(list)
    self._records: dict[str, list[medmat.Record]] | None = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    info = self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "sample_id": text, "subset": tfds.features.Scalar(np.int64), "split": text,
            "modality": text, "area": text, "task": text, "question": text,
            "options": tfds.features.Sequence(text), "answer": text, "caption": text, "data_no": text,
        }),
        homepage="https://huggingface.co/datasets/FreedomIntelligence/Med-MAT",
        citation="arXiv:2412.20070",
        metadata=tfds.core.MetadataDict(image_size=self.image_size),
    )
    # med_mat has no pre-computed info on gs://tfds-data. tfds' lookup of it (run by the builder's __init__
    # for a data_dir without a dataset yet) makes a `tmp*tfds` dir in the system temp folder before finding
    # nothing there, and never removes it: one empty dir per subset per convert.
    info.initialize_from_bucket = lambda: None
    return info

  # tfds prints these two with termcolor to stdout ("Downloading and preparing dataset Unknown size ..."),
  # two lines per subset that say nothing here: there is no download, and convert reports per subset itself.
  def _log_download_bytes(self) -> None:
    logging.debug("building %s in %s", self.builder_config.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.debug("built %s in %s", self.builder_config.name, self.data_dir)

  def _example_writer(self) -> tfds_writer.ExampleWriter:
    return _CanonicalExampleWriter(file_format=self.info.file_format)

  def readable_records(self, root: str | os.PathLike) -> dict[str, list[medmat.Record]]:
    """The subset's valid records per split, read once from the Med-MAT root; skips go to `skipped`."""
    if self._records is None:
      root = Path(root)
      files = medmat.subset_files(root).get(self.builder_config.subset, {})
      if not files:
        raise medmat.MedMatError(root, f"no JSON files for subset {self.builder_config.subset:02d}")
      records = {}
      for split, sf in files.items():
        result = medmat.read_file(sf, root, on_error=self.on_error)
        self.skipped[split].extend(result.skipped)
        records[split] = result.records
      self._records = records
    return self._records

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    records = self.readable_records(dl_manager.manual_dir)
    return {split: self._generate_examples(recs, split) for split, recs in records.items() if recs}

  def _generate_examples(self, records: Sequence[medmat.Record], split: str):
    # Pillow releases the GIL while decoding, resizing and deflating, so threads encode in parallel;
    # a bounded window keeps at most a few hundred encoded images in memory.
    window = 256
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
      for start in range(0, len(records), window):
        chunk = records[start:start + window]
        for r, png in zip(chunk, pool.map(self._encode, chunk)):
          if isinstance(png, Exception):
            err = medmat.MedMatError(r.source, f"cannot decode image {r.image_path}: {png}", r.index, "image")
            if self.on_error == "fail":
              raise err from png
            self.skipped[split].append(medmat.Skipped(err.file, err.index, err.field, err.reason))
            continue
          modality, area, task = r.triplet
          yield r.sample_id, {
              "image": png, "sample_id": r.sample_id, "subset": r.subset, "split": r.split,
              "modality": modality, "area": area, "task": task, "question": r.question,
              "options": r.option_list, "answer": r.answer, "caption": r.caption, "data_no": r.data_no,
          }

  def _encode(self, record: medmat.Record) -> bytes | Exception:
    try:
      return encode_square_png(record.image_path, self.image_size)
    except Exception as e:  # Pillow decode errors come in many types; reported per record above
      return e


# -- conversion ----------------------------------------------------------------------------------------

def _source_fingerprint(files: dict[str, medmat.SourceFile]) -> dict[str, Any]:
  return {split: {"file": sf.path, "schema": sf.schema, "sha256": shards_lib.sha256_file(sf.path)}
          for split, sf in sorted(files.items())}


def _settings(fmt: str, image_size: int, shard_size: int, on_error: str) -> dict[str, Any]:
  return {"format": fmt, "image_size": image_size, "shard_size": shard_size, "on_error": on_error,
          "medcg_version": medcg.__version__, "builder_version": VERSION}


def _fingerprint(settings: dict[str, Any], sources: dict[str, Any]) -> str:
  blob = json.dumps({"settings": settings, "sources": sources}, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()


def _index_split(subset_dir: Path, split: str, fmt: str, count: int) -> dict[str, Any]:
  """Shard list (counts, sizes, sha256, offset index), label histogram and record check of one split."""
  suffix = "tfrecord" if fmt == "tfrecord" else "array_record"
  paths = sorted(subset_dir.glob(f"{NAME}-{split}.{suffix}-*-of-*"))
  paths = [p for p in paths if not p.name.endswith(shards_lib.OFFSETS_SUFFIX)]
  entries, shard_objs = [], []
  for path in paths:
    offsets_rel = None
    if fmt == "tfrecord":
      offsets = shards_lib.scan_tfrecord(path)
      offsets_path = path.with_name(path.name + shards_lib.OFFSETS_SUFFIX)
      np.save(offsets_path, offsets, allow_pickle=False)
      offsets_rel = str(offsets_path.relative_to(subset_dir))
      n = len(offsets)
    else:
      from array_record.python import array_record_module
      reader = array_record_module.ArrayRecordReader(str(path))
      n = reader.num_records()
      reader.close()
    entry = {"file": path.name, "count": int(n), "bytes": path.stat().st_size,
             "sha256": shards_lib.sha256_file(path), "offsets": offsets_rel}
    entries.append(entry)
    shard_objs.append(shards_lib.Shard(str(path), entry["count"], entry["bytes"], entry["sha256"],
                                       str(subset_dir / offsets_rel) if offsets_rel else None))
  total = sum(e["count"] for e in entries)
  if total != count:
    raise shards_lib.ShardError(f"{subset_dir}: split {split} shards hold {total} records, tfds reported {count}")
  source = (shards_lib.TFRecordSource if fmt == "tfrecord" else shards_lib.ArrayRecordSource)(shard_objs)
  labels = collections.Counter()
  for i in range(len(source)):
    labels[features_lib.parse_example(source[i], where=f"{subset_dir} {split} record {i}")["caption"]] += 1
  if fmt == "tfrecord":
    source.close()
  return {"count": total, "labels": dict(sorted(labels.items())), "shards": entries}


def _build_subset(src: Path, out: Path, subset: int, files: dict[str, medmat.SourceFile],
                  settings: dict[str, Any], sources: dict[str, Any]) -> dict[str, Any]:
  """Builds one subset in a temp dir, indexes it, and moves it into `out/med_mat/subset_NN`."""
  name = config_name(subset)
  tmp = out / TMP_DIR / f"{name}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  builder = MedMat(config=name, data_dir=str(tmp), file_format=settings["format"],
                   image_size=settings["image_size"], on_error=settings["on_error"])
  tmp_subset_dir = tmp / NAME / name / VERSION
  try:
    if not any(builder.readable_records(src).values()):
      # Every record was skipped: tfds cannot write a config without examples, the manifest
      # still records the subset with its skip reasons.
      tmp_subset_dir = None
      split_counts = {}
    else:
      builder.download_and_prepare(download_config=_ShardedDownloadConfig(
          manual_dir=str(src), records_per_shard=settings["shard_size"]))
      split_counts = {k: v.num_examples for k, v in builder.info.splits.items()}
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  splits = {}
  for split in sorted(files):
    if tmp_subset_dir is not None and split in split_counts:
      entry = _index_split(tmp_subset_dir, split, settings["format"], split_counts[split])
    else:
      entry = {"count": 0, "labels": {}, "shards": []}
    entry["skipped"] = [s.to_json() for s in builder.skipped.get(split, [])]
    splits[split] = entry
  rel_dir = Path(NAME) / name / VERSION
  for entry in splits.values():
    for shard in entry["shards"]:
      shard["file"] = str(rel_dir / shard["file"])
      if shard["offsets"]:
        shard["offsets"] = str(rel_dir / shard["offsets"])
  # Move into place: the old version (if any) goes to the temp area first, then is deleted.
  final = out / NAME / name
  if final.exists():
    os.replace(final, out / TMP_DIR / f"old-{name}-{uuid.uuid4().hex[:8]}")
  final.parent.mkdir(parents=True, exist_ok=True)
  if tmp_subset_dir is not None:
    os.replace(tmp / NAME / name, final)
  shutil.rmtree(tmp, ignore_errors=True)
  s = mat.get(subset)
  return {"config": name, "dir": str(rel_dir), "name": s.name, "triplet": list(s.triplet),
          "settings": settings, "sources": sources, "fingerprint": _fingerprint(settings, sources),
          "splits": splits}


def _shards_present(out: Path, entry: dict[str, Any]) -> bool:
  for split in entry["splits"].values():
    for shard in split["shards"]:
      path = out / shard["file"]
      if not path.exists() or path.stat().st_size != shard["bytes"]:
        return False
      if shard.get("offsets") and not (out / shard["offsets"]).exists():
        return False
  return True


def _previous_entries(out: Path) -> dict[str, dict[str, Any]]:
  for name in (shards_lib.MANIFEST, shards_lib.PARTIAL_MANIFEST):
    path = out / name
    if path.exists():
      try:
        with open(path, encoding="utf-8") as f:
          data = json.load(f)
        if data.get("medcg_manifest") == shards_lib.MANIFEST_VERSION:
          return dict(data.get("subsets", {}))
      except (json.JSONDecodeError, OSError) as e:
        logging.warning("ignoring unreadable %s (%s); converting from scratch", path, e)
      return {}
  return {}


def convert(src: str | os.PathLike, out: str | os.PathLike, *, subsets: Iterable[int | str] | None = None,
            image_size: int = DEFAULT_IMAGE_SIZE, shard_size: int = DEFAULT_SHARD_SIZE,
            fmt: str = "tfrecord", on_error: str = "fail", progress: bool = True,
            staging: str | os.PathLike | None = None) -> shards_lib.Manifest:
  """Converts a Med-MAT root (real release or SynthMAT) into shards plus `manifest.json`.

  Subsets already complete in `out` with the same settings and identical source JSON are kept;
  others are (re)built. A remote `out` (gs://) is built in the local `staging` directory (default
  `default_staging(out)`) and then published (module docstring); `staging` is unused for a local `out`.
  Returns the loaded manifest.
  """
  if fileio.is_remote(src):
    raise UserError(f"--src {src}: convert reads the Med-MAT source from a local directory only; copy it "
                    "to a local disk first (the output, --out, may be on gs://)")
  if fileio.is_remote(out):
    return convert_remote(src, out, staging=staging, subsets=subsets, image_size=image_size,
                          shard_size=shard_size, fmt=fmt, on_error=on_error, progress=progress)[0]
  if fmt not in shards_lib.FORMATS:
    raise ValueError(f"--format must be one of {shards_lib.FORMATS}, not {fmt!r}")
  if on_error not in ("fail", "skip"):
    raise ValueError(f"--on_error must be 'fail' or 'skip', not {on_error!r}")
  if image_size < 1 or shard_size < 1:
    raise ValueError(f"--image_size ({image_size}) and --shard_size ({shard_size}) must be positive")
  src, out = Path(src).resolve(), Path(out).resolve()
  available = medmat.subset_files(src)
  other = [sid for sid in available if sid not in CONVERTIBLE_SUBSETS]
  if subsets is None:
    if other:
      logging.warning("skipping segmentation subsets %s: the med_mat builder holds classification (01-37) "
                      "and detection (38-50) subsets only", other)
    wanted = [sid for sid in available if sid not in other]
  else:
    wanted = sorted({mat.get(s).id for s in subsets})
    bad = [s for s in wanted if s not in CONVERTIBLE_SUBSETS]
    if bad:
      raise ValueError(f"subsets {bad} are segmentation subsets; the med_mat builder holds classification "
                       "(01-37) and detection (38-50) subsets only")
    missing = [s for s in wanted if s not in available]
    if missing:
      raise medmat.MedMatError(src, f"no JSON files for subsets {missing}; the source has {list(available)}")
  if not wanted:
    raise medmat.MedMatError(src, "no Med-MAT subset files found (Aggregated_Subsets/Subset--NN-<split>.json "
                             "or Subset-NN-<split>.json)")
  # tfds' own bars (one per split, nested under ours) garble the terminal; ours counts subsets.
  tfds.disable_progress_bar()
  out.mkdir(parents=True, exist_ok=True)
  shutil.rmtree(out / TMP_DIR, ignore_errors=True)  # leftovers of an interrupted run
  for leftover in out.glob(".manifest*.tmp*"):  # fileio's temp names (and older `.tmp-<pid>` ones)
    leftover.unlink()
  settings = _settings(fmt, image_size, shard_size, on_error)
  previous = _previous_entries(out)
  # Keep completed subsets converted with the same settings (requested now or not).
  kept = {k: v for k, v in previous.items()
          if v.get("settings") == settings and _shards_present(out, v)}
  todo = []
  for sid in wanted:
    key = shards_lib.subset_key(sid)
    sources = _source_fingerprint(available[sid])
    if key in kept and kept[key]["fingerprint"] == _fingerprint(settings, sources):
      continue
    kept.pop(key, None)
    todo.append((sid, sources))
  stale = sorted(set(previous) - set(kept) - {shards_lib.subset_key(s) for s, _ in todo})

  def header() -> dict[str, Any]:
    return {"medcg_manifest": shards_lib.MANIFEST_VERSION, "medcg_version": medcg.__version__,
            "builder": NAME, **settings, "source_root": str(src),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "subsets": dict(sorted(entries.items()))}

  entries = dict(kept)
  if todo or stale or not (out / shards_lib.MANIFEST).exists():
    # Demote before touching any subset: readers must never see a manifest that is being changed.
    fileio.atomic_write_json(out / shards_lib.PARTIAL_MANIFEST, header())
    (out / shards_lib.MANIFEST).unlink(missing_ok=True)
    for key in stale:
      shutil.rmtree(out / NAME / config_name(int(key)), ignore_errors=True)
    bar = tqdm(todo, desc="convert", unit="subset", disable=not progress)
    for sid, sources in bar:
      bar.set_postfix_str(config_name(sid))
      entries[shards_lib.subset_key(sid)] = _build_subset(src, out, sid, available[sid], settings, sources)
      fileio.atomic_write_json(out / shards_lib.PARTIAL_MANIFEST, header())
    fileio.atomic_write_json(out / shards_lib.MANIFEST, header())
    (out / shards_lib.PARTIAL_MANIFEST).unlink(missing_ok=True)
  shutil.rmtree(out / TMP_DIR, ignore_errors=True)
  return shards_lib.Manifest.load(out)


# -- publishing to an object store ---------------------------------------------------------------------

def default_staging(out: str | os.PathLike) -> str:
  """The local build directory of a remote `out`: the same for every run with that `out`, so a re-run resumes."""
  digest = hashlib.sha256(fileio.absolute(out).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), f"medcg-convert-{digest}")


def convert_remote(src: str | os.PathLike, out: str | os.PathLike, *, staging: str | os.PathLike | None = None,
                   fmt: str = "tfrecord", **kwargs) -> tuple[shards_lib.Manifest, list[str]]:
  """`convert` to a remote `out`: build in local `staging`, then `publish`; returns the manifest and the uploads."""
  if fileio.is_remote(src):
    raise UserError(f"--src {src}: convert reads the Med-MAT source from a local directory only; copy it "
                    "to a local disk first (the output, --out, may be on gs://)")
  if fmt == "array_record":
    raise UserError(f"--out {out}: ArrayRecord shards cannot be read from {fileio.scheme(out)}:// (array_record "
                    "opens local files only); use the default --format tfrecord, or a local --out")
  staging = os.fspath(staging) if staging is not None else default_staging(out)
  if fileio.is_remote(staging):
    raise UserError(f"--staging {staging}: the staging directory must be on a local disk")
  fileio.path(out)  # a missing backend package fails before the (long) build
  logging.info("converting into the local staging directory %s, then publishing to %s", staging, out)
  convert(src, staging, fmt=fmt, **kwargs)
  uploaded = publish(staging, out)
  return shards_lib.Manifest.load(out), uploaded


def _crc32c_b64(path: Path) -> str:
  """A file's crc32c as GCS reports it (base64 of the big-endian uint32)."""
  import base64
  import google_crc32c
  crc = google_crc32c.Checksum()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      crc.update(block)
  return base64.b64encode(crc.digest()).decode()


def _publishable(rel: str) -> bool:
  """Files of a finished local conversion that belong on the remote (not temp files, not the manifests)."""
  parts = Path(rel).parts
  return not (parts[0] == TMP_DIR or rel in (shards_lib.MANIFEST, shards_lib.PARTIAL_MANIFEST)
              or parts[-1].startswith(".manifest"))


def publish(staging: str | os.PathLike, out: str | os.PathLike) -> list[str]:
  """Uploads the finished local conversion `staging` to the remote `out`; returns the paths uploaded.

  Readers trust `manifest.json` only, so it is deleted before anything changes and written last (see the
  module docstring); files already present with the same size and crc32c are not uploaded again.
  """
  staging, out = Path(staging), fileio.absolute(out).rstrip("/")
  manifest_bytes = (staging / shards_lib.MANIFEST).read_bytes()  # raises if the local build is incomplete
  remote = {k[len(out) + 1:]: v for k, v in shards_lib.remote_listing(out).items() if k.startswith(out + "/")}
  checked: dict[str, bool] = {}

  def same(rel: str) -> bool:
    # Size alone would miss a rebuilt offset index (its size depends on the record count only).
    if rel not in checked:
      info, local = remote.get(rel), staging / rel
      checked[rel] = (info is not None and int(info["size"]) == local.stat().st_size
                      and info.get("crc32c") is not None and info["crc32c"] == _crc32c_b64(local))
    return checked[rel]

  local_files = {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()}
  local_files = {rel for rel in local_files if _publishable(rel)}
  stale = sorted(rel for rel in remote if rel.startswith(NAME + "/") and rel not in local_files)
  if (not stale and shards_lib.PARTIAL_MANIFEST not in remote and same(shards_lib.MANIFEST)
      and all(same(rel) for rel in local_files)):
    return []
  out_p = fileio.path(out)
  fileio.atomic_write_bytes(out_p / shards_lib.PARTIAL_MANIFEST, manifest_bytes)
  if shards_lib.MANIFEST in remote:
    (out_p / shards_lib.MANIFEST).unlink()
  uploaded = fileio.copy_tree(staging, out, skip=lambda rel: not _publishable(rel) or same(rel))
  for rel in stale:
    (out_p / rel).unlink(missing_ok=True)
  fileio.atomic_write_bytes(out_p / shards_lib.MANIFEST, manifest_bytes)
  uploaded.append(shards_lib.MANIFEST)
  (out_p / shards_lib.PARTIAL_MANIFEST).unlink(missing_ok=True)
  logging.info("published %s to %s: %d files uploaded, %d stale deleted", staging, out, len(uploaded), len(stale))
  return uploaded
