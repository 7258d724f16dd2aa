"""No TensorFlow on the training / evaluation path: checked in fresh interpreters (sys.modules is global)."""
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Conversion-time modules, the only ones allowed to import TensorFlow (DEVELOPING.md).
CONVERSION_MODULES = {"medcg.data.tfds_builder", "medcg.data.convert", "medcg.data.__main__"}

TF_CHECK = """
loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
assert not loaded, f"TensorFlow was imported: {loaded[:5]}"
print("NO_TF_OK")
"""
# The training path does not even load tensorflow_datasets (seconds of import in every grain worker).
NO_TFDS_CHECK = """
assert "tensorflow_datasets" not in sys.modules, "tensorflow_datasets was imported on the training path"
"""


def run_python(body: str) -> subprocess.CompletedProcess:
  """Runs `body` (indented source is fine) then the TensorFlow check in a fresh interpreter."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-c", textwrap.dedent(body) + TF_CHECK], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
  """SynthMAT converted to ArrayRecord (that conversion needs no TensorFlow either)."""
  from medcg.data import synth, tfds_builder
  root = tmp_path_factory.mktemp("synthmat")
  synth.write_synthmat(root / "src", image_size=32, per_subset=8, test_per_subset=4, seed=0, subsets=[2, 3],
                       progress=False)
  tfds_builder.convert(root / "src", root / "shards", image_size=32, shard_size=6, fmt="array_record",
                       progress=False)
  return str(root / "shards")


def test_pipeline_runs_without_tensorflow(shards_dir, tmp_path):
  """Train and eval iterators over real shards, an orbax checkpoint of the iterator, worker processes."""
  result = run_python(textwrap.dedent(f"""
      import sys
      import grain, numpy as np, orbax.checkpoint as ocp
      from medcg.data import pipeline, tokenizer
      tok = tokenizer.ByteTokenizer()
      cfg = pipeline.default_data_config()
      cfg.update(dict(shards_dir={shards_dir!r}, mixture=[(2, "train", 8), (3, "train", 8)], image_size=32,
                      seq_len=384, num_image_tokens=4, chat_template="plain", batch_size=4, read_threads=0,
                      prefetch_batches=0))
      take = lambda it, n: [next(it) for _ in range(n)]
      ids_of = lambda batches: [s for b in batches for s in b["sample_id"]]
      it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
      batches = take(it, 3)
      assert batches[0]["image"].shape == (4, 32, 32, 3)
      with ocp.CheckpointManager({str(tmp_path / "ckpt")!r}) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
      ev = list(pipeline.make_eval_iterator(cfg, tok, include_answer=False, process_index=0, process_count=1))
      assert sum(int(b["valid"].sum()) for b in ev) == 16
      # grain worker processes: the same batches as in-process.
      cfg.worker_count = 2
      mp_it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
      got = take(mp_it, 3)
      mp_it.close()
      assert ids_of(got) == ids_of(batches), (ids_of(got), ids_of(batches))
      np.testing.assert_array_equal(got[2]["image"], batches[2]["image"])
      """) + NO_TFDS_CHECK)
  assert result.returncode == 0 and "NO_TF_OK" in result.stdout, result.stdout + result.stderr


def _medcg_modules() -> list[str]:
  import medcg
  return [m.name for m in pkgutil.walk_packages(medcg.__path__, "medcg.") if m.name not in CONVERSION_MODULES]


def test_library_modules_do_not_import_tensorflow():
  """Every medcg library module except the conversion-time ones imports without pulling TensorFlow in."""
  names = [n for n in _medcg_modules() if not n.endswith(".__main__")]
  assert "medcg.data.pipeline" in names
  result = run_python(f"""
      import importlib, sys
      for name in {names!r}:
        importlib.import_module(name)
      """)
  assert result.returncode == 0 and "NO_TF_OK" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("entry_point", [n for n in _medcg_modules() if n.endswith(".__main__")])
def test_entry_points_do_not_import_tensorflow(entry_point):
  """Each command-line entry point (own interpreter: each defines its own absl flags)."""
  result = run_python(f"""
      import importlib, sys
      importlib.import_module({entry_point!r})
      """)
  assert result.returncode == 0 and "NO_TF_OK" in result.stdout, result.stdout + result.stderr
