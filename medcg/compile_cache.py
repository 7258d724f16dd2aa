"""JAX's persistent compilation cache, on by default for every medcg process (train, eval, demo, tests).

A second process that compiles the same program (same shapes, flags, devices and jax version: JAX keys the
entry on all of them) loads the executable from disk instead of compiling it, so a resumed run, each demo arm
and each eval start in seconds. The cache folder is, first found:

  1. the `--compilation_cache_dir` flag of the CLI (`enable(path)`); "" or "off" turns the cache off;
  2. the environment variable MEDCG_COMPILATION_CACHE (same values; subprocesses inherit it);
  3. `$XDG_CACHE_HOME/medcg/jax`, else `~/.cache/medcg/jax`.

Entries are immutable files keyed by a hash; several processes may share a folder. Delete it to reclaim disk.
A gs:// folder works too (JAX writes through etils.epath), for pods that share a bucket.
"""
from __future__ import annotations

import contextlib
import os

ENV = "MEDCG_COMPILATION_CACHE"
OFF = ("", "off", "none", "0")
# Programs that compile faster than this are not written (JAX's default is 1 s; at tiny sizes most of
# medcg's steps compile in 0.3-3 s, and reading an entry back takes milliseconds).
MIN_COMPILE_SECONDS = 0.2


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "medcg", "jax")


def resolve(path: str | None = None) -> str | None:
  """The folder to use (None: the cache is off), from `path`, then $MEDCG_COMPILATION_CACHE, then the default."""
  if path is None:
    path = os.environ.get(ENV)
  if path is None:
    return default_dir()
  return None if path.strip().lower() in OFF else os.path.expanduser(path)


def enable(path: str | None = None) -> str | None:
  """Points JAX's persistent compilation cache at `resolve(path)`; returns the folder (None when off).

  Call before the first compilation. Safe to call again (the last call wins for later compilations).
  """
  import jax
  folder = resolve(path)
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if "://" not in folder:
    os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return folder


@contextlib.contextmanager
def not_written():
  """Compiles inside write no cache entries (reads still hit). For deviceless (compile-only) TPU and GPU
  compiles: their executables cannot be loaded back without the device ("PjRtCompiler must be constructed
  with a Client"), so an entry would only make the next process warn when it reads it."""
  import jax
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
