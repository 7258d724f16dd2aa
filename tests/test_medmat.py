"""Med-MAT reader (both schemas, validation, skip mode) and the TF-free record parser."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from medcg.data import features, medmat
from tests.data import medmat_fixture as fx


@pytest.fixture
def release(tmp_path):
  seed = random.randrange(1 << 30)
  print(f"release fixture seed: {seed}")  # shown by pytest on failure
  counts = fx.make_release(tmp_path, n_train=5, n_test=3, seed=seed)
  return tmp_path, counts


def _edit(path: Path, index: int, **changes):
  records = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      del records[index][key]
    else:
      records[index][key] = value
  path.write_text(json.dumps(records))


def test_discovers_both_schemas(release):
  root, counts = release
  files = medmat.subset_files(root)
  assert sorted(files) == [2, 5, 15, 17, 34]
  assert {s: files[s]["train"].schema for s in files} == {2: "A", 5: "A", 15: "A", 17: "A", 34: "B"}
  for (subset, split), n in counts.items():
    assert len(medmat.read_subset(root, subset, split).records) == n


@pytest.mark.parametrize("subset,n_options", [(5, 2), (17, 3), (2, 4), (34, 4)])
def test_option_counts_and_answers(release, subset, n_options):
  root, _ = release
  for r in medmat.read_subset(root, subset, "train").records:
    assert list(r.options) == list("ABCD"[:n_options])
    assert r.options[r.answer] == r.caption
    assert r.triplet == medmat.mat.get(subset).triplet
    assert Path(r.image_path).is_file() and Path(r.image_path).is_absolute()


def test_schema_a_record_fields(release):
  root, _ = release
  r = medmat.read_subset(root, 5, "test").records[1]
  raw = json.loads(fx.schema_a_path(root, 5, "test").read_text())[1]
  assert r.sample_id == "Subset--05-test-000002"
  assert r.question == raw["Question"]
  assert r.answer == raw["Answer-choice"] and r.caption == raw["caption"]
  assert r.image_path == str(root / raw["image"])
  assert (r.data_no, r.split, r.index) == ("7", "test", 1)


def test_schema_b_answer_from_caption_and_image_under_root(release):
  root, _ = release
  raw = json.loads(fx.schema_b_path(root, 34, "train").read_text())
  records = medmat.read_subset(root, 34, "train").records
  for rec, r in zip(raw, records):
    letter = [k for k, v in rec["choices"].items() if v == rec["caption"]][0]
    assert r.answer == letter
    assert r.sample_id == rec["id"]
    assert r.image_path == str(root / "images" / Path(rec["image"]).name)
    assert r.data_no == "66"


def test_multi_label_caption_stays_joined(release):
  root, _ = release
  captions = {r.caption for r in medmat.read_subset(root, 15, "train").records}
  assert "Cataract, Glaucoma" in captions


def test_schema_a_preferred_when_both_exist(release):
  root, _ = release
  path = fx.write_json(fx.schema_b_path(root, 5, "train"), [])
  assert medmat.subset_files(root)[5]["train"].schema == "A"
  assert medmat.subset_files(root, prefer=("B", "A"))[5]["train"].path == str(path)


def test_original_dataset_file_maps_to_subset(release):
  root, _ = release
  src = fx.schema_a_path(root, 5, "train")
  ori = root / "Original_Medical_Datasets" / "ori--07-train.json"
  ori.parent.mkdir()
  ori.write_text(src.read_text())
  result = medmat.read_file(ori)
  assert {r.subset for r in result.records} == {5}
  assert result.records[0].sample_id == "ori--07-train-000001"
  both = ori.with_name("ori--44-train.json")  # dataset 44 is listed under subsets 18 and 22
  both.write_text(src.read_text())
  with pytest.raises(medmat.MedMatError, match=r"belongs to subsets \[18, 22\]"):
    medmat.read_file(both)
  assert len(medmat.read_file(both, subset=22).records) == 5


# -- bad inputs ----------------------------------------------------------------------------------------

def test_malformed_json_names_file_line_col(release):
  root, _ = release
  path = fx.schema_a_path(root, 2, "train")
  path.write_text('[\n {"id": 1,\n  "caption": oops}\n]')
  with pytest.raises(medmat.MedMatError, match=r"Subset--02-train\.json: malformed JSON at line 3 col 14"):
    medmat.read_subset(root, 2, "train")


def test_missing_field_names_field_and_record(release):
  root, _ = release
  path = fx.schema_a_path(root, 17, "train")
  _edit(path, 3, **{"Answer-choice": None})
  with pytest.raises(medmat.MedMatError) as e:
    medmat.read_subset(root, 17, "train")
  assert (e.value.file, e.value.index, e.value.field) == (str(path), 3, "Answer-choice")
  assert f"{path} [record 3] field 'Answer-choice': missing" in str(e.value)


def test_answer_letter_not_among_options(release):
  root, _ = release
  path = fx.schema_a_path(root, 5, "train")  # two options: A, B
  _edit(path, 2, **{"Answer-choice": "C"})
  with pytest.raises(medmat.MedMatError, match=r"\[record 2\] field 'Answer-choice': answer letter 'C' is not "
                     r"among the options \['A', 'B'\]"):
    medmat.read_subset(root, 5, "train")


def test_caption_differs_from_answer_text(release):
  root, _ = release
  path = fx.schema_a_path(root, 2, "test")
  _edit(path, 0, caption="Something else")
  with pytest.raises(medmat.MedMatError, match=r"\[record 0\] field 'caption': caption 'Something else' differs"):
    medmat.read_subset(root, 2, "test")


def test_bad_option_letters(release):
  root, _ = release
  path = fx.schema_a_path(root, 2, "test")
  _edit(path, 1, **{"Question-choice": "Q?\nA: x\nB: y\nD: z\nAnswer with the option's letter."})
  # The run stops at the gap, so C and D never count as options and the answer may fall outside.
  records = json.loads(path.read_text())
  records[1]["Answer-choice"], records[1]["caption"] = "A", "x"
  path.write_text(json.dumps(records))
  assert medmat.read_subset(root, 2, "test").records[1].options == {"A": "x", "B": "y"}
  _edit(path, 1, **{"Question-choice": "Q?\nA: x\nAnswer with the option's letter."})
  with pytest.raises(medmat.MedMatError, match=r"\[record 1\] field 'Question-choice': 1 options"):
    medmat.read_subset(root, 2, "test")


def test_schema_b_caption_matching_no_option(release):
  root, _ = release
  path = fx.schema_b_path(root, 34, "test")
  _edit(path, 1, caption="Proliferative diabetic retinopathy")
  with pytest.raises(medmat.MedMatError, match=r"Subset-34-test\.json \[record 1\] field 'caption': caption "
                     r"'Proliferative diabetic retinopathy' matches no option"):
    medmat.read_subset(root, 34, "test")


def test_schema_b_caption_matching_several_options(release):
  root, _ = release
  path = fx.schema_b_path(root, 34, "test")
  rec = json.loads(path.read_text())[0]
  choices = dict(rec["choices"])
  letter = [k for k, v in choices.items() if v == rec["caption"]][0]
  other = "A" if letter != "A" else "C"
  choices[other] = rec["caption"]
  _edit(path, 0, choices=choices)
  both = sorted([letter, other])
  with pytest.raises(medmat.MedMatError,
                     match=rf"\[record 0\] field 'caption': .* matches several options \['{both[0]}', '{both[1]}'\]"):
    medmat.read_subset(root, 34, "test")


def test_missing_image(release):
  root, _ = release
  rec = json.loads(fx.schema_a_path(root, 17, "test").read_text())[2]
  (root / rec["image"]).unlink()
  with pytest.raises(medmat.MedMatError, match=r"Subset--17-test\.json \[record 2\] field 'image': image file not found"):
    medmat.read_subset(root, 17, "test")


def test_unreadable_image(release):
  root, _ = release
  rec = json.loads(fx.schema_b_path(root, 34, "train").read_text())[4]
  (root / "images" / Path(rec["image"]).name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  with pytest.raises(medmat.MedMatError, match=r"Subset-34-train\.json \[record 4\] field 'image': unreadable image"):
    medmat.read_subset(root, 34, "train")


def test_skip_mode_collects_reasons_and_keeps_the_rest(release):
  root, _ = release
  path = fx.schema_a_path(root, 2, "train")
  _edit(path, 1, **{"Answer-choice": "Z"})
  _edit(path, 3, Question=None)
  with pytest.raises(medmat.MedMatError):
    medmat.read_subset(root, 2, "train")
  result = medmat.read_subset(root, 2, "train", on_error="skip")
  assert [r.index for r in result.records] == [0, 2, 4]
  assert [(s.index, s.field) for s in result.skipped] == [(1, "Answer-choice"), (3, "Question")]
  assert all(s.file == str(path) for s in result.skipped)
  assert "answer letter 'Z'" in result.skipped[0].reason


def test_duplicate_sample_ids(release):
  root, _ = release
  path = fx.schema_b_path(root, 34, "train")
  _edit(path, 2, id="Subset-34-train--1")
  with pytest.raises(medmat.MedMatError, match=r"\[record 2\] field 'id': duplicate sample id .* \(also record 0\)"):
    medmat.read_subset(root, 34, "train")


def test_unknown_split_and_missing_subset(release):
  root, _ = release
  fx.write_json(root / "Aggregated_Subsets" / "Subset--03-val.json", [])
  with pytest.raises(medmat.MedMatError, match=r"Subset--03-val\.json: unknown split 'val'"):
    medmat.subset_files(root)
  (root / "Aggregated_Subsets" / "Subset--03-val.json").unlink()
  with pytest.raises(medmat.MedMatError, match=r"no file for subset 03 split 'train'"):
    medmat.read_subset(root, 3, "train")


# -- records (features.py) -----------------------------------------------------------------------------

def _example(**overrides) -> bytes:
  from medcg.data import example_proto as tf_example_pb2
  values = {"image": b"png", "sample_id": b"x-1", "split": b"train", "modality": b"CT", "area": b"Lung",
            "task": b"COVID", "question": b"Q?", "answer": b"B", "caption": b"COVID", "data_no": b"3"}
  values.update(overrides)
  ex = tf_example_pb2.Example()
  for k, v in values.items():
    ex.features.feature[k].bytes_list.value.append(v)
  ex.features.feature["subset"].int64_list.value.append(3)
  ex.features.feature["options"].bytes_list.value.extend([b"Normal", b"COVID"])
  return ex.SerializeToString()


def test_parse_example_values():
  ex = features.parse_example(_example())
  assert ex["subset"] == 3 and ex["options"] == ["Normal", "COVID"] and ex["answer"] == "B"
  assert features.answer_index(ex) == 1 and ex["image"] == b"png"


def test_parse_example_errors():
  with pytest.raises(features.RecordError, match="shard-x record 4: not a serialized"):
    features.parse_example(b"\xff\xff\xff", where="shard-x record 4")
  with pytest.raises(features.RecordError, match="answer 'C' is not one of the 2 option letters"):
    features.parse_example(_example(answer=b"C"))


def test_parse_example_imports_no_tensorflow():
  code = ("import sys; from medcg.data import features, shards; "
          "from tests.test_medmat import _example; "
          "features.parse_example(_example()); "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "ok"


# -- detection records (schema A without options, the box as the answer) -------------------------------

@pytest.fixture
def det_release(tmp_path):
  from medcg.data import synth
  synth.write_synthmat(tmp_path, image_size=16, per_subset=3, test_per_subset=1, subsets=[39], progress=False)
  return tmp_path, tmp_path / "Aggregated_Subsets" / "Subset--39-train.json"


def test_detection_record_fields(det_release):
  root, _ = det_release
  rec = medmat.read_subset(root, 39, "train").records[0]
  assert rec.options == {} and rec.option_list == [] and rec.caption == "polyp"
  assert rec.triplet == ("End", "Intestine", "Det") and "[x1, y1, x2, y2]" in rec.question
  assert rec.answer == features.detection.format_box(features.detection.parse_box(rec.answer))


def test_detection_answer_on_a_0_100_grid_is_normalised(det_release):
  root, path = det_release
  _edit(path, 1, **{"Answer-choice": "[10, 20, 40, 60]"})
  assert medmat.read_subset(root, 39, "train").records[1].answer == "[0.100, 0.200, 0.400, 0.600]"


@pytest.mark.parametrize("field, value, match", [
    ("Answer-choice", "B", "found 0"),
    ("Answer-choice", "[0.5, 0.2, 0.1, 0.6]", "found 0"),                        # x2 < x1
    ("Answer-choice", "[0.1, 0.1, 0.2, 0.2] and [0.3, 0.3, 0.4, 0.4]", "found 2"),
    ("Question-choice", "Where is the polyp?\nA: left\nB: right", "has no options"),
    ("Question", "", "is empty"),
])
def test_bad_detection_records_name_file_record_and_field(det_release, field, value, match):
  root, path = det_release
  _edit(path, 2, **{field: value})
  with pytest.raises(medmat.MedMatError, match=match) as e:
    medmat.read_subset(root, 39, "train")
  assert (e.value.file, e.value.index, e.value.field) == (str(path), 2, field)
  skipped = medmat.read_subset(root, 39, "train", on_error="skip")
  assert len(skipped.records) == 2 and skipped.skipped[0].index == 2


def test_segmentation_subset_is_refused(det_release):
  root, path = det_release
  seg = path.with_name("Subset--51-train.json")
  seg.write_text(path.read_text())
  with pytest.raises(medmat.MedMatError, match="segmentation subset") as e:
    medmat.read_subset(root, 51, "train")
  assert e.value.index == 0


def _det_example(answer=b"[0.100, 0.200, 0.300, 0.400]", options=(), subset=39) -> bytes:
  from medcg.data import example_proto
  ex = example_proto.Example()
  ex.ParseFromString(_example(answer=answer, task=b"Det"))
  ex.features.feature["subset"].int64_list.value[:] = [subset]
  ex.features.feature["options"].bytes_list.value[:] = list(options)
  return ex.SerializeToString()


def test_parse_example_validates_detection_records():
  ex = features.parse_example(_det_example())
  assert ex["options"] == [] and features.answer_index(ex) == -1 and features.is_detection(ex)
  with pytest.raises(features.RecordError, match="rec 9: detection subset 39 record holds 2 options"):
    features.parse_example(_det_example(options=(b"a", b"b")), where="rec 9")
  with pytest.raises(features.RecordError, match="holds 0 well-formed boxes"):
    features.parse_example(_det_example(answer=b"B"))
  with pytest.raises(features.RecordError, match="holds 2 well-formed boxes"):
    features.parse_example(_det_example(answer=b"[0.1, 0.1, 0.2, 0.2] [0.3, 0.3, 0.4, 0.4]"))
  with pytest.raises(features.RecordError, match="segmentation subset"):
    features.parse_example(_det_example(subset=52))
  with pytest.raises(features.RecordError, match="'options' holds 0 options"):
    features.parse_example(_det_example(subset=3, answer=b"A"))       # a classification record needs options
  with pytest.raises(features.RecordError, match="key 'subset'"):
    features.parse_example(_det_example(subset=99))
