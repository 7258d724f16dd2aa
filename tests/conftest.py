"""Test setup: 8 fake CPU devices for sharding tests, CPU only, nothing downloaded."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# XLA:CPU's concurrency-optimised scheduler lets the 8 fake devices (threads on 2 cores) start independent
# collectives in different orders; with fsdp x tensor meshes (e.g. the Qwen2-VL towers at fsdp=4, tensor=2) their
# rendezvous then wait on each other until XLA aborts the process after 40 s. The default scheduler keeps one order.
CPU_COLLECTIVE_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
  _flags = f"{_flags} {CPU_COLLECTIVE_FLAGS}"
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TPU AOT tests load libtpu compile-only (no chips): its process lock must not fail a concurrent compile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent compilation cache for the whole run (medcg/compile_cache.py): a trainer subprocess, a later test
# with the same shapes, or the next run loads an executable instead of compiling it. Kept apart from the user's own
# cache; MEDCG_COMPILATION_CACHE=off runs every compile cold.
os.environ.setdefault("MEDCG_COMPILATION_CACHE", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "medcg", "jax-tests"))

import pytest  # noqa: E402

from medcg import compile_cache  # noqa: E402

compile_cache.enable()


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> str:
  """Tiny SynthMAT shards (subsets 03, 05, 28; 32 px) shared by the tests that train or evaluate.

  ArrayRecord keeps TensorFlow out of the test process (TFRecord conversion is tested in test_convert.py).
  """
  from medcg.data import synth
  from medcg.data.__main__ import main as data_main
  root = tmp_path_factory.mktemp("synthmat")
  synth.write_synthmat(root / "raw", image_size=32, per_subset=24, test_per_subset=12, seed=0,
                       subsets=[3, 5, 28], progress=False)
  rc = data_main(["convert", "--src", str(root / "raw"), "--out", str(root / "shards"), "--image-size", "32",
                  "--format", "array_record", "--no-progress"])
  assert rc in (0, None)
  return str(root / "shards")


# ------------------------------------------------------------------------------------------------------
# A fake Google Cloud Storage on loopback: gcp-storage-emulator speaks the GCS JSON API, so the real
# clients run against it: gcsfs (what epath uses for gs://) and tensorstore's GCS driver (what orbax writes
# arrays with). Subprocesses (trainers under test) inherit the environment and reach the same server.
# ------------------------------------------------------------------------------------------------------
FAKE_GCS_BUCKET = "medcg-test"


def _add_generation_headers() -> None:
  """Real GCS sends an object's generation with its bytes (x-goog-generation); tensorstore's GCS driver needs it
  (orbax's OCDBT manifests are read and rewritten by generation). The emulator omits it: add it to downloads."""
  from gcp_storage_emulator import server as srv
  from gcp_storage_emulator.handlers import objects

  def with_generation(fn):
    def handler(request, response, storage, *args, **kwargs):
      fn(request, response, storage, *args, **kwargs)
      if response.status.value in (200, 206):
        try:
          obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not an object request, or it vanished meanwhile
          return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return handler

  wrapped = {objects.download: with_generation(objects.download), objects.get: with_generation(objects.get)}
  srv.HANDLERS = tuple((regex, {m: wrapped.get(f, f) for m, f in methods.items()}) for regex, methods in srv.HANDLERS)


@pytest.fixture(scope="session")
def _fake_gcs_server(tmp_path_factory):
  import socket
  from gcp_storage_emulator.server import create_server
  _add_generation_headers()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = create_server("127.0.0.1", port, in_memory=False, default_bucket=FAKE_GCS_BUCKET,
                         data_dir=str(tmp_path_factory.mktemp("fake_gcs")))
  server._api.daemon = True  # never keeps pytest alive
  server.start()
  httpd, report = server._api._httpd, server._api._httpd.handle_error

  def handle_error(request, client_address):  # a client that hung up early is no error worth a traceback
    import sys
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      report(request, client_address)
  httpd.handle_error = handle_error
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url,             # gcsfs
         "TENSORSTORE_GCS_HTTP_URL": url,          # tensorstore (orbax arrays)
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # tensorstore: no credential lookup
         "EPATH_USE_TF": "false"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield url
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()


@pytest.fixture
def gcs_root(_fake_gcs_server) -> str:
  """A fresh gs:// prefix on the fake store, e.g. gs://medcg-test/3f2a.../ (no trailing slash)."""
  import uuid
  return f"gs://{FAKE_GCS_BUCKET}/{uuid.uuid4().hex[:12]}"
