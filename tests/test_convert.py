"""Converter (tfds builder), manifest, random-access shard reading and the inspect CLI."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import numpy as np
import pytest

from medcg.data import __main__ as cli
from medcg.data import features, medmat, shards
from tests.data import medmat_fixture as fx

REPO = Path(__file__).resolve().parents[1]


def _convert(src, out, **kwargs):
  from medcg.data import tfds_builder
  kwargs.setdefault("image_size", 16)
  kwargs.setdefault("shard_size", 4)
  return tfds_builder.convert(src, out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """One TFRecord conversion of the 5-subset fixture, shared read-only by the tests below."""
  src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out")
  seed = random.randrange(1 << 30)
  print(f"converted fixture seed: {seed}")  # shown by pytest on failure
  counts = fx.make_release(src, n_train=6, n_test=3, seed=seed)
  manifest = _convert(src, out)
  return src, out, counts, manifest


def _inspect_json(out, capsys) -> dict:
  capsys.readouterr()  # drop what tfds printed while converting
  assert cli.main(["inspect", str(out), "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def _labels(src, subset, split):
  hist = {}
  for r in medmat.read_subset(src, subset, split).records:
    hist[r.caption] = hist.get(r.caption, 0) + 1
  return hist


def test_round_trip_counts_labels_and_inspect(converted, capsys):
  src, out, counts, manifest = converted
  assert manifest.subsets("train") == [2, 5, 15, 17, 34] == manifest.subsets("test")
  info = _inspect_json(out, capsys)
  for (subset, split), n in counts.items():
    assert manifest.count(subset, split) == n
    assert info["subsets"][f"{subset:02d}"]["splits"][split]["count"] == n
    assert manifest.labels(subset, split) == _labels(src, subset, split)
    assert manifest.triplet(subset) == medmat.mat.get(subset).triplet
    assert manifest.skipped(subset, split) == []
    # --shard-size 4: 6 train records in 2 shards, 3 test records in 1.
    assert [s.count for s in manifest.shards(subset, split)] == ([3, 3] if n == 6 else [3])
  assert info["example"]["image_shape"] == [16, 16, 3]
  assert cli.main(["inspect", str(out), "--verify"]) == 0
  assert "Subset--" in capsys.readouterr().out


def test_records_match_the_source(converted):
  src, out, _, _ = converted
  for subset in (5, 34):
    src_records = {r.sample_id: r for r in medmat.read_subset(src, subset, "train").records}
    source = shards.subset_source(out, subset, "train")
    seen = set()
    for i in range(len(source)):
      ex = features.parse_example(source[i])
      r = src_records[ex["sample_id"]]
      assert (ex["question"], ex["options"], ex["answer"], ex["caption"]) == (
          r.question, r.option_list, r.answer, r.caption)
      assert (ex["subset"], ex["split"], (ex["modality"], ex["area"], ex["task"])) == (subset, "train", r.triplet)
      assert features.decode_image(ex["image"]).shape == (16, 16, 3)
      seen.add(ex["sample_id"])
    assert seen == set(src_records)


def test_grain_random_access_source(converted):
  _, out, _, _ = converted
  source = shards.subset_source(out, 2, "train")
  ds = grain.MapDataset.source(source).seed(7).shuffle().map(features.parse_example)
  ids = [ex["sample_id"] for ex in ds]
  assert sorted(ids) == sorted(features.parse_example(source[i])["sample_id"] for i in range(len(source)))
  assert source[-1] == source[len(source) - 1]
  with pytest.raises(IndexError):
    source[len(source)]


def test_tfds_reads_the_output(converted):
  import tensorflow_datasets as tfds
  _, out, counts, manifest = converted
  builder = tfds.builder_from_directory(str(manifest.tfds_dir(15)))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 6, "test": 3}
  captions = sorted(ex["caption"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="train")))
  assert captions == sorted(r.caption for r in medmat.read_subset(converted[0], 15, "train").records)
  ds = tfds.load("med_mat/subset_34", data_dir=str(out), split="test")
  images = [ex["image"].shape for ex in tfds.as_numpy(ds)]
  assert images == [(16, 16, 3)] * counts[(34, "test")]


def test_rerun_keeps_complete_subsets_and_rebuilds_changed(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  fx.make_release(src, n_train=4, n_test=3, schema_a=(5, 17), schema_b=())
  _convert(src, out)
  shard5 = Path(shards.Manifest.load(out).shards(5, "train")[0].path)
  inode5 = shard5.stat().st_ino
  _convert(src, out)
  assert shard5.stat().st_ino == inode5  # identical settings and sources: not rebuilt
  path17 = fx.schema_a_path(src, 17, "test")
  fx.write_json(path17, json.loads(path17.read_text())[:2])
  m = _convert(src, out, subsets=[17])
  assert shard5.stat().st_ino == inode5  # kept although not requested this time
  assert m.count(17, "test") == 2 and m.subsets("train") == [5, 17]
  m = _convert(src, out, subsets=[5], image_size=8)  # new settings: old subsets go, 5 is rebuilt
  assert m.subsets("train") == [5] and m.image_size == 8
  assert not (out / "med_mat" / "subset_17").exists()
  assert features.decode_image(features.parse_example(shards.subset_source(out, 5, "train")[0])["image"]).shape == (
      8, 8, 3)


def test_synth_convert_inspect_cli(tmp_path, capsys):
  src, out = tmp_path / "synth", tmp_path / "out"
  assert cli.main(["synth", "--out", str(src), "--image-size", "16", "--per-subset", "4",
                   "--test-per-subset", "2", "--subsets", "5,17", "--no-progress"]) == 0
  assert cli.main(["convert", "--src", str(src), "--out", str(out), "--image-size", "16",
                   "--format", "array_record", "--no-progress"]) == 0
  info = _inspect_json(out, capsys)
  for subset in (5, 17):
    for split in ("train", "test"):
      n = len(json.loads(fx.schema_a_path(src, subset, split).read_text()))
      assert info["subsets"][f"{subset:02d}"]["splits"][split]["count"] == n > 0


def test_undecodable_image_is_skipped_or_fails(tmp_path, monkeypatch):
  from medcg.data import tfds_builder
  src, out = tmp_path / "src", tmp_path / "out"
  fx.make_release(src, n_train=4, n_test=2, schema_a=(5,), schema_b=())
  bad = str(src / json.loads(fx.schema_a_path(src, 5, "train").read_text())[2]["image"])
  real = tfds_builder.encode_square_png

  def encode(path, size):
    if str(path) == bad:
      raise OSError("image file is truncated")
    return real(path, size)

  monkeypatch.setattr(tfds_builder, "encode_square_png", encode)
  with pytest.raises(medmat.MedMatError, match=r"Subset--05-train\.json \[record 2\] field 'image': cannot decode"):
    _convert(src, out)
  m = _convert(src, out, on_error="skip")
  assert m.count(5, "train") == 3
  assert [(s["index"], s["field"]) for s in m.skipped(5, "train")] == [(2, "image")]


def test_array_record_round_trip(converted, tmp_path, capsys):
  src, _, counts, _ = converted
  out = tmp_path / "ar"
  manifest = _convert(src, out, fmt="array_record", subsets=[17, 34])
  assert manifest.format == "array_record"
  info = _inspect_json(out, capsys)
  for subset in (17, 34):
    for split in ("train", "test"):
      n = counts[(subset, split)]
      source = shards.subset_source(out, subset, split)
      assert len(source) == manifest.count(subset, split) == n
      assert info["subsets"][f"{subset:02d}"]["splits"][split]["count"] == n
      assert sorted(features.parse_example(source[i])["caption"] for i in range(n)) == sorted(
          r.caption for r in medmat.read_subset(src, subset, split).records)
  assert all(s.path.endswith(("-of-00002", "-of-00001")) and ".array_record-" in s.path
             for s in manifest.shards(34, "train"))


def test_skip_mode_records_reasons_in_manifest(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  fx.make_release(src, n_train=5, n_test=3, schema_a=(5,), schema_b=(34,))
  a_path = fx.schema_a_path(src, 5, "train")
  records = json.loads(a_path.read_text())
  records[1]["Answer-choice"] = "D"
  (src / records[3]["image"]).unlink()
  a_path.write_text(json.dumps(records))
  b_path = fx.schema_b_path(src, 34, "test")
  records = json.loads(b_path.read_text())
  records[0]["caption"] = "not an option"
  b_path.write_text(json.dumps(records))
  with pytest.raises(medmat.MedMatError, match=r"Subset--05-train\.json \[record 1\]"):
    _convert(src, out)
  assert not (out / shards.MANIFEST).exists()
  manifest = _convert(src, out, on_error="skip")
  assert manifest.count(5, "train") == 3 and manifest.count(34, "test") == 2 and manifest.count(34, "train") == 5
  skipped = manifest.skipped(5, "train")
  assert [(s["file"], s["index"], s["field"]) for s in skipped] == [(str(a_path), 1, "Answer-choice"),
                                                                    (str(a_path), 3, "image")]
  assert "image file not found" in skipped[1]["reason"]
  assert [(s["index"], s["field"]) for s in manifest.skipped(34, "test")] == [(0, "caption")]
  assert sum(manifest.labels(5, "train").values()) == 3


def _copy_tree(out, dst):
  import shutil
  shutil.copytree(out, dst)
  return dst


def test_corrupt_tfrecord_shard_names_file_and_record(converted, tmp_path):
  out = _copy_tree(converted[1], tmp_path / "copy")
  manifest = shards.Manifest.load(out)
  shard = manifest.shards(2, "train")[1]
  offsets = np.load(shard.offsets)
  data = bytearray(Path(shard.path).read_bytes())
  data[int(offsets[1]) + 40] ^= 0xFF  # a byte inside record 1's payload
  Path(shard.path).write_bytes(bytes(data))
  source = shards.subset_source(out, 2, "train")
  source[3]  # record 0 of shard 1 is intact
  with pytest.raises(shards.ShardError, match=rf"{shard.path}: record 1 data is corrupt"):
    source[4]
  with pytest.raises(shards.ShardError, match=rf"{shard.path}: record 1 data is corrupt"):
    shards.scan_tfrecord(shard.path)
  with pytest.raises(shards.ShardError, match="sha256"):
    manifest.verify([2])


def test_truncated_tfrecord_shard_names_file(converted, tmp_path):
  out = _copy_tree(converted[1], tmp_path / "copy")
  shard = shards.Manifest.load(out).shards(34, "test")[0]
  data = Path(shard.path).read_bytes()
  Path(shard.path).write_bytes(data[:-10])
  with pytest.raises(shards.ManifestError, match=rf"shard {shard.path} has {len(data) - 10} bytes"):
    shards.Manifest.load(out)
  source = shards.subset_source(shards.Manifest.load(out, check_files=False), 34, "test")
  source[0]
  with pytest.raises(shards.ShardError, match=rf"{shard.path}: record 2 is truncated"):
    source[2]
  with pytest.raises(shards.ShardError, match=rf"{shard.path}: record 2 is truncated"):
    shards.scan_tfrecord(shard.path)


def test_manifest_refuses_missing_dataset(tmp_path):
  with pytest.raises(shards.ManifestError, match="no such directory"):
    shards.Manifest.load(tmp_path / "nope")
  with pytest.raises(shards.ManifestError, match="no manifest.json"):
    shards.Manifest.load(tmp_path)


def test_interrupted_convert_reads_incomplete_then_resumes(converted, tmp_path):
  src, _, counts, _ = converted
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen([sys.executable, "-m", "medcg.data", "convert", "--src", str(src), "--out", str(out),
                           "--image-size", "16", "--shard-size", "4", "--no-progress"],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  partial = out / shards.PARTIAL_MANIFEST
  deadline = time.time() + 120
  done = []
  while time.time() < deadline and proc.poll() is None:
    if partial.exists():
      try:
        done = list(json.loads(partial.read_text())["subsets"])
      except (json.JSONDecodeError, KeyError):
        done = []
      if done:
        break
    time.sleep(0.01)
  assert proc.poll() is None, f"convert ended before it could be interrupted: {proc.stderr.read().decode()[-2000:]}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert done and len(done) < 5
  assert not (out / shards.MANIFEST).exists()
  with pytest.raises(shards.ManifestError, match="conversion is incomplete"):
    shards.Manifest.load(out)
  with pytest.raises(shards.ManifestError, match="conversion is incomplete"):
    shards.subset_source(out, int(done[0]), "train")
  first = json.loads(partial.read_text())["subsets"][done[0]]["splits"]["train"]["shards"][0]["file"]
  inode = (out / first).stat().st_ino
  manifest = _convert(src, out)
  assert (out / first).stat().st_ino == inode  # the completed subset was kept, the rest rebuilt
  assert not partial.exists() and not (out / ".tmp").exists()
  for (subset, split), n in counts.items():
    assert manifest.count(subset, split) == n


def test_subset_with_every_record_skipped(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  fx.make_release(src, n_train=3, n_test=2, schema_a=(5, 17), schema_b=())
  for split in ("train", "test"):
    path = fx.schema_a_path(src, 17, split)
    fx.write_json(path, [dict(r, **{"Answer-choice": "D"}) for r in json.loads(path.read_text())])
  m = _convert(src, out, on_error="skip")
  assert m.subsets("train") == [5] and m.splits(17) == ["test", "train"]
  assert m.count(17, "train") == 0 and len(m.skipped(17, "train")) == 3 and len(m.skipped(17, "test")) == 2
  assert len(shards.subset_source(out, 17, "test")) == 0


def test_convert_rejects_bad_arguments(tmp_path):
  src = tmp_path / "src"
  fx.make_release(src, n_train=2, n_test=1, schema_a=(5,), schema_b=())
  with pytest.raises(ValueError, match=r"subsets \[51\] are segmentation subsets"):
    _convert(src, tmp_path / "out", subsets=[51])
  with pytest.raises(medmat.MedMatError, match=r"no JSON files for subsets \[3\]"):
    _convert(src, tmp_path / "out", subsets=[3, 5])
  with pytest.raises(ValueError, match="--format must be one of"):
    _convert(src, tmp_path / "out", fmt="parquet")
  assert not (tmp_path / "out").exists()


def test_array_record_conversion_needs_no_tensorflow(tmp_path):
  src = tmp_path / "src"
  fx.make_release(src, n_train=2, n_test=1, schema_a=(5,), schema_b=())
  code = (f"import sys; from medcg.data import tfds_builder; "
          f"m = tfds_builder.convert({str(src)!r}, {str(tmp_path / 'out')!r}, image_size=16, fmt='array_record', "
          f"progress=False); assert m.count(5, 'train') == 2; "
          f"print(sorted(k for k in sys.modules if k.split('.')[0] == 'tensorflow'))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]"


# -- detection subsets: SynthMAT -> shards -> batches ---------------------------------------------------

def test_detection_subset_round_trip_to_batches(tmp_path):
  """A SynthMAT detection subset converts into the same builder and reaches the batch with its box answer."""
  from medcg.data import pipeline, synth
  from medcg.data import tokenizer as tok_lib
  from medcg.eval import detection
  src, out = tmp_path / "src", tmp_path / "out"
  synth.write_synthmat(src, image_size=32, per_subset=5, test_per_subset=3, subsets=[3, 47], progress=False)
  manifest = _convert(src, out, image_size=32, fmt="array_record")
  assert manifest.subsets("train") == [3, 47] and manifest.labels(47, "train") == {"lung opacity": 5}
  source = shards.subset_source(out, 47, "train")
  truth = {r.sample_id: r for r in medmat.read_subset(src, 47, "train").records}
  for i in range(len(source)):
    ex = features.parse_example(source[i])
    r = truth[ex["sample_id"]]
    assert ex["options"] == [] and ex["answer"] == r.answer and len(detection.parse_boxes(ex["answer"])) == 1
    assert ex["question"] == r.question and "[x1, y1, x2, y2]" in ex["question"] and ex["caption"] == "lung opacity"
  data = pipeline.default_data_config()
  data.update(dict(shards_dir=str(out), mixture=[(47, "train", 5), (3, "train", 5)], image_size=32,
                   num_image_tokens=4, seq_len=224, batch_size=10, num_epochs=1, chat_template="plain",
                   answer_format="text"))
  tok = tok_lib.ByteTokenizer()
  batch = next(iter(pipeline.make_train_dataset(data, tok, process_index=0, process_count=1)))
  det = batch["subset"] == 47
  assert det.sum() == 5
  assert (batch["answer_idx"][det] == -1).all() and (batch["num_options"][det] == 0).all()
  assert (batch["answer_idx"][~det] >= 0).all() and (batch["num_options"][~det] == 2).all()
  for b in np.flatnonzero(det):
    ids, mask = batch["input_ids"][b], batch["loss_mask"][b]
    target = ids[mask > 0]
    assert target[-1] == tok.eos_id and tok.decode(target[:-1]) == " " + batch["answer"][b]
    assert batch["options"][b] == ()
    prompt = tok.decode(ids[:batch["prompt_len"][b]])
    assert "[x1, y1, x2, y2]" in prompt and "A:" not in prompt


def test_synth_detection_flag_and_tokenizer_corpus(tmp_path, capsys):
  """`synth --detection` writes 38-50; convert takes them (not segmentation); the BPE corpus holds the boxes."""
  src, out = tmp_path / "synth", tmp_path / "out"
  assert cli.main(["synth", "--out", str(src), "--image-size", "16", "--per-subset", "1", "--test-per-subset", "1",
                   "--subsets", "5", "--detection", "--no-progress"]) == 0
  assert cli.main(["convert", "--src", str(src), "--out", str(out), "--image-size", "16",
                   "--format", "array_record", "--subsets", "5,39,46", "--no-progress"]) == 0
  info = _inspect_json(out, capsys)
  assert sorted(info["subsets"]) == ["05", "39", "46"]
  assert info["subsets"]["46"]["triplet"] == ["MRI", "Liver", "Det"]
  texts = list(cli.corpus_texts(str(out)))
  boxes = [t for t in texts if "[x1, y1, x2, y2]" in t]
  assert len(boxes) == 4 and all(t.split("\nAnswer: ")[1].startswith("[0.") for t in boxes)
