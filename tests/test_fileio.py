"""The storage layer: local and gs:// paths alike (gs:// on the fake GCS of conftest.py)."""
import importlib.util
import json
import os

import pytest

from medcg import fileio


def test_schemes():
  assert fileio.scheme("gs://b/x") == "gs" and fileio.is_remote("gs://b/x")
  assert fileio.scheme("runs/x") is None and fileio.scheme("/tmp/a:b") is None
  assert fileio.join("gs://b/r", "cfg", "run") == "gs://b/r/cfg/run"
  assert fileio.absolute("gs://b/r") == "gs://b/r"
  assert fileio.absolute("runs/x") == os.path.abspath("runs/x")


def test_a_missing_backend_names_the_package(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
  monkeypatch.setattr(fileio, "_checked", set())
  with pytest.raises(fileio.StorageError, match=r"gs://b/runs/x: gs:// paths need the gcsfs package.*pip install gcsfs"):
    fileio.path("gs://b/runs/x")
  with pytest.raises(fileio.StorageError, match="unsupported storage scheme ftp://"):
    fileio.path("ftp://host/x")


def test_the_trainer_reports_a_missing_backend_in_one_line(monkeypatch, tmp_path):
  import subprocess, sys
  from test_train import env
  code = ("import importlib.util, runpy, sys; real = importlib.util.find_spec; "
          "importlib.util.find_spec = lambda n, *a: None if n == 'gcsfs' else real(n, *a); "
          "sys.argv = ['medcg.train', '--config=configs/demo.py', '--workdir=gs://b/runs/x']; "
          "runpy.run_module('medcg.train', run_name='__main__')")
  r = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=300,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "gcsfs" in r.stderr and "pip install gcsfs" in r.stderr


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_atomic_writes_reads_and_copies(where, tmp_path, request):
  root = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_root")
  p = fileio.join(root, "a", "b.json")
  fileio.atomic_write_json(p, {"x": [1, 2]})
  fileio.atomic_write_json(p, {"x": [3]})  # overwrite in place
  assert fileio.read_json(p) == {"x": [3]}
  fileio.atomic_write_text(fileio.join(root, "bad.json"), "{not json")
  with pytest.raises(ValueError, match="bad.json: malformed JSON"):
    fileio.read_json(fileio.join(root, "bad.json"))
  copied = fileio.copy_tree(fileio.join(root, "a"), str(tmp_path / "copy"))
  assert copied == ["b.json"] and json.loads((tmp_path / "copy" / "b.json").read_text()) == {"x": [3]}
  if where == "local":
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_jsonl_log_keeps_each_step_once_across_restarts(where, tmp_path, request):
  root = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_root")
  p = fileio.join(root, "metrics.jsonl")
  log = fileio.JsonlLog(p)
  for step in (1, 2, 3, 4):
    log.append({"step": step, "loss": float(step)}, flush=False)
  log.flush()
  if where == "local":  # a crash tore the last line
    with open(p, "a") as f:
      f.write('{"step": 5, "lo')
  resumed = fileio.JsonlLog(p, keep_through=2)  # restored from the step-2 checkpoint
  assert [r["step"] for r in resumed.rows] == [1, 2]
  assert [json.loads(x)["step"] for x in fileio.read_text(p).splitlines()] == [1, 2]  # rewritten at once
  resumed.append({"step": 3, "loss": 3.5})
  assert [json.loads(x) for x in fileio.read_text(p).splitlines()][-1] == {"step": 3, "loss": 3.5}


def test_store_failures_become_one_line_and_bugs_do_not():
  from medcg.errors import UserError, as_user_error

  class ClientConnectorDNSError(OSError):  # what gcsfs raises, after its retries, when the store is unreachable
    pass
  ClientConnectorDNSError.__module__ = "aiohttp.client_exceptions"
  try:
    try:
      raise ClientConnectorDNSError("Cannot connect to host storage.googleapis.com:443")
    except OSError as inner:
      raise RuntimeError("orbax: save failed") from inner  # wrapped on the way up
  except RuntimeError as e:
    err = as_user_error(e)
  assert isinstance(err, UserError)
  assert "storage.googleapis.com" in str(err) and "credentials" in str(err) and "\n" not in str(err)
  assert as_user_error(KeyError("a bug")) is None
  assert as_user_error(fileio.StorageError("x")) is not None
