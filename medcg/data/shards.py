"""Random access to converted Med-MAT shards, without TensorFlow.

`python -m medcg.data convert` writes a standard TFDS dataset (`med_mat/subset_NN/1.0.0/...`) plus
`manifest.json` at the output root. The manifest is the only thing a reader trusts: it lists the
completed subsets with their splits, counts, label histograms, shard files (record counts, byte sizes,
sha256) and, for TFRecord shards, a sidecar offset index per shard. It is written last and
atomically, so an interrupted conversion leaves no `manifest.json` (only `manifest.partial.json`)
and `Manifest.load` refuses the directory.

TFRecord has no index of its own and grain reads it only sequentially; with the offset index every
record is one `pread`, which gives grain a `RandomAccessDataSource` and so exact mixtures and exact
global shuffles. Each read checks the TFRecord framing (length and masked crc32c of length and data),
so a truncated or corrupt shard is reported with its file name and record index instead of yielding
garbage. ArrayRecord shards are read with `grain.sources.ArrayRecordDataSource`.

Object stores (`gs://`, through `medcg.fileio`). A manifest, its offset indexes and TFRecord shards read the
same from `gs://bucket/shards` as from a local directory: a record is one ranged GET of exactly its bytes
(a buffered file handle would read megabytes ahead of every randomly shuffled record), and `Manifest.load`
checks every shard's size from one listing of the root instead of one request per file. ArrayRecord's reader
opens local files only, so ArrayRecord shards on an object store are refused with a clear error.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import json
import os
import struct
import threading
from concurrent import futures
from pathlib import Path
from typing import Any, Sequence

import google_crc32c
import numpy as np

from medcg import fileio
from medcg import mat
from medcg.errors import UserError

MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
MANIFEST_VERSION = 1
FORMATS = ("tfrecord", "array_record")
SPLITS = ("train", "test")
OFFSETS_SUFFIX = ".offsets.npy"

_HEADER = 12   # uint64 length + uint32 masked crc32c of the length
_FOOTER = 4    # uint32 masked crc32c of the data
_MASK_DELTA = 0xA282EAD8


class ShardError(UserError, IOError):
  """A shard file that is missing, truncated or corrupt; the message names the file and record."""


class ManifestError(UserError, FileNotFoundError):
  """A dataset directory that is missing, incomplete (interrupted convert) or inconsistent."""


def _root_path(root: str | os.PathLike) -> Path:
  """pathlib for local roots (unchanged behaviour), an `epath.Path` for gs:// ones."""
  return fileio.path(root) if fileio.is_remote(root) else Path(root)


def _remote_fs(path: str):
  """The fsspec filesystem of a remote path; fsspec hands each process its own instance (fork-safe)."""
  import fsspec
  fileio.path(path)  # one clear error when the backend package is missing
  return fsspec.core.url_to_fs(path)[0]


def remote_listing(root: str) -> dict[str, dict[str, Any]]:
  """{full path: object info (size, crc32c, ...)} of every object under a remote root, in one listing."""
  fs = _remote_fs(root)
  prefix = root.split("://", 1)[0] + "://"
  found = fs.find(root, detail=True)
  return {(k if "://" in k else prefix + k): v for k, v in found.items() if v.get("type") != "directory"}


def _remote_sizes(root: str) -> dict[str, int]:
  return {k: int(v["size"]) for k, v in remote_listing(root).items()}


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: crc32c rotated right by 15 bits plus a constant (mod 2**32)."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_tfrecord(data: bytes) -> bytes:
  """One record in TFRecord framing (what `tf.io.TFRecordWriter` writes)."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _unframe(path: str, index: int, buf: bytes, expected_len: int | None) -> bytes:
  """Checks one framed record read from `path` and returns its payload."""
  if len(buf) < _HEADER + _FOOTER:
    raise ShardError(f"{path}: record {index} is truncated ({len(buf)} bytes, framing alone needs 16)")
  length_bytes = buf[:8]
  (length,) = struct.unpack("<Q", length_bytes)
  (length_crc,) = struct.unpack("<I", buf[8:12])
  if masked_crc32c(length_bytes) != length_crc:
    raise ShardError(f"{path}: record {index} has a corrupt length field (crc mismatch)")
  if expected_len is not None and length != expected_len:
    raise ShardError(f"{path}: record {index} claims {length} bytes but the offset index leaves "
                     f"{expected_len}; the shard does not match its index")
  if len(buf) < _HEADER + length + _FOOTER:
    raise ShardError(f"{path}: record {index} is truncated: needs {_HEADER + length + _FOOTER} bytes, "
                     f"found {len(buf)}")
  data = buf[_HEADER:_HEADER + length]
  (data_crc,) = struct.unpack("<I", buf[_HEADER + length:_HEADER + length + _FOOTER])
  if masked_crc32c(data) != data_crc:
    raise ShardError(f"{path}: record {index} data is corrupt (crc32c mismatch)")
  return data


def scan_tfrecord(path: str | os.PathLike) -> np.ndarray:
  """Walks a TFRecord file, checking every record's framing; returns the record start offsets."""
  path = os.fspath(path)
  offsets = []
  remote = fileio.is_remote(path)
  with (fileio.path(path).open("rb") if remote else open(path, "rb")) as f:
    size = f.seek(0, io.SEEK_END) if remote else os.path.getsize(path)
    f.seek(0)
    pos = 0
    while pos < size:
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        raise ShardError(f"{path}: record {len(offsets)} is truncated (partial header at byte {pos})")
      (length,) = struct.unpack("<Q", header[:8])
      if pos + _HEADER + length + _FOOTER > size:
        raise ShardError(f"{path}: record {len(offsets)} is truncated: it needs "
                         f"{_HEADER + length + _FOOTER} bytes at byte {pos}, the file ends at {size}")
      _unframe(path, len(offsets), header + f.read(length + _FOOTER), None)
      offsets.append(pos)
      pos += _HEADER + length + _FOOTER
  return np.asarray(offsets, dtype=np.int64)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """Hex sha256 of a file's contents."""
  h = hashlib.sha256()
  with (fileio.path(path).open("rb") if fileio.is_remote(path) else open(path, "rb")) as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def subset_key(subset: int | str | mat.Subset) -> str:
  """The manifest key of a subset ("03")."""
  return f"{mat.get(subset).id:02d}"


@dataclasses.dataclass(frozen=True)
class Shard:
  """One shard file of a split, as the manifest lists it (paths absolute)."""
  path: str
  count: int
  bytes: int
  sha256: str
  offsets: str | None  # sidecar offset index (TFRecord only)


class Manifest:
  """The `manifest.json` of a converted dataset: what is there, and where."""

  def __init__(self, root: str | os.PathLike, data: dict[str, Any]):
    self.root = _root_path(root)
    self.data = data

  @classmethod
  def load(cls, root: str | os.PathLike, check_files: bool = True) -> "Manifest":
    """Reads `root/manifest.json`; refuses a missing, interrupted or inconsistent dataset.

    `root` is a local directory or a `gs://` prefix. With `check_files`, every listed shard must exist with
    the listed byte size (cheap `stat`s; one listing on an object store); `verify()` also checks contents
    against the sha256 sums.
    """
    root = _root_path(root)
    path = root / MANIFEST
    if not path.exists():
      if (root / PARTIAL_MANIFEST).exists():
        raise ManifestError(f"{root}: conversion is incomplete (found {PARTIAL_MANIFEST} but no {MANIFEST}); "
                            "the convert was interrupted or failed: re-run `python -m medcg.data convert` "
                            "with the same arguments to finish it")
      if not root.exists():
        raise ManifestError(f"{root}: no such directory (expected Med-MAT shards written by "
                            "`python -m medcg.data convert`)")
      raise ManifestError(f"{root}: no {MANIFEST}; not a converted Med-MAT dataset "
                          "(run `python -m medcg.data convert --src ... --out ...`)")
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ManifestError(f"{path}: malformed JSON at line {e.lineno} col {e.colno}: {e.msg}") from e
    for key in ("medcg_manifest", "format", "image_size", "subsets"):
      if key not in data:
        raise ManifestError(f"{path}: missing key {key!r}")
    if data["medcg_manifest"] != MANIFEST_VERSION:
      raise ManifestError(f"{path}: manifest version {data['medcg_manifest']}, this medcg reads "
                          f"version {MANIFEST_VERSION}; re-run convert")
    if data["format"] not in FORMATS:
      raise ManifestError(f"{path}: unknown format {data['format']!r}, expected one of {FORMATS}")
    manifest = cls(root, data)
    if check_files:
      manifest._check_files()
    return manifest

  def _check_files(self) -> None:
    if fileio.is_remote(self.root):
      # One listing instead of a request per shard (thousands of shards on a full Med-MAT).
      sizes = _remote_sizes(os.fspath(self.root))
      size_of, has = sizes.get, sizes.__contains__
    else:
      size_of = lambda p: os.path.getsize(p) if os.path.exists(p) else None  # noqa: E731
      has = os.path.exists
    for key, sub in self.data["subsets"].items():
      for split, info in sub["splits"].items():
        for shard in self.shards(key, split):
          size = size_of(shard.path)
          if size is None:
            raise ManifestError(f"{self.root}: subset {key} {split}: shard {shard.path} is missing")
          if size != shard.bytes:
            raise ManifestError(f"{self.root}: subset {key} {split}: shard {shard.path} has {size} bytes, "
                                f"the manifest says {shard.bytes} (truncated or replaced)")
          if shard.offsets is not None and not has(shard.offsets):
            raise ManifestError(f"{self.root}: subset {key} {split}: offset index {shard.offsets} is missing")

  # -- queries ---------------------------------------------------------------------------------------

  @property
  def format(self) -> str:
    return self.data["format"]

  @property
  def image_size(self) -> int:
    return int(self.data["image_size"])

  def _subset(self, subset: int | str | mat.Subset) -> dict[str, Any]:
    key = subset_key(subset)
    if key not in self.data["subsets"]:
      raise KeyError(f"{self.root / MANIFEST}: subset {key} was not converted; "
                     f"available: {sorted(self.data['subsets'])}")
    return self.data["subsets"][key]

  def _split(self, subset: int | str | mat.Subset, split: str) -> dict[str, Any]:
    sub = self._subset(subset)
    if split not in sub["splits"]:
      raise KeyError(f"{self.root / MANIFEST}: subset {subset_key(subset)} has no split {split!r}; "
                     f"available: {sorted(sub['splits'])}")
    return sub["splits"][split]

  def subsets(self, split: str | None = None) -> list[int]:
    """Subset ids with at least one record (in `split`, or in any split)."""
    out = []
    for key, sub in self.data["subsets"].items():
      splits = [split] if split is not None else list(sub["splits"])
      if any(sub["splits"].get(s, {}).get("count", 0) > 0 for s in splits):
        out.append(int(key))
    return sorted(out)

  def splits(self, subset: int | str | mat.Subset) -> list[str]:
    """Splits present for a subset (possibly with zero records if all were skipped)."""
    return sorted(self._subset(subset)["splits"])

  def count(self, subset: int | str | mat.Subset, split: str) -> int:
    """Number of records of a subset's split."""
    return int(self._split(subset, split)["count"])

  def labels(self, subset: int | str | mat.Subset, split: str) -> dict[str, int]:
    """Label histogram {caption: count} of a subset's split."""
    return dict(self._split(subset, split)["labels"])

  def triplet(self, subset: int | str | mat.Subset) -> tuple[str, str, str]:
    """The MAT triplet (modality, area, coarse task) recorded for a subset."""
    return tuple(self._subset(subset)["triplet"])

  def skipped(self, subset: int | str | mat.Subset, split: str) -> list[dict[str, Any]]:
    """Source records left out by `--on_error skip`, each with file, index, field and reason."""
    return list(self._split(subset, split).get("skipped", []))

  def shards(self, subset: int | str | mat.Subset, split: str) -> list[Shard]:
    """The shard files of a subset's split, in record order."""
    out = []
    for s in self._split(subset, split)["shards"]:
      offsets = str(self.root / s["offsets"]) if s.get("offsets") else None
      out.append(Shard(str(self.root / s["file"]), int(s["count"]), int(s["bytes"]), s["sha256"], offsets))
    return out

  def tfds_dir(self, subset: int | str | mat.Subset) -> Path:  # an epath.Path on gs://
    """The TFDS dataset directory of a subset (for `tfds.builder_from_directory`)."""
    return self.root / self._subset(subset)["dir"]

  def verify(self, subsets: Sequence[int | str] | None = None) -> dict[str, int]:
    """Checks every shard's sha256 and record count against the manifest; raises ShardError naming the first
    bad file. Returns what was checked: {"subsets": n, "records": n, "shards": n}."""
    keys = [subset_key(s) for s in subsets] if subsets is not None else list(self.data["subsets"])
    checked = {"subsets": len(keys), "records": 0, "shards": 0}
    for key in keys:
      for split in self.splits(key):
        for shard in self.shards(key, split):
          digest = sha256_file(shard.path)
          if digest != shard.sha256:
            raise ShardError(f"{shard.path}: sha256 {digest} differs from the manifest's {shard.sha256}")
          found = self._record_count(shard)
          if found != shard.count:
            raise ShardError(f"{shard.path}: holds {found} records, the manifest says {shard.count}")
          checked["records"] += shard.count
          checked["shards"] += 1
    return checked

  def _record_count(self, shard: Shard) -> int:
    """Records in a shard, from its offset index (TFRecord) or its own footer (ArrayRecord)."""
    if shard.offsets is not None:
      try:
        return len(_load_offsets(shard.offsets))
      except (OSError, ValueError) as e:
        raise ShardError(f"{shard.offsets}: unreadable offset index for shard {shard.path} ({e})") from e
    if self.format == "array_record" and not fileio.is_remote(shard.path):
      from array_record.python import array_record_module
      reader = array_record_module.ArrayRecordReader(shard.path)
      try:
        return reader.num_records()
      finally:
        reader.close()
    return shard.count  # a remote ArrayRecord shard: unreadable here (ArrayRecordSource says why); sha256 only


def _load_offsets(path: str) -> np.ndarray:
  if fileio.is_remote(path):
    return np.load(io.BytesIO(fileio.path(path).read_bytes()), allow_pickle=False)
  return np.load(path)


class TFRecordSource:
  """Random access to the records of TFRecord shards through their offset indexes.

  A grain `RandomAccessDataSource`: `len(src)` records, `src[i]` is one serialized `tf.train.Example`.
  Local files are opened lazily per process (grain workers fork/spawn) and read with `os.pread`; remote
  shards (`gs://`) are read with one ranged GET per record through a filesystem resolved per process.
  Neither keeps a file position, so one source serves many threads.
  """

  def __init__(self, shards: Sequence[Shard]):
    self._paths = [s.path for s in shards]
    self._remote = [fileio.is_remote(p) for p in self._paths]
    self._starts: list[np.ndarray] = []
    self._ends: list[np.ndarray] = []
    for s in shards:
      if s.offsets is None:
        raise ShardError(f"{s.path}: no offset index recorded for this TFRecord shard")

    def load(s: Shard) -> np.ndarray:
      try:
        return _load_offsets(s.offsets)
      except (OSError, ValueError) as e:
        raise ShardError(f"{s.offsets}: unreadable offset index for shard {s.path} ({e})") from e

    if any(self._remote):  # one round trip per index: overlap them
      with futures.ThreadPoolExecutor(max_workers=16) as pool:
        loaded = list(pool.map(load, shards))
    else:
      loaded = [load(s) for s in shards]
    for s, offsets in zip(shards, loaded):
      if offsets.ndim != 1 or len(offsets) != s.count:
        raise ShardError(f"{s.offsets}: offset index lists {offsets.size} records, the manifest says "
                         f"{s.count} for shard {s.path}")
      self._starts.append(offsets.astype(np.int64))
      self._ends.append(np.append(offsets[1:], s.bytes).astype(np.int64))
    self._cum = np.cumsum([0] + [s.count for s in shards]).tolist()
    self._fds: dict[int, int] = {}
    self._fs = None  # the fsspec filesystem of remote shards, per process
    self._lock = threading.Lock()
    self._pid = os.getpid()

  def __len__(self) -> int:
    return self._cum[-1]

  def _locate(self, index: int) -> tuple[int, int]:
    n = len(self)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"record {index} out of range for a source of {n} records")
    shard = bisect.bisect_right(self._cum, index) - 1
    return shard, index - self._cum[shard]

  def _after_fork(self) -> None:
    if self._pid != os.getpid():  # forked: never share descriptors or HTTP sessions with the parent
      self._fds, self._fs, self._lock, self._pid = {}, None, threading.Lock(), os.getpid()

  def _fd(self, shard: int) -> int:
    self._after_fork()
    fd = self._fds.get(shard)
    if fd is None:
      try:
        fd = os.open(self._paths[shard], os.O_RDONLY)
      except OSError as e:
        raise ShardError(f"{self._paths[shard]}: cannot open shard ({e.strerror})") from e
      self._fds[shard] = fd
    return fd

  def __getitem__(self, index: int) -> bytes:
    shard, local = self._locate(int(index))
    start, end = int(self._starts[shard][local]), int(self._ends[shard][local])
    buf = self._read_remote(shard, start, end) if self._remote[shard] else os.pread(self._fd(shard), end - start, start)
    return _unframe(self._paths[shard], local, buf, end - start - _HEADER - _FOOTER)

  def _read_remote(self, shard: int, start: int, end: int) -> bytes:
    self._after_fork()
    if self._fs is None:
      with self._lock:
        if self._fs is None:
          self._fs = _remote_fs(self._paths[shard])
    try:
      return self._fs.cat_file(self._paths[shard], start=start, end=end)
    except FileNotFoundError as e:
      raise ShardError(f"{self._paths[shard]}: cannot read shard (not found)") from e

  def close(self) -> None:
    """Closes the open file descriptors (they reopen on the next read)."""
    if self._pid == os.getpid():
      for fd in self._fds.values():
        os.close(fd)
    self._fds = {}

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"], state["_fs"] = {}, None
    del state["_lock"]  # not picklable; a fresh one per process
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._pid = os.getpid()

  def __repr__(self) -> str:
    return f"TFRecordSource({len(self)} records in {len(self._paths)} shards, first={self._paths[:1]})"


class ArrayRecordSource:
  """Random access to ArrayRecord shards via grain, with the shard named in errors."""

  def __init__(self, shards: Sequence[Shard]):
    import grain  # deferred: only ArrayRecord users pay for the import
    self._paths = [s.path for s in shards]
    remote = [p for p in self._paths if fileio.is_remote(p)]
    if remote:
      # array_record's reader opens local files only (a gs:// path is taken as a missing local file).
      raise ShardError(f"{os.path.dirname(remote[0])}: ArrayRecord shards cannot be read from "
                       f"{fileio.scheme(remote[0])}://; convert with the default `--format tfrecord` "
                       "(readable from object stores), or copy the shards to a local disk")
    self._cum = np.cumsum([0] + [s.count for s in shards]).tolist()
    self._source = grain.sources.ArrayRecordDataSource(self._paths) if self._paths else None
    found = len(self._source) if self._source is not None else 0
    if found != self._cum[-1]:
      raise ShardError(f"{self._paths}: ArrayRecord shards hold {found} records, the manifest says {self._cum[-1]}")

  def __len__(self) -> int:
    return self._cum[-1]

  def __getitem__(self, index: int) -> bytes:
    n = len(self)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"record {index} out of range for a source of {n} records")
    try:
      return self._source[index]
    except Exception as e:
      shard = bisect.bisect_right(self._cum, index) - 1
      raise ShardError(f"{self._paths[shard]}: record {index - self._cum[shard]} unreadable ({e})") from e

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self)} records in {len(self._paths)} shards, first={self._paths[:1]})"


def subset_source(root: str | os.PathLike | Manifest, subset: int | str | mat.Subset,
                  split: str) -> TFRecordSource | ArrayRecordSource:
  """A grain-compatible random-access source over one subset's split (serialized examples)."""
  manifest = root if isinstance(root, Manifest) else Manifest.load(root)
  shards = manifest.shards(subset, split)
  if manifest.format == "tfrecord":
    return TFRecordSource(shards)
  return ArrayRecordSource(shards)
