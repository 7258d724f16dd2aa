"""Shards, manifest, tokenizer and pipeline on gs:// (the fake GCS of tests/conftest.py) read exactly as locally.

One tiny SynthMAT (3 subsets, 32 px) is converted twice: to a local directory and to gs:// (built in the
default local staging directory, then published). Everything read back from gs:// must equal the local copy.
"""
import json
import os
import pickle
import subprocess
import sys
import tempfile
import types
import uuid

import numpy as np
import pytest

from medcg import fileio
from medcg.data import __main__ as cli
from medcg.data import features, pipeline, shards, synth, tfds_builder
from medcg.data import tokenizer as tok_lib
from medcg.errors import UserError
from tests.conftest import FAKE_GCS_BUCKET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSETS = (3, 5, 28)


def _convert_args(src, out, *extra):
  return ["convert", "--src", str(src), "--out", str(out), "--image-size", "32", "--shard-size", "5",
          "--no-progress", *extra]


@pytest.fixture(scope="module")
def data(_fake_gcs_server, tmp_path_factory):
  root = tmp_path_factory.mktemp("storage_data")
  synth.write_synthmat(root / "raw", image_size=32, per_subset=8, test_per_subset=4, seed=0,
                       subsets=list(SUBSETS), progress=False)
  assert cli.main(_convert_args(root / "raw", root / "local")) == 0
  gs = f"gs://{FAKE_GCS_BUCKET}/{uuid.uuid4().hex[:12]}/shards"
  with pytest.MonkeyPatch.context() as mp:  # the default staging dir, inside this test's tmp dir
    mp.setattr(tempfile, "tempdir", str(root / "tmp"))
    os.makedirs(root / "tmp")
    staging = tfds_builder.default_staging(gs)
    assert cli.main(_convert_args(root / "raw", gs)) == 0
  return types.SimpleNamespace(raw=root / "raw", local=str(root / "local"), gs=gs, staging=staging)


def _records(root, subset, split):
  source = shards.subset_source(root, subset, split)
  return [source[i] for i in range(len(source))]


def test_default_staging_is_local_and_deterministic(data):
  assert data.staging.startswith(os.path.join(str(data.raw.parent), "tmp", "medcg-convert-"))
  assert os.path.exists(os.path.join(data.staging, shards.MANIFEST))
  assert tfds_builder.default_staging(data.gs) == tfds_builder.default_staging(data.gs)
  assert tfds_builder.default_staging(data.gs) != tfds_builder.default_staging(data.gs + "2")


def test_manifest_and_records_on_gcs_match_local(data):
  local, remote = shards.Manifest.load(data.local), shards.Manifest.load(data.gs)
  assert remote.data["subsets"] == local.data["subsets"]  # same shards, sha256 sums, counts, labels
  assert not fileio.exists(f"{data.gs}/{shards.PARTIAL_MANIFEST}")
  assert not fileio.exists(f"{data.gs}/{tfds_builder.TMP_DIR}")
  remote.verify()
  for subset in SUBSETS:
    for split in shards.SPLITS:
      assert all(s.path.startswith(data.gs + "/") and s.offsets.startswith(data.gs + "/")
                 for s in remote.shards(subset, split))
      got = _records(data.gs, subset, split)
      assert got == _records(data.local, subset, split) and len(got) == local.count(subset, split) > 0
  source = shards.subset_source(remote, 5, "train")
  clone = pickle.loads(pickle.dumps(source))  # what a grain worker process receives
  assert [clone[i] for i in range(len(clone))] == [source[i] for i in range(len(source))]
  assert features.parse_example(source[-1])["subset"] == 5


def test_inspect_and_tokenizer_on_gcs(data, capsys):
  capsys.readouterr()
  assert cli.main(["inspect", data.local, "--json"]) == 0
  local = json.loads(capsys.readouterr().out)
  assert cli.main(["inspect", data.gs, "--json", "--verify"]) == 0
  remote = json.loads(capsys.readouterr().out)
  assert remote.pop("root") == data.gs and local.pop("root") == data.local
  assert remote == local

  assert cli.main(["tokenizer", data.gs, "--vocab-size", "300"]) == 0
  path = f"{data.gs}/tokenizer-bpe300.json"
  assert f"wrote {path}" in capsys.readouterr().out
  local_path = cli.build_corpus_tokenizer(data.local, 300)
  assert fileio.path(path).read_bytes() == open(local_path, "rb").read()
  tok, local_tok = tok_lib.HFTokenizer(path), tok_lib.HFTokenizer(local_path)
  text = next(cli.corpus_texts(data.gs))
  assert tok.encode(text) == local_tok.encode(text) and tok.decode(tok.encode(text)) == text
  assert tok.vocab_size == local_tok.vocab_size and pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tok_lib.HFTokenizer(f"{data.gs}/missing.json")


def test_sentencepiece_model_on_gcs(data, tmp_path):
  import sentencepiece
  (tmp_path / "corpus.txt").write_text("\n".join(cli.corpus_texts(data.local)))
  sentencepiece.SentencePieceTrainer.Train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                           vocab_size=120, model_type="bpe", character_coverage=1.0, pad_id=3,
                                           minloglevel=2)
  remote = f"{data.gs}/sp.model"
  fileio.copy_file(tmp_path / "sp.model", remote)
  tok, local = tok_lib.SentencePieceTokenizer(remote), tok_lib.SentencePieceTokenizer(tmp_path / "sp.model")
  text = "Please analyze this brain CT scan."
  assert tok.encode(text) == local.encode(text) and (tok.bos_id, tok.pad_id) == (local.bos_id, local.pad_id)
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def _cfg(shards_dir, **overrides):
  cfg = pipeline.default_data_config()
  cfg.update(dict(shards_dir=shards_dir, mixture=[(3, "train", 6), (28, "train", 6)], image_size=32, seq_len=384,
                  num_image_tokens=4, chat_template="plain", batch_size=4, read_threads=0, prefetch_batches=0,
                  seed=7))
  cfg.update(overrides)
  return cfg


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys) > 0
  for x, y in zip(xs, ys):
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_pipeline_batches_on_gcs_match_local(data):
  tok = tok_lib.ByteTokenizer()
  kw = dict(process_index=0, process_count=1)

  def train(root, **o):
    it = pipeline.make_train_iterator(_cfg(root, **o), tok, **kw)
    return [next(it) for _ in range(4)]

  local = train(data.local)
  _assert_same_batches(train(data.gs, read_threads=2), local)
  _assert_same_batches(train(data.gs, worker_count=2), local)  # sources pickled into grain worker processes
  evals = [list(pipeline.make_eval_iterator(_cfg(root, mixture=[(5, "test", -1), (28, "test", -1)]), tok, **kw))
           for root in (data.gs, data.local)]
  _assert_same_batches(*evals)


def test_rerun_uploads_nothing_and_repairs_a_lost_shard(data, monkeypatch, capsys):
  gs = fileio.path(data.gs)
  manifest_gen = shards.remote_listing(data.gs)[f"{data.gs}/{shards.MANIFEST}"]["generation"]
  copies = []
  real_copy = fileio.copy_file
  monkeypatch.setattr(fileio, "copy_file", lambda src, dst: (copies.append(os.fspath(dst)), real_copy(src, dst)))
  args = _convert_args(data.raw, data.gs, "--staging", data.staging)
  assert cli.main(args) == 0
  assert "(0 files uploaded)" in capsys.readouterr().out and copies == []
  assert shards.remote_listing(data.gs)[f"{data.gs}/{shards.MANIFEST}"]["generation"] == manifest_gen

  shard = shards.Manifest.load(data.gs).shards(28, "train")[1]
  fileio.path(shard.path).unlink()
  with pytest.raises(shards.ManifestError, match=rf"shard {shard.path} is missing"):
    shards.Manifest.load(data.gs)
  assert cli.main(args) == 0
  assert "(2 files uploaded)" in capsys.readouterr().out and copies == [shard.path]
  assert _records(data.gs, 28, "train") == _records(data.local, 28, "train")
  assert (gs / shards.MANIFEST).exists() and not (gs / shards.PARTIAL_MANIFEST).exists()


def test_gcs_reader_errors_name_the_path(data, _fake_gcs_server):
  root = f"gs://{FAKE_GCS_BUCKET}/{uuid.uuid4().hex[:12]}"
  with pytest.raises(shards.ManifestError, match=f"{root}/nope: no such directory"):
    shards.Manifest.load(f"{root}/nope")
  fileio.atomic_write_json(f"{root}/part/{shards.PARTIAL_MANIFEST}", {"subsets": {}})
  with pytest.raises(shards.ManifestError, match=f"{root}/part: conversion is incomplete"):
    shards.Manifest.load(f"{root}/part")
  # A truncated shard: the listing check names it; a read of the cut record names file and record.
  fileio.copy_tree(data.local, f"{root}/cut")
  shard = shards.Manifest.load(f"{root}/cut").shards(3, "train")[0]
  fileio.atomic_write_bytes(shard.path, fileio.path(shard.path).read_bytes()[:-10])
  with pytest.raises(shards.ManifestError, match=rf"shard {shard.path} has \d+ bytes"):
    shards.Manifest.load(f"{root}/cut")
  source = shards.subset_source(shards.Manifest.load(f"{root}/cut", check_files=False), 3, "train")
  source[0]
  with pytest.raises(shards.ShardError, match=rf"{shard.path}: record {shard.count - 1} is truncated"):
    source[shard.count - 1]
  with pytest.raises(shards.ShardError, match=rf"{shard.path}: record {shard.count - 1} is truncated"):
    shards.scan_tfrecord(shard.path)


def test_array_record_on_gcs_is_refused_clearly(data, tmp_path, capsys):
  out = f"gs://{FAKE_GCS_BUCKET}/{uuid.uuid4().hex[:12]}/ar"
  with pytest.raises(UserError, match=rf"--out {out}: ArrayRecord shards cannot be read from gs://.*tfrecord"):
    cli.main(_convert_args(data.raw, out, "--format", "array_record", "--subsets", "5"))
  assert not fileio.exists(out)
  # ArrayRecord shards copied to gs:// by hand: refused before array_record would try to open them.
  tfds_builder.convert(data.raw, tmp_path / "ar", image_size=32, fmt="array_record", subsets=[5], progress=False)
  fileio.copy_tree(tmp_path / "ar", out)
  manifest = shards.Manifest.load(out)
  shard_dir = os.path.dirname(manifest.shards(5, "train")[0].path)
  with pytest.raises(shards.ShardError, match=rf"{shard_dir}: ArrayRecord shards cannot be read from gs://; "
                                              r"convert with the default `--format tfrecord`"):
    shards.subset_source(manifest, 5, "train")
  with pytest.raises(shards.ShardError, match="ArrayRecord shards cannot be read"):
    cli.main(["inspect", out])


def test_local_only_flags_fail_with_one_line(data):
  with pytest.raises(UserError, match=r"--src gs://medcg-test/raw: convert reads the Med-MAT source from a local"):
    cli.main(_convert_args("gs://medcg-test/raw", data.gs))
  with pytest.raises(UserError, match=r"--staging gs://medcg-test/st: the staging directory must be on a local"):
    cli.main(_convert_args(data.raw, data.gs, "--staging", "gs://medcg-test/st"))
  r = subprocess.run([sys.executable, "-m", "medcg.data", "synth", "--out", "gs://medcg-test/synth"],
                     capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.strip().splitlines() == [
      "medcg.data: error: --out gs://medcg-test/synth: synth writes to a local directory only "
      "(convert reads a local --src)"]
