"""Storage: one path layer for local disks and object stores (`gs://`), on `etils.epath`.

Every read and write of workdirs, shards, manifests, tokenizers, metrics, reports, plots and sweep roots goes
through `path()` (an `epath.Path`), so the same command takes `runs/x` or `gs://bucket/runs/x`. orbax and tfds
use the same library; orbax writes arrays to `gs://` through tensorstore's own GCS driver.

Backends. Local paths use the OS. `gs://` goes through fsspec's `gcsfs` (`pip install gcsfs`), never through
TensorFlow's gfile: epath would pick gfile whenever TensorFlow is installed, and the training path must not
import TensorFlow (DEVELOPING.md), so `EPATH_USE_TF=false` is the default here. Listing caches are off, since
on a pod other hosts write the same workdir and a cached listing would hide their files.

Atomic writes. Locally: a temporary file beside the target, fsync, `os.replace`: a reader sees the old file
or the new one, never half. On an object store an object becomes visible only when its upload completes, and
an overwrite replaces the object whole, so the final name is written directly; a rename there is a copy plus
a delete (neither atomic nor cheap), so it is never used for atomicity. Appends do not exist on object stores:
logs that grow (`JsonlLog`) are rewritten whole.
"""
from __future__ import annotations

import json
import os
import secrets
from typing import Any, Callable, Iterable

os.environ.setdefault("EPATH_USE_TF", "false")  # before epath picks a backend (see the module docstring)

from etils import epath  # noqa: E402

from medcg.errors import UserError  # noqa: E402

# URI scheme -> (the fsspec backend package epath needs, how to install it).
BACKENDS = {"gs": ("gcsfs", "pip install gcsfs"), "s3": ("s3fs", "pip install s3fs")}

PathLike = str | os.PathLike


class StorageError(UserError, OSError):
  """A path this machine cannot use (a missing backend package, an unsupported scheme)."""


def scheme(p: PathLike) -> str | None:
  """"gs" for gs://bucket/x, None for a local path."""
  s = os.fspath(p)
  head, sep, _ = s.partition("://")
  return head if sep and head.isalnum() else None


def is_remote(p: PathLike) -> bool:
  return scheme(p) is not None


_checked: set[str] = set()


def _check_backend(name: str, s: str) -> None:
  if name in _checked:
    return
  if name not in BACKENDS:
    raise StorageError(f"{s}: unsupported storage scheme {name}:// (medcg reads local paths and "
                       f"{', '.join(k + '://' for k in BACKENDS)})")
  package, install = BACKENDS[name]
  import importlib.util
  if importlib.util.find_spec(package) is None:
    raise StorageError(f"{s}: {name}:// paths need the {package} package, which is not installed ({install})")
  import fsspec.config
  for protocol in ("gcs", "gs") if name == "gs" else (name,):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
  _checked.add(name)


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path`; a remote scheme is checked for its backend package first (one clear error)."""
  if isinstance(p, epath.Path) and not is_remote(p):
    return p
  s = os.fspath(p)
  name = scheme(s)
  if name is not None:
    _check_backend(name, s)
  return epath.Path(s)


def absolute(p: PathLike) -> str:
  """A path every process (and every host sharing the store) resolves the same way: remote ones unchanged."""
  s = os.fspath(p)
  return s if is_remote(s) else os.path.abspath(s)


def join(*parts: PathLike) -> str:
  """os.path.join that keeps "gs://" intact (a string, for configs and command lines)."""
  return os.fspath(path(parts[0]).joinpath(*[os.fspath(x) for x in parts[1:]]))


# ------------------------------------------------------------------------------------------------------
# Whole-file reads and atomic writes.
# ------------------------------------------------------------------------------------------------------
def exists(p: PathLike) -> bool:
  return path(p).exists()


def read_text(p: PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def read_json(p: PathLike) -> Any:
  """Parsed JSON; malformed content is a ValueError naming the file."""
  text = read_text(p)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{os.fspath(p)}: malformed JSON ({e})") from e


def read_jsonl(p: PathLike) -> list[tuple[int, Any]]:
  """(line number, parsed row) for every non-blank line; a malformed line is a ValueError naming file and line."""
  rows = []
  for lineno, line in enumerate(read_text(p).splitlines(), 1):
    if line.strip():
      try:
        rows.append((lineno, json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(p)}:{lineno}: not JSON ({e})") from None
  return rows


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def _create_temp(folder: str, name: str) -> tuple[int, str]:
  """A new file `.NAME.<random>.tmp` in `folder`, opened for writing, with the mode `open(..., "w")` gives.

  Not `tempfile.mkstemp`: it creates files 0600 whatever the umask, and `os.replace` keeps that mode, so
  collaborators on shared storage could not read configs, run records or results. Creating with 0666 lets the
  kernel apply the umask (0644 under 022), without touching the process-wide umask (other threads).
  """
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
  for _ in range(100):
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
      return os.open(tmp, flags, 0o666), tmp
    except FileExistsError:
      continue
  raise FileExistsError(f"{folder}: no free temporary name for {name}")


def atomic_write_bytes(p: PathLike, data: bytes) -> None:
  """Readers see the old content or the new, never part (see the module docstring for object stores)."""
  if is_remote(p):
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  p = os.fspath(p)
  folder = os.path.dirname(os.path.abspath(p))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = _create_temp(folder, os.path.basename(p))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(p: PathLike, text: str) -> None:
  atomic_write_bytes(p, text.encode("utf-8"))


def atomic_write_json(p: PathLike, obj: Any) -> None:
  atomic_write_text(p, json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file between any two stores (local <-> gs://), atomically at the destination."""
  atomic_write_bytes(dst, path(src).read_bytes())


def copy_tree(src: PathLike, dst: PathLike, *, skip: Callable[[str], bool] | None = None) -> list[str]:
  """Copies every file under `src` to the same relative path under `dst`; returns the relative paths copied.

  `skip(relative_path)` leaves a file out (e.g. one already at the destination).
  """
  bare = lambda p: os.fspath(p).partition("://")[2] if is_remote(p) else os.fspath(p)
  copied = []
  for root, _, files in path(src).walk():
    for name in sorted(files):  # fsspec walks give "bucket/dir" (no scheme): compare paths without it
      rel = os.path.relpath(os.path.join(bare(root), name), bare(path(src)))
      if skip is not None and skip(rel):
        continue
      copy_file(path(src) / rel, path(dst) / rel)
      copied.append(rel)
  return copied


# ------------------------------------------------------------------------------------------------------
# Logs that grow: JSON lines kept in memory and rewritten whole.
# ------------------------------------------------------------------------------------------------------
class JsonlLog:
  """A JSON-lines file of rows with a "step", in which a restarted run leaves each step once.

  `JsonlLog(p, keep_through=step)` drops the rows an earlier attempt wrote after `step` (the step it resumes
  from) and a torn last line, rewriting the file once. Then a local file is appended to line by line (each
  line is flushed, so a crash loses at most the line being written); an object store cannot append, so there
  the rows are kept in memory and the whole object is rewritten on `flush()`, which the caller spaces out
  (e.g. every half minute and at checkpoints).
  """

  def __init__(self, p: PathLike, keep_through: int | None = None):
    self.path = path(p)
    self.remote = is_remote(p)
    self.rows: list[dict[str, Any]] = []
    self._dirty = False
    if self.path.exists():
      for line in self.path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # the line a crash tore
          self._dirty = True
          continue
        if keep_through is not None and int(row.get("step", 0)) > keep_through:
          self._dirty = True
          continue
        self.rows.append(row)
    if self._dirty:
      self._rewrite()

  def append(self, row: dict[str, Any], flush: bool = True) -> None:
    self.rows.append(row)
    if self.remote:
      self._dirty = True
      if flush:
        self.flush()
      return
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(self.path))), exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row, default=str) + "\n")

  def flush(self) -> None:
    if self._dirty:
      self._rewrite()

  def _rewrite(self) -> None:
    atomic_write_text(self.path, "".join(json.dumps(r, default=str) + "\n" for r in self.rows))
    self._dirty = False
