"""SynthMAT: schema A exactness, determinism, balance, and that modality / area / label really vary."""
import json
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from medcg import mat
from medcg.data.synth import LABELS, TEMPLATES, render, split_labels, write_synthmat
from medcg.data.synth import probe as synth_probe
from medcg.data.synth import spec as synth_spec

SCHEMA_A_KEYS = ["id", "caption", "image", "Question", "Answer", "Question-choice", "Answer-choice", "data-no"]
INSTRUCTION = "Answer with the option's letter from the given choices directly."
SUBSETS = (3, 5, 15, 20, 28)       # binary, 3-class, and two multi-label subsets


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthmat")
  summary = write_synthmat(root, image_size=32, per_subset=10, test_per_subset=8, seed=3, subsets=SUBSETS,
                           progress=False)
  return root, summary


def _files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root, sid, split):
  return json.loads((root / "Aggregated_Subsets" / f"Subset--{sid:02d}-{split}.json").read_text())


def test_tables_cover_every_classification_subset():
  synth_spec.check_specs()
  assert sorted(LABELS) == list(mat.CLASSIFICATION_SUBSETS) == list(range(1, 38))
  assert all(len(t) == 6 and len(set(t)) == 6 for t in TEMPLATES.values())
  assert TEMPLATES[2][0] == "Review this kidney CT scan and determine the possible condition it represents."
  # Shared task wording so answers can transfer between compositions.
  for sid in LABELS:
    task = mat.get(sid).coarse_task
    if task == "Cancer":
      assert {"Benign", "Malignant"} <= set(LABELS[sid]), sid
    if task == "Level":
      assert LABELS[sid] == tuple(f"Level {k}" for k in range(len(LABELS[sid]))), sid
    if task in ("State", "COVID"):
      assert "Normal" in LABELS[sid], sid


def test_schema_a_exact(synth_root):
  root, summary = synth_root
  for sid in SUBSETS:
    s = mat.get(sid)
    for split in ("train", "test"):
      records = _load(root, sid, split)
      assert summary["subsets"][s.name][split]["count"] == len(records) > 0
      for i, r in enumerate(records):
        assert list(r) == SCHEMA_A_KEYS
        assert r["id"] == i + 1
        assert r["image"] == f"med-mat/SynthMAT/Subset--{sid:02d}/{split}/{i + 1:06d}.png"
        assert r["Answer"] == r["caption"] and r["caption"] in LABELS[sid]
        assert r["Question"] in TEMPLATES[sid]
        assert r["data-no"] in {str(n) for n in s.sources}
        head, *opt_lines, tail = r["Question-choice"].split("\n")
        assert head == r["Question"] and tail == INSTRUCTION
        assert len(opt_lines) == min(4, len(LABELS[sid]))
        letters = [m.group(1) for m in map(re.compile(r"^([A-D]): (.+)$").match, opt_lines)]
        assert letters == list("ABCD"[:len(opt_lines)])
        options = [line[3:] for line in opt_lines]
        assert len(set(options)) == len(options) and set(options) <= set(LABELS[sid])
        assert options["ABCD".index(r["Answer-choice"])] == r["caption"]
        with Image.open(root / r["image"]) as im:
          assert im.size == (32, 32) and im.mode == "RGB"


def test_option_counts_and_multilabel_captions(synth_root):
  root, _ = synth_root
  counts = {sid: {q["Question-choice"].count("\n") - 1 for q in _load(root, sid, "train")} for sid in SUBSETS}
  assert counts[3] == {2} and counts[5] == {2} and counts[28] == {3} and counts[15] == {4}
  options = " | ".join(q["Question-choice"] for q in _load(root, 20, "train") + _load(root, 20, "test"))
  assert re.search(r"\n[A-D]: \w+, \w+", options)          # comma-joined multi-label options


def test_test_split_label_balanced(synth_root):
  root, summary = synth_root
  for sid in SUBSETS:
    hist = summary["subsets"][mat.get(sid).name]["test"]["labels"]
    assert set(hist) == set(LABELS[sid]) and len(set(hist.values())) == 1 and min(hist.values()) >= 1
    captions = [r["caption"] for r in _load(root, sid, "test")]
    assert all(captions.count(lab) == hist[lab] for lab in LABELS[sid])
  train = split_labels(15, "train", 13, seed=0)          # train: balanced up to one sample
  assert max(map(train.count, LABELS[15])) - min(map(train.count, LABELS[15])) <= 1


def test_deterministic_and_independent_per_subset(synth_root, tmp_path):
  root, _ = synth_root
  again = tmp_path / "again"
  write_synthmat(again, image_size=32, per_subset=10, test_per_subset=8, seed=3, subsets=SUBSETS, progress=False)
  first, second = _files(root), _files(again)
  assert first == second
  assert not [name for name in first if ".tmp" in name]   # atomic writes leave no temp files
  alone = tmp_path / "alone"                               # one subset alone gives the same bytes
  write_synthmat(alone, image_size=32, per_subset=10, test_per_subset=8, seed=3, subsets=["Subset--05"],
                 progress=False)
  for name, data in _files(alone).items():
    assert first[name] == data, name
  smaller = tmp_path / "again"                             # re-run in place with fewer samples: no leftovers
  (smaller / "med-mat/SynthMAT/Subset--05/train/.000001.png.tmp123").write_bytes(b"half")
  write_synthmat(smaller, image_size=32, per_subset=4, test_per_subset=2, seed=3, subsets=[5], progress=False)
  assert sorted(p.name for p in (smaller / "med-mat/SynthMAT/Subset--05/train").iterdir()) == [
      f"{i:06d}.png" for i in range(1, 5)]
  parallel = tmp_path / "parallel"                         # worker processes give the same bytes
  write_synthmat(parallel, image_size=32, per_subset=10, test_per_subset=8, seed=3, subsets=SUBSETS[:2],
                 progress=False, workers=2)
  for name, data in _files(parallel).items():
    assert first[name] == data, name
  other = tmp_path / "other"
  write_synthmat(other, image_size=32, per_subset=10, test_per_subset=8, seed=4, subsets=[5], progress=False)
  assert _files(other)["Aggregated_Subsets/Subset--05-train.json"] != first["Aggregated_Subsets/Subset--05-train.json"]


def test_reader_accepts_synthmat(synth_root):
  medmat = pytest.importorskip("medcg.data.medmat")
  root, _ = synth_root
  result = medmat.read_subset(root, 20, "test")
  assert len(result.records) == len(_load(root, 20, "test")) and not result.skipped
  rec = result.records[0]
  assert rec.triplet == mat.get(20).triplet and rec.options[rec.answer] == rec.caption


@pytest.mark.parametrize("size", [32, 48])
def test_render_shapes_and_determinism(size):
  for sid in LABELS:
    for label in LABELS[sid][:2]:
      a = render(sid, label, np.random.default_rng([1, sid]), size)
      assert a.shape == (size, size, 3) and a.dtype == np.uint8
      assert np.array_equal(a, render(sid, label, np.random.default_rng([1, sid]), size))
      assert a.std() > 5, (sid, label)                    # not blank


def test_bad_inputs_are_named():
  with pytest.raises(KeyError, match="subset 05 has no label 'Tumor'"):
    render(5, "Tumor", np.random.default_rng(0), 32)
  with pytest.raises(KeyError, match="40"):
    render(40, "Normal", np.random.default_rng(0), 32)
  with pytest.raises(ValueError, match="image_size"):
    render(3, "Normal", np.random.default_rng(0), 4)
  with pytest.raises(ValueError, match="classification subsets 01-37 and detection subsets 38-50"):
    write_synthmat("/nonexistent", subsets=[51], progress=False)
  with pytest.raises(KeyError, match="99"):
    write_synthmat("/nonexistent", subsets=["99"], progress=False)
  with pytest.raises(ValueError, match="per_subset"):
    write_synthmat("/nonexistent", per_subset=-1, progress=False)
  with pytest.raises(ValueError, match="seed"):
    write_synthmat("/nonexistent", seed=-1, progress=False)


def test_modality_and_area_linearly_separable():
  seed = random.randrange(1 << 30)
  probes = synth_probe.factor_probes(per_subset=12, image_size=32, seed=seed)
  for factor in ("modality", "area"):
    p = probes[factor]
    assert p["ridge"] > 0.8 and p["ridge"] > p["chance"] + 0.5, (seed, factor, p)
    assert p["centroid"] > 0.7, (seed, factor, p)
  # With the other factor held fixed (X-ray areas; Brain/Lung/Breast modalities) the factor still shows.
  conditional = [k for k in probes if " | " in k]
  assert len(conditional) == len(synth_probe.CONDITIONAL)
  for key in conditional:
    assert probes[key]["ridge"] > max(0.85, probes[key]["chance"] + 0.2), (seed, key, probes[key])


@pytest.mark.parametrize("sid", [3, 28, 30, 14])
def test_labels_separable_within_subset(sid):
  seed = random.randrange(1 << 30)
  p = synth_probe.label_probe(sid, per_label=24, image_size=32, seed=seed)
  assert p["ridge"] > p["chance"] + 0.2, (seed, sid, p)


def test_findings_follow_modality_and_area():
  """The same label word changes the image the same way across modalities, in the area's region."""
  def mean_diff(sid, label, region_rows):
    imgs = [render(sid, lab, np.random.default_rng([5, sid, i]), 32).astype(float)
            for i in range(16) for lab in ("Normal", label)]
    normal, sick = np.mean(imgs[0::2], 0), np.mean(imgs[1::2], 0)
    return (sick - normal)[region_rows].mean()
  lungs = slice(6, 24)
  # COVID-19 brightens the lung fields in CT (03) and X-ray (28); a finding is brighter in CT brain (05).
  assert mean_diff(3, "COVID-19", lungs) > 8 and mean_diff(28, "COVID-19", lungs) > 8
  assert mean_diff(5, "Hemorrhage", slice(4, 28)) > 0.5
  # A lesion is dark (hypoechoic) in ultrasound but bright in CT.
  assert mean_diff(24, "Malignant", slice(8, 30)) < 0 < mean_diff(4, "Malignant", lungs)


@pytest.mark.parametrize("sid", [2, 5, 16, 21])
def test_small_findings_visible_to_histogram_probe(sid):
  """Stones, bleeds, graded lesion counts and abnormal nuclei sit at random sites: a position-invariant
  probe (intensity histograms) must still tell the labels apart."""
  seed = random.randrange(1 << 30)
  p = synth_probe.label_probe(sid, per_label=60, image_size=32, seed=seed)
  assert p["hist"] > p["chance"] + 0.15, (seed, sid, p)



# -- detection subsets 38-50 ------------------------------------------------------------------------------
from medcg.data.synth import imaging as synth_render  # noqa: E402
from medcg.eval import detection  # noqa: E402

DET = tuple(mat.DETECTION_SUBSETS)


def test_detection_tables_cover_every_detection_subset():
  synth_spec.check_det_specs()
  assert sorted(synth_spec.DET_SPECS) == list(range(38, 51))
  assert synth_spec.DET_TEMPLATES[39][0].startswith("Locate the polyp in this intestinal endoscopy image.")


def test_tight_box_is_the_mask_extent():
  alpha = np.zeros((32, 32), np.float32)
  alpha[5:9, 10:20] = 1.0
  alpha[4, 12] = 0.5                                   # not > 0.5: outside the object
  assert synth_render.tight_box(alpha) == (10 / 32, 5 / 32, 20 / 32, 9 / 32)
  assert synth_render.tight_box(np.zeros((8, 8))) is None


@pytest.mark.parametrize("size", [32, 64])
def test_every_detection_subset_renders_with_the_painted_objects_box(size, monkeypatch):
  masks, real = [], synth_render._object_mask

  def recording(*args):
    masks.append(real(*args))
    return masks[-1]

  monkeypatch.setattr(synth_render, "_object_mask", recording)
  for sid in DET:
    masks.clear()
    img, box = synth_render.render_detection(sid, np.random.default_rng([2, sid]), size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8 and img.std() > 5, sid
    rows, cols = np.nonzero(masks[-1] > 0.5)             # the object that was painted last
    assert box == (cols.min() / size, rows.min() / size, (cols.max() + 1) / size, (rows.max() + 1) / size), sid
    assert detection.parse_box(detection.format_box(box)) is not None, sid
    again, same = synth_render.render_detection(sid, np.random.default_rng([2, sid]), size)
    assert np.array_equal(img, again) and same == box, sid


@pytest.mark.parametrize("sid", [38, 39, 42, 47])
def test_detection_boxes_vary_in_position(sid):
  boxes = np.array([synth_render.render_detection(sid, np.random.default_rng([7, sid, i]), 32)[1]
                    for i in range(24)])
  centres = (boxes[:, :2] + boxes[:, 2:]) / 2
  assert centres.std(axis=0).min() > 0.05, (sid, centres.std(axis=0))
  assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_detection_object_shows_in_the_image():
  """The box holds the object: a polyp (lesion tissue) is brighter than the endoscopic wall around it."""
  inside = []
  for i in range(12):
    img, box = synth_render.render_detection(39, np.random.default_rng([4, i]), 32)
    x1, y1, x2, y2 = (np.array(box) * 32).round().astype(int)
    mask = np.zeros((32, 32), bool)
    mask[y1:y2, x1:x2] = True
    grey = img.astype(float).mean(axis=2)
    inside.append(grey[mask].mean() - grey[~mask].mean())
  assert np.mean(inside) > 10


def test_detection_records_schema_a(tmp_path):
  summary = write_synthmat(tmp_path, image_size=32, per_subset=4, test_per_subset=2, subsets=[3, 44],
                           progress=False)
  assert summary["subsets"]["Subset--44"]["train"] == {"count": 4, "labels": {"thyroid nodule": 4}}
  for split, n in (("train", 4), ("test", 2)):
    records = _load(tmp_path, 44, split)
    assert len(records) == n
    for r in records:
      assert list(r) == SCHEMA_A_KEYS and r["Question-choice"] == r["Question"]
      assert r["Question"] in synth_spec.DET_TEMPLATES[44] and r["caption"] == "thyroid nodule"
      assert r["Answer"] == r["Answer-choice"] == detection.format_box(detection.parse_box(r["Answer"]))
      with Image.open(tmp_path / r["image"]) as im:
        assert im.size == (32, 32)
  # Detection subsets are written only when asked for; the flag adds all 13.
  assert not (tmp_path / "Aggregated_Subsets" / "Subset--38-train.json").exists()
  summary = write_synthmat(tmp_path / "all", image_size=16, per_subset=1, test_per_subset=1, subsets=[3],
                           detection=True, progress=False)
  assert sorted(summary["subsets"]) == [f"Subset--{s:02d}" for s in (3, *DET)]
