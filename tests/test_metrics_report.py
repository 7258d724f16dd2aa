"""Metrics aggregation on a hand example, results files, markdown reports and plots."""
import json
import random

import pytest
from PIL import Image

from medcg import mat
from medcg import paper
from medcg import splits
from medcg.eval import metrics
from medcg.eval import plots
from medcg.eval import report

KIDNEY = ["Stone", "Cyst", "Normal", "Tumor"]
COVID_CT = ("CT", "Lung", "COVID")
CANCER_CT = ("CT", "Lung", "Cancer")
COVID_XR = ("X-ray", "Lung", "COVID")


def hand_records():
  g = metrics.score_generation
  return [
      g("s1", 3, COVID_CT, "q1", "Answer: B", ["COVID-19", "Normal"], "B"),          # letter, right
      g("s2", 3, COVID_CT, "q2", "B", ["COVID-19", "Normal"], "A"),                  # letter, wrong
      g("s3", 3, COVID_CT, "q3", "I am not sure.", ["COVID-19", "Normal"], "A"),     # unparsed, wrong
      g("s4", 4, CANCER_CT, "q4", "This looks like a tumor.", KIDNEY, "D"),          # text, right
      g("s5", 28, COVID_XR, "q5", "(C)", ["Normal", "Pneumonia", "COVID-19"], "C"),  # letter, right
      g("s6", 28, COVID_XR, "q6", "pneumonia", ["Normal", "Pneumonia", "COVID-19"], "A"),  # text, wrong
  ]


def test_aggregate_hand_example():
  res = metrics.aggregate(hand_records())
  assert res["overall"] == {"n": 6, "correct": 3, "accuracy": 0.5}
  assert {k: (v["n"], v["correct"]) for k, v in res["per_subset"].items()} == {"03": (3, 1), "04": (1, 1),
                                                                                  "28": (2, 1)}
  assert res["per_subset"]["04"]["status"] == "OOD" and res["per_subset"]["03"]["triplet"] == list(COVID_CT)
  assert res["macro_subset"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
  assert res["per_triplet"]["CT|Lung|COVID"]["accuracy"] == pytest.approx(1 / 3)
  assert {k: (v["n"], v["correct"]) for k, v in res["per_element"]["modality"].items()} == {"CT": (4, 2),
                                                                                             "X-ray": (2, 1)}
  assert res["per_element"]["area"] == {"Lung": {"n": 6, "correct": 3, "accuracy": 0.5}}
  assert {k: (v["n"], v["correct"]) for k, v in res["per_element"]["task"].items()} == {"COVID": (5, 2),
                                                                                         "Cancer": (1, 1)}
  assert {k: (v["n"], v["correct"]) for k, v in res["per_status"].items()} == {"ID": (5, 2), "OOD": (1, 1)}
  assert res["parse"] == {"stages": {"letter": 3, "text": 2, "unparsed": 1}, "unparsed": 1,
                          "failure_rate": pytest.approx(1 / 6)}
  assert res["counts"] == {"samples": 6, "subsets": 3}


def test_aggregate_is_order_invariant_and_rejects_duplicates():
  recs = hand_records()
  expected = metrics.aggregate(recs)
  for _ in range(5):
    random.shuffle(recs)
    assert metrics.aggregate(recs) == expected
  with pytest.raises(ValueError, match="sample_id 's1' already seen"):
    metrics.aggregate(recs + [hand_records()[0]])


def test_record_validation_names_the_problem():
  d = hand_records()[0].to_dict()
  del d["answer"]
  with pytest.raises(ValueError, match=r"record 0: missing keys \['answer'\]"):
    metrics.aggregate([d])
  d = hand_records()[0].to_dict() | {"triplet": ["CT", "Lung"]}
  with pytest.raises(ValueError, match="'triplet' must be three strings"):
    metrics.aggregate([d])
  with pytest.raises(ValueError, match="answer 'E' is not one of the 2 options"):
    metrics.score_generation("x", 3, COVID_CT, "q", "A", ["a", "b"], "E")


def test_score_choice_tie_is_wrong():
  r = metrics.score_choice("t", 3, COVID_CT, "q", None, "tie", ["COVID-19", "Normal"], "A")
  assert r.parsed is None and not r.correct
  r = metrics.score_choice("u", 3, COVID_CT, "q", 1, "loglik", ["COVID-19", "Normal"], "B")
  assert r.parsed == "B" and r.correct and r.output == "Normal"


def test_write_and_read_results(tmp_path):
  recs = hand_records()
  config = {"model": {"preset": "tiny"}, "seed": 0}
  res = metrics.write_results(tmp_path, recs, config=config, checkpoint={"step": 100})
  on_disk = metrics.load_results(tmp_path)
  assert on_disk["overall"] == res["overall"] and on_disk["config"] == config
  assert on_disk["config_fingerprint"] == metrics.fingerprint({"seed": 0, "model": {"preset": "tiny"}})
  assert on_disk["checkpoint_fingerprint"] != metrics.fingerprint({"step": 101})
  again = metrics.write_results(tmp_path / "b", recs, checkpoint="/ckpt/100", checkpoint_fingerprint="abc123")
  assert again["checkpoint_fingerprint"] == "abc123" and again["checkpoint"] == "/ckpt/100"
  back = metrics.read_samples(tmp_path / metrics.SAMPLES_FILE)
  assert sorted(back, key=lambda r: r.sample_id) == sorted(recs, key=lambda r: r.sample_id)
  assert not list(tmp_path.glob(".*tmp*"))
  (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0].to_dict()) + "\n{not json\n")
  with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
    metrics.read_samples(tmp_path / "bad.jsonl")
  (tmp_path / "other.json").write_text("{}")
  with pytest.raises(ValueError, match="missing key 'overall'"):
    metrics.load_results(tmp_path / "other.json")


def _results_with(acc_by_subset):
  """A results dict whose subsets have the given accuracies (100 samples each)."""
  recs = []
  for sid, acc in acc_by_subset.items():
    trip = mat.get(sid).triplet
    for i in range(100):
      ok = i < round(acc * 100)
      recs.append(metrics.SampleRecord(f"{sid}-{i}", sid, trip, "q", "A", "A", "letter", ok, "A" if ok else "B"))
  return metrics.aggregate(recs)


def _parse_markdown_tables(text):
  """Every markdown table in `text` as (header, rows); asserts it is well formed."""
  tables, block = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      block.append(line)
      continue
    if block:
      cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in block]
      assert len(block) >= 3 and set(block[1].replace("|", "")) == {"-"}, block
      width = len(cells[0])
      assert all(len(c) == width for c in cells[2:]), block
      tables.append((cells[0], cells[2:]))
      block = []
  return tables


def test_cg_report(tmp_path):
  combo = splits.table3_combination(15)
  arms = {"baseline": [_results_with({3: 0.47})],
          "baseline_plus": [_results_with({3: a}) for a in (0.46, 0.48, 0.50)],
          "related": [_results_with({3: a}) for a in (0.70, 0.72, 0.74)]}
  entry = report.CGEntry(combo, arms, paper.table3_row(15))
  assert entry.helps() is True
  table = report.cg_table([entry])
  header, rows = _parse_markdown_tables(table)[0]
  assert header[3:6] == ["Baseline", "Baseline+", "Trained"]
  assert rows[0][0] == "15" and rows[0][3] == "47.0" and rows[0][4] == "48.0 ± 2.0" and rows[0][5] == "72.0 ± 2.0"
  assert rows[0][6] == "24.0 ± 0.0" and rows[0][7] == "✓" and rows[0][8] == "47 / 46 / 72"
  multi = {"multi-task": [_results_with({3: 0.8, 4: 0.3})]}
  path = report.write_report(tmp_path / "report.md", "CG on SynthMAT",
                             [("CG", table), ("Subsets", report.subset_table(multi)),
                              ("Scaling", report.scaling_table(3, {"all_related": arms["related"]})),
                              ("Summary", report.summary_table(multi["multi-task"][0]))],
                             meta={"command": "python -m medcg.eval --workdir X"})
  text = path.read_text()
  assert text.startswith("# CG on SynthMAT")
  tables = _parse_markdown_tables(text)
  assert len(tables) == 4
  subset_rows = {r[0]: r for r in tables[1][1]}
  assert subset_rows["03"][4] == "80.0" and subset_rows["03"][5:] == ["47", "49", "89"]
  assert subset_rows["04"][6] == "–" and subset_rows["04"][7] == "26"
  scaling = {r[0]: r[1:] for r in tables[2][1]}
  assert scaling["All Related"] == ["72.0 ± 2.0", "73"] and scaling["w/o Task"] == ["–", "48"]


def test_report_helpers():
  assert report.fmt_pct([]) == "–" and report.fmt_pct([0.5]) == "50.0"
  with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
    report.markdown_table(["a", "b"], [["x"]])
  assert "a \\| b" in report.markdown_table(["h"], [["a | b"]])
  with pytest.raises(ValueError, match="unknown scaling setting"):
    report.scaling_table(3, {"everything": []})
  entry = report.CGEntry(splits.table3_combination(1), {"related": [_results_with({4: 0.3})]})
  assert entry.helps() is None


def _is_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as im:
    im.verify()
  return True


def test_plots(tmp_path):
  runs = {s: [_results_with({3: a})] for s, a in zip(paper.SCALING_SETTINGS, (0.47, 0.5, 0.7, 0.6, 0.55, 0.5, 0.72))}
  assert _is_png(plots.plot_scaling_bars(tmp_path / "fig4.png", 3, runs))
  curves = {"Related": [[0.3, 0.32], [0.5, 0.52], [0.6, 0.6], [0.65, 0.7]],
            "Unrelated": [[0.3, 0.3], [0.31, 0.33], [0.3, 0.35], [0.34, 0.33]]}
  assert _is_png(plots.plot_curves(tmp_path / "fig5.png", paper.FIG5_SAMPLES, curves, "composition samples"))
  res = _results_with({3: 0.8, 4: 0.3, 28: 0.6, 5: 0.4, 26: 0.9})
  mods, areas, grid = plots.element_matrix(res, "COVID")
  assert mods == ["CT", "X-ray"] and areas == ["Lung"] and grid.tolist() == [[80.0], [60.0]]
  assert _is_png(plots.plot_heatmaps(tmp_path / "heat.png", res))
  assert not list(tmp_path.glob(".*tmp*"))
  with pytest.raises(ValueError, match="3 points for 4 x values"):
    plots.plot_curves(tmp_path / "bad.png", paper.FIG5_SAMPLES, {"x": [[0.1]] * 3}, "n")


def test_cli_summary_shows_detection_rows(capsys):
  from medcg.eval import __main__ as eval_cli
  det = ("Der", "Skin", "Det")
  records = hand_records() + [
      metrics.score_detection("d1", 38, det, "q", "[0.100, 0.100, 0.500, 0.500]", "[0.100, 0.100, 0.500, 0.500]"),
      metrics.score_detection("d2", 38, det, "q", "no box here", "[0.200, 0.200, 0.400, 0.400]")]
  res = metrics.aggregate(records)
  res["eval"], res["step"] = {"mode": "likelihood"}, 7
  eval_cli.print_summary(res, "/tmp/out")
  out = capsys.readouterr().out
  assert "detection" in out and "cIoU" in out and "subset 38" in out
  # cIoU = 0.16 / (0.16 + 0.04): the unparsed box counts as an empty prediction.
  assert "80.0" in out and "50.0" in out                       # cIoU 80 %, unparsed 50 %
  assert res["overall"]["n"] == 6, "accuracies stay over the classification samples"
