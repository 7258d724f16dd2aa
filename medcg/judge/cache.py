"""Content-addressed SQLite store of successful judgements: the resume journal of a judge run.

The key is a SHA-256 over everything that can change a judgement (sample id, question, image bytes,
both answers as shown, criteria, order, prompt template version, judge identity, decoding settings),
so a cached reply is replayed only for exactly the same call. Only parsed judgements go in (a failure
replayed from a cache would make retrying useless). The label policy is not part of the key (it does not
change what the judge is asked or replies): the runner re-parses the cached raw text under the run's
policy, and the stored label only records what the writing run read. Each `put` commits at once, so a killed run keeps
every judgement it finished; WAL mode lets readers and one writer share the file, and a lock makes a
single `JudgeCache` safe to use from several threads.

The cache stays on a local disk, even when the run's outputs go to gs://: SQLite needs file locks and
in-place writes, which object stores do not have.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time

from medcg import fileio
from medcg.errors import UserError


class JudgeCacheError(UserError):
  """A judge cache path SQLite cannot use (a gs:// path)."""


def check_local(path: str, key: str = "cache.path") -> None:
  """A gs:// cache is one clear error naming the config key: SQLite needs a local file."""
  if fileio.is_remote(path):
    raise JudgeCacheError(f"config {key}={path!r}: the judge cache is an SQLite file, and SQLite needs a local "
                          "path (file locks and in-place writes, which object stores lack); set "
                          "--config.cache.path to a local file, e.g. runs/judge_cache.sqlite")


def cache_key(**fields) -> str:
  """SHA-256 of the fields as canonical JSON (sorted keys), so equal content gives equal keys."""
  blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
  """SQLite judgement store: `get(key)` -> (raw text, label) or None; `put(key, raw, label)`."""

  def __init__(self, path: str):
    check_local(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    self.path = path
    self._lock = threading.Lock()
    try:
      self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
      self._db.execute("PRAGMA journal_mode=WAL")
      self._db.execute("PRAGMA synchronous=NORMAL")
      self._db.execute(
          "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, raw TEXT NOT NULL,"
          " label TEXT NOT NULL, created REAL NOT NULL)")
    except sqlite3.DatabaseError as e:
      raise sqlite3.DatabaseError(f"judge cache {path}: {e}") from None

  def get(self, key: str) -> tuple[str, str] | None:
    with self._lock:
      row = self._db.execute("SELECT raw, label FROM judgements WHERE key = ?", (key,)).fetchone()
    return (row[0], row[1]) if row else None

  def put(self, key: str, raw: str, label: str) -> None:
    if not label:
      raise ValueError("only parsed judgements are cached")
    with self._lock:
      self._db.execute("INSERT OR REPLACE INTO judgements (key, raw, label, created) VALUES (?, ?, ?, ?)",
                       (key, raw, label, time.time()))

  def __len__(self) -> int:
    with self._lock:
      return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

  def close(self) -> None:
    with self._lock:
      self._db.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
