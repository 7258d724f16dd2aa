"""The persistent compilation cache: where it goes, how to turn it off, and that a second process hits it."""
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from medcg import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_order(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.resolve() == str(tmp_path / "xdg" / "medcg" / "jax")
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
  assert compile_cache.resolve() == str(tmp_path / "env")
  assert compile_cache.resolve(str(tmp_path / "flag")) == str(tmp_path / "flag")   # the flag wins
  for off in ("off", "", "OFF", "none"):
    assert compile_cache.resolve(off) is None
  monkeypatch.setenv(compile_cache.ENV, "off")
  assert compile_cache.resolve() is None


def test_enable_and_disable(tmp_path):
  before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  try:
    assert compile_cache.enable(str(tmp_path / "c")) == str(tmp_path / "c")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    assert compile_cache.enable("off") is None and not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", before[0])
    jax.config.update("jax_compilation_cache_dir", before[1])


PROGRAM = """
import sys, time
import jax, jax.numpy as jnp
from medcg import compile_cache
compile_cache.enable()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # however fast this machine compiles f
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
def f(x):
  for _ in range(40):
    x = jnp.tanh(x @ x.T) + x
  return x
jax.jit(f).lower(jnp.ones((128, 128))).compile()
print("hits", hits.count("/jax/compilation_cache/cache_hits"))
"""


def test_a_second_process_loads_the_first_ones_program(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, MEDCG_COMPILATION_CACHE=str(cache), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, cwd=ROOT, capture_output=True)
  entries = sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_f-"))
  assert len(entries) == 1, sorted(p.name for p in cache.iterdir())
  mtime = (cache / entries[0]).stat().st_mtime_ns
  # The second process finds the entry (JAX records a cache hit) and writes nothing new for f.
  proc = subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, cwd=ROOT, capture_output=True,
                        text=True)
  assert sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_f-")) == entries
  assert (cache / entries[0]).stat().st_mtime_ns == mtime
  assert int(proc.stdout.split("hits")[1]) >= 1, proc.stdout + proc.stderr[-2000:]  # f (and jnp.ones' programs)
  off = subprocess.run([sys.executable, "-c", PROGRAM], env=dict(env, MEDCG_COMPILATION_CACHE="off"), check=True,
                       cwd=ROOT, capture_output=True, text=True)
  assert "hits 0" in off.stdout


DEVICELESS = """
import numpy as np
import jax, jax.numpy as jnp
from medcg import compile_cache
from medcg.aot import step_compile, targets
compile_cache.enable()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
devs = targets.devices(targets.get("v5e-4"))
mesh = jax.sharding.Mesh(np.array(devs), ("x",))
s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=s)
r = step_compile._compile("f", lambda: jax.jit(lambda a: jnp.tanh(a @ a.T)).lower(x))
assert r.compiled is not None
jax.jit(lambda a: jnp.tanh(a @ a.T))(jnp.ones((64, 64)))  # a CPU program: still written
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_deviceless_compiles_write_no_entries_a_later_process_cannot_load(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, MEDCG_COMPILATION_CACHE=str(cache), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  for _ in range(2):  # the second would warn "Error reading persistent compilation cache entry" on a TPU entry
    proc = subprocess.run([sys.executable, "-c", DEVICELESS], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Error reading persistent compilation cache" not in proc.stderr, proc.stderr[-3000:]
  assert len(list(cache.iterdir())) >= 1  # the CPU program's entry: the cache itself stayed on
