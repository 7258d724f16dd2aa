"""Test setup: 8 fake CPU devices for sharding tests, CPU only, nothing downloaded."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> str:
  """Tiny SynthMAT shards (subsets 03, 05, 28; 32 px) shared by the tests that train or evaluate.

  ArrayRecord keeps TensorFlow out of the test process (TFRecord conversion is tested in test_convert.py).
  """
  from medcg.data import synthetic
  from medcg.data.__main__ import main as data_main
  root = tmp_path_factory.mktemp("synthmat")
  synthetic.write_synthmat(root / "raw", image_size=32, per_subset=24, test_per_subset=12, seed=0,
                           subsets=[3, 5, 28], progress=False)
  rc = data_main(["convert", "--src", str(root / "raw"), "--out", str(root / "shards"), "--image-size", "32",
                  "--format", "array_record", "--no-progress"])
  assert rc in (0, None)
  return str(root / "shards")
