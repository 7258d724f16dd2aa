"""TensorBoard event files through medcg's storage layer, so `tb/` works in a local or a gs:// workdir.

tensorboardX writes events through a per-scheme "record writer" it looks up by the path's prefix. Its own gs://
writer needs google-cloud-storage and a blob generation it never refreshes; medcg registers one writer for every
remote scheme of `medcg.fileio` instead, which buffers the file and rewrites the whole object on each flush (an
object store has no append; tensorboardX flushes every `flush_secs` and on close, and a run's scalar events
stay small). No TensorFlow is involved. `tensorboard --logdir gs://...` reads the result.

Restarts: `summary_writer(logdir, purge_step=N)` writes a SessionLog START at step N, which makes TensorBoard
drop the events of earlier files at steps >= N, so the steps an interrupted attempt logged after its last
checkpoint appear once, from the attempt that ran them again.
"""
from __future__ import annotations

import io

from medcg import fileio


class _ObjectRecordWriter:
  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()
    self.closed = False

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    fileio.atomic_write_bytes(self.path, self.buffer.getvalue())

  def close(self) -> None:
    if not self.closed:
      self.flush()
      self.closed = True


class _ObjectRecordWriterFactory:
  def open(self, path: str) -> _ObjectRecordWriter:
    fileio.path(path)  # a missing backend package fails here, naming it
    return _ObjectRecordWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories to create


def _register() -> None:
  from tensorboardX import record_writer
  for name in fileio.BACKENDS:
    record_writer.register_writer_factory(name, _ObjectRecordWriterFactory())


def summary_writer(logdir: str, purge_step: int | None = None, flush_secs: int = 60):
  """A tensorboardX SummaryWriter for a local or remote `logdir` (see the module docstring)."""
  from tensorboardX import SummaryWriter
  _register()
  return SummaryWriter(logdir, purge_step=purge_step, flush_secs=flush_secs)
