"""What every run writes next to its checkpoints: resolved config, git commit, package versions, devices."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from typing import Any

import jax

from medcg import fileio
from medcg.fileio import atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections", "numpy",
            "tensorflow-datasets", "medcg")


def git_commit(repo_dir: str | None = None) -> str:
  repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    out = subprocess.run(["git", "-C", repo_dir, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", repo_dir, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
    if out.returncode:
      return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def package_versions() -> dict[str, str]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def device_info() -> dict[str, Any]:
  return {
      "backend": jax.default_backend(),
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "local_device_count": jax.local_device_count(),
      "host": platform.node(),
      "python": sys.version.split()[0],
  }


def write_run_record(workdir: str, config, *, resumed_from: int | None = None,
                     changes: list | None = None) -> dict[str, Any]:
  """config.json (resolved) and one more attempt in run.json: commit, versions, devices, argv, resumed step.

  The history is kept (`medcg.train.provenance.record_attempt`), so a run that was restarted, extended or moved
  to other hardware says so. `changes` are the config keys this attempt changed (see provenance.RESUMABLE).
  """
  from medcg.train import provenance
  fileio.atomic_write_text(fileio.join(workdir, provenance.CONFIG_FILE),
                           config.to_json_best_effort(indent=2, sort_keys=True))
  attempt = {
      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "git_commit": git_commit(),
      "packages": package_versions(),
      "devices": device_info(),
      "host_count": jax.process_count(),
      "resumed_from_step": resumed_from,
      "config_changes": [{"key": k, "old": a, "new": b} for k, a, b in (changes or [])],
      "argv": sys.argv,
  }
  return provenance.record_attempt(workdir, attempt)
