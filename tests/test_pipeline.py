"""grain pipeline: batch contract, determinism, exact mixtures, per-host slicing, orbax resume, eval mode.

Most tests read real shards: SynthMAT (3 subsets, 32 px) converted to TFRecord with small shards. An
in-memory catalog of hand-made records covers what SynthMAT cannot show (imbalanced labels, corrupt
records).
"""
import io
import random
from collections import Counter

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from medcg.data import example_proto as tf_example_pb2

from medcg.data import features, pipeline, shards, synth, tfds_builder
from medcg.data.tokenizer import ByteTokenizer

# SynthMAT: 12 train records for subsets 02 and 03; 4 and 6 test records for 02 and 05 (label-balanced).
TRAIN_PER_SUBSET = 12

LABELS = {2: ["Cyst", "Normal", "Stone", "Tumor"], 3: ["COVID-19", "Normal"], 5: ["Hemorrhage", "Normal"]}
# (subset, split) -> records; subset 02 is label-imbalanced so balanced selection is visible.
SIZES = {(2, "train"): 24, (3, "train"): 18, (5, "test"): 10}


def png_bytes(rng: np.random.Generator, size: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def make_record(subset: int, split: str, index: int, rng: np.random.Generator, image_size: int = 32) -> bytes:
  """One serialized tf.train.Example with the DEVELOPING.md shard keys."""
  labels = LABELS[subset]
  caption = labels[0] if (subset == 2 and index % 2) else labels[(index // 2 if subset == 2 else index) % len(labels)]
  options = list(labels)
  fields = {
      "image": [png_bytes(rng, image_size)], "sample_id": [f"Subset--{subset:02d}-{split}-{index:06d}".encode()],
      "split": [split.encode()], "modality": [b"CT"], "area": [b"Kidney"], "task": [b"Diseases"],
      "question": [f"Question {index} about this scan?".encode()], "options": [o.encode() for o in options],
      "answer": ["ABCD"[options.index(caption)].encode()], "caption": [caption.encode()], "data_no": [b"2"],
  }
  example = tf_example_pb2.Example()
  for key, values in fields.items():
    example.features.feature[key].bytes_list.value.extend(values)
  example.features.feature["subset"].int64_list.value.append(subset)
  return example.SerializeToString()


class MemoryCatalog:
  """An in-memory ShardCatalog: lists of serialized records per (subset, split)."""

  def __init__(self, records):
    self.records = records

  def subsets(self, split):
    return sorted(s for (s, sp) in self.records if sp == split)

  def source(self, subset, split):
    return self.records[(subset, split)]


@pytest.fixture(scope="module")
def catalog():
  rng = np.random.default_rng(0)
  records = {(s, sp): [make_record(s, sp, i, rng, image_size=32 if s != 3 else 40) for i in range(n)]
             for (s, sp), n in SIZES.items()}
  return MemoryCatalog(records)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthmat")
  synth.write_synthmat(root / "src", image_size=32, per_subset=TRAIN_PER_SUBSET, test_per_subset=6, seed=0,
                       subsets=[2, 3, 5], progress=False)
  tfds_builder.convert(root / "src", root / "shards", image_size=32, shard_size=5, progress=False)
  return str(root / "shards")


def config(shards_dir="", **overrides):
  cfg = pipeline.default_data_config()
  cfg.update(dict(shards_dir=shards_dir, mixture=[(2, "train", 10), (3, "train", 6)], image_size=32, seq_len=384,
                  num_image_tokens=4, chat_template="plain", batch_size=4, read_threads=0,
                  prefetch_batches=0, seed=7))
  cfg.update(overrides)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def ids_of(batches):
  return [s for b in batches for s in b["sample_id"]]


def records_by_id(shards_dir, subset, split):
  source = shards.subset_source(shards_dir, subset, split)
  return {r["sample_id"]: r for r in (features.parse_example(source[i]) for i in range(len(source)))}


def train_iter(cfg, **kw):
  kw = {"process_index": 0, "process_count": 1, **kw}
  return pipeline.make_train_iterator(cfg, ByteTokenizer(), **kw)


def test_batch_contract(shards_dir):
  tok = ByteTokenizer()
  batch = next(train_iter(config(shards_dir)))
  B, L = 4, 384
  expect = {"image": (np.float32, (B, 32, 32, 3)), "input_ids": (np.int32, (B, L)),
            "attention_mask": (np.int32, (B, L)), "loss_mask": (np.float32, (B, L)),
            "prompt_len": (np.int32, (B,)), "answer_idx": (np.int32, (B,)), "num_options": (np.int32, (B,)),
            "subset": (np.int32, (B,)), "valid": (np.bool_, (B,)), "sample_id": (object, (B,)),
            "answer": (object, (B,)), "options": (object, (B,))}
  assert set(batch) == set(expect)
  for key, (dtype, shape) in expect.items():
    assert batch[key].dtype == dtype and batch[key].shape == shape, key
  assert batch["valid"].all()
  records = {**records_by_id(shards_dir, 2, "train"), **records_by_id(shards_dir, 3, "train")}
  for b in range(B):
    record = records[batch["sample_id"][b]]
    n, p = int(batch["attention_mask"][b].sum()), int(batch["prompt_len"][b])
    assert (batch["attention_mask"][b, :n] == 1).all() and (batch["input_ids"][b, n:] == tok.pad_id).all()
    assert (np.flatnonzero(batch["loss_mask"][b]) == np.arange(p, n)).all()
    assert tok.decode(batch["input_ids"][b, p:n]) == " " + record["answer"] == " " + batch["answer"][b]
    assert batch["input_ids"][b, n - 1] == tok.eos_id
    assert (batch["input_ids"][b] == tok.image_token_id).sum() == 4
    assert record["question"] in tok.decode(batch["input_ids"][b, :p])
    assert "ABCD"[batch["answer_idx"][b]] == record["answer"]
    assert batch["options"][b] == tuple(record["options"]) and batch["num_options"][b] == len(record["options"])
    assert batch["subset"][b] == record["subset"]
    expected = pipeline.normalize_images([features.decode_image(record["image"])])[0]
    np.testing.assert_allclose(batch["image"][b], expected, rtol=1e-6)


def test_resize_to_image_size(shards_dir):
  batch = next(train_iter(config(shards_dir, image_size=24)))
  assert batch["image"].shape == (4, 24, 24, 3) and np.isfinite(batch["image"]).all()


def test_image_decode_resize_normalise():
  rng = np.random.default_rng(random.randrange(2**32))
  pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  decoded = pipeline.decode_image(buf.getvalue(), 48, "x")
  np.testing.assert_array_equal(decoded, pixels)
  out = pipeline.normalize_images([decoded, 255 - decoded])
  assert out.dtype == np.float32 and out.shape == (2, 48, 48, 3)
  for got, raw in zip(out, (pixels, 255 - pixels)):
    np.testing.assert_allclose(got, (raw / 255.0 - pipeline.CLIP_MEAN) / pipeline.CLIP_STD, rtol=1e-5, atol=1e-5)
  small = pipeline.decode_image(buf.getvalue(), 24, "x")
  assert small.shape == (24, 24, 3) and small.dtype == np.uint8
  np.testing.assert_allclose(small.mean(), pixels.mean(), atol=3)  # a resize, not a crop
  # Grey PNGs become RGB.
  buf = io.BytesIO()
  Image.fromarray(pixels[..., 0]).save(buf, format="PNG")
  np.testing.assert_array_equal(pipeline.decode_image(buf.getvalue(), 48, "x"), np.repeat(pixels[..., :1], 3, -1))
  with pytest.raises(ValueError, match="subset 02 split 'train' record 5: cannot decode the image"):
    pipeline.decode_image(b"not a png", 32, "subset 02 split 'train' record 5")


def test_determinism_and_seed(shards_dir):
  a = take(train_iter(config(shards_dir)), 5)
  b = take(train_iter(config(shards_dir)), 5)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  c = take(train_iter(config(shards_dir), seed=8), 5)
  assert ids_of(a) != ids_of(c)


def test_mixture_counts_exact_and_epochs_reshuffle(shards_dir):
  cfg = config(shards_dir, num_epochs=2)  # 16 samples, batch 4: 4 batches per epoch
  batches = list(train_iter(cfg))
  assert len(batches) == 8
  ids = ids_of(batches)
  first, second = ids[:16], ids[16:]
  for epoch in (first, second):
    assert len(set(epoch)) == 16
    assert Counter(s[:10] for s in epoch) == {"Subset--02": 10, "Subset--03": 6}
  assert set(first) == set(second) and first != second
  # Taking every record of a subset: the whole subset, nothing twice.
  every = ids_of(list(train_iter(config(shards_dir, mixture=[(3, "train", -1)], num_epochs=1, batch_size=3))))
  assert sorted(every) == sorted(records_by_id(shards_dir, 3, "train"))


def test_selection_seeded_and_label_balanced(catalog):
  entry = pipeline.MixtureEntry(2, "train", 8)
  src = catalog.source(2, "train")
  a = pipeline.select_indices(src, entry, seed=1, balance_labels=False, where="m")
  assert len(set(a.tolist())) == 8 and max(a) < 24
  np.testing.assert_array_equal(a, pipeline.select_indices(src, entry, seed=1, balance_labels=False, where="m"))
  assert set(a.tolist()) != set(pipeline.select_indices(src, entry, seed=2, balance_labels=False, where="m").tolist())
  # Subset 02 holds 15 "Cyst" and 3 of each other label; balanced picks 2 per label.
  b = pipeline.select_indices(src, entry, seed=1, balance_labels=True, where="m")
  labels = Counter(features.parse_example(src[i])["caption"] for i in b)
  assert labels == {"Cyst": 2, "Normal": 2, "Stone": 2, "Tumor": 2}
  # More than the rare labels hold: they are exhausted, the rest comes from "Cyst".
  b = pipeline.select_indices(src, pipeline.MixtureEntry(2, "train", 16), seed=1, balance_labels=True, where="m")
  labels = Counter(features.parse_example(src[i])["caption"] for i in b)
  assert labels == {"Cyst": 7, "Normal": 3, "Stone": 3, "Tumor": 3} and len(set(b.tolist())) == 16
  # Through the pipeline config.
  cfg = config(mixture=[(2, "train", 8)], balance_labels=True, num_epochs=1)
  got = ids_of(list(train_iter(cfg, catalog=catalog)))
  assert len(got) == 8
  captions = {features.parse_example(r)["sample_id"]: features.parse_example(r)["caption"] for r in src}
  assert Counter(captions[i] for i in got) == {"Cyst": 2, "Normal": 2, "Stone": 2, "Tumor": 2}


@pytest.mark.parametrize("process_count", [2, 3])
def test_per_host_slices_disjoint_and_covering(shards_dir, process_count):
  cfg = config(shards_dir, batch_size=1)
  n = 16 * 3  # three epochs of the global stream
  stream = ids_of(take(train_iter(cfg), n))
  hosts = [ids_of(take(train_iter(cfg, process_index=i, process_count=process_count), n // process_count))
           for i in range(process_count)]
  for i, host in enumerate(hosts):
    assert host == stream[i::process_count]
  for epoch in range(3):
    seen = [s for i, host in enumerate(hosts) for j, s in enumerate(host)
            if epoch * 16 <= j * process_count + i < (epoch + 1) * 16]
    assert len(seen) == 16 and len(set(seen)) == 16  # disjoint and covering, every epoch


def test_resume_from_orbax_checkpoint(shards_dir, tmp_path):
  it = train_iter(config(shards_dir))
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = take(it, 4)  # crosses into the second epoch
    fresh = train_iter(config(shards_dir))
    mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  resumed = take(fresh, 4)
  for x, y in zip(expected, resumed):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_each_sample_once_padded(shards_dir, process_count):
  tok = ByteTokenizer()
  cfg = config(shards_dir, mixture=[(5, "test", -1), (2, "train", 5)], batch_size=4, seed=3)
  per_host = [list(pipeline.make_eval_iterator(cfg, tok, include_answer=False, process_index=i,
                                               process_count=process_count))
              for i in range(process_count)]
  n_batches = pipeline.eval_num_batches(11, 4, process_count)
  assert all(len(b) == n_batches for b in per_host)
  assert pipeline.eval_batch_count(cfg, process_count=process_count) == n_batches  # the eval bar's total
  real = [s for batches in per_host for b in batches for s, v in zip(b["sample_id"], b["valid"]) if v]
  assert len(real) == 11 and len(set(real)) == 11
  assert sorted(s for s in real if s.startswith("Subset--05")) == sorted(records_by_id(shards_dir, 5, "test"))
  pad = [s for batches in per_host for b in batches for s, v in zip(b["sample_id"], b["valid"]) if not v]
  assert len(pad) == process_count * n_batches * 4 - 11 and set(pad) <= {""}
  for batches in per_host:
    for b in batches:
      assert not b["loss_mask"].any()  # prompt-only sequences
      assert (b["attention_mask"].sum(1) == b["prompt_len"]).all()
  if process_count == 1:  # fixed order: mixture order, shard record order, independent of the seed
    assert real[:6] == list(records_by_id(shards_dir, 5, "test"))
    other = [s for b in pipeline.make_eval_iterator(config(shards_dir, mixture=cfg.mixture, seed=4), tok,
                                                    process_index=0, process_count=1)
             for s, v in zip(b["sample_id"], b["valid"]) if v]
    assert other[:6] == real[:6]


def test_eval_with_answers_masks_padding(shards_dir):
  cfg = config(shards_dir, mixture=[(5, "test", -1)], batch_size=4)
  batches = list(pipeline.make_eval_iterator(cfg, ByteTokenizer(), process_index=0, process_count=1))
  last = batches[-1]
  assert len(batches) == 2 and last["valid"].tolist() == [True, True, False, False]
  assert last["loss_mask"][:2].any(axis=1).all() and not last["loss_mask"][2:].any()


@pytest.mark.parametrize("mixture,match", [
    ([(99, "train", 5)], r"data.mixture\[0\]=\(99, 'train', 5\): unknown subset 99"),
    ([(2, "train", 5), (4, "train", 5)], r"data.mixture\[1\]=\(04, 'train', 5\): subset 04 split 'train' is not in"),
    ([(3, "train", 13)], r"data.mixture\[0\]=\(03, 'train', 13\): asks for 13 samples but subset 03 split 'train' has only 12"),
    ([(3, "train", 0)], r"n_samples must be a positive int"),
    ([(3, "train")], r"expected \(subset, split, n_samples\)"),
    ([], "data.mixture is empty"),
])
def test_bad_mixture_errors(shards_dir, mixture, match):
  with pytest.raises(ValueError, match=match):
    train_iter(config(shards_dir, mixture=mixture))


def test_missing_shards_dir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    train_iter(config(str(tmp_path / "nope")))


def test_corrupt_record_names_it(catalog):
  records = dict(catalog.records)
  records[(3, "train")] = list(records[(3, "train")])
  records[(3, "train")][4] = b"\x00garbage"
  it = pipeline.make_eval_iterator(config(mixture=[(3, "train", -1)]), ByteTokenizer(), process_index=0,
                                   process_count=1, catalog=MemoryCatalog(records))
  with pytest.raises(Exception, match="subset 03 split 'train' record 4"):
    list(it)
