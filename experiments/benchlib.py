"""Shared by the benchmark scripts: timing that waits for the device."""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np


def timed(fn: Callable[[], Any], reps: int) -> float:
  """Median wall seconds of `reps` calls of `fn()` after one warm-up call (compilation), each call waited on."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))
