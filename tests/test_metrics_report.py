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
from medcg.eval import stats

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
  assert res["overall"] == {"n": 6, "correct": 3, "accuracy": 0.5,
                            "interval": pytest.approx([0.1876, 0.8124], abs=1e-4)}
  assert {k: (v["n"], v["correct"]) for k, v in res["per_subset"].items()} == {"03": (3, 1), "04": (1, 1),
                                                                                  "28": (2, 1)}
  assert res["per_subset"]["04"]["status"] == "OOD" and res["per_subset"]["03"]["triplet"] == list(COVID_CT)
  assert res["macro_subset"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
  assert res["per_triplet"]["CT|Lung|COVID"]["accuracy"] == pytest.approx(1 / 3)
  assert {k: (v["n"], v["correct"]) for k, v in res["per_element"]["modality"].items()} == {"CT": (4, 2),
                                                                                             "X-ray": (2, 1)}
  assert {k: (v["n"], v["correct"]) for k, v in res["per_element"]["area"].items()} == {"Lung": (6, 3)}
  assert {k: (v["n"], v["correct"]) for k, v in res["per_element"]["task"].items()} == {"COVID": (5, 2),
                                                                                         "Cancer": (1, 1)}
  assert {k: (v["n"], v["correct"]) for k, v in res["per_status"].items()} == {"ID": (5, 2), "OOD": (1, 1)}
  assert res["parse"] == {"stages": {"letter": 3, "text": 2, "unparsed": 1}, "unparsed": 1,
                          "failure_rate": pytest.approx(1 / 6)}
  assert res["counts"] == {"samples": 6, "subsets": 3}
  # chance: a uniform guess over the options each sample offered; outcomes: 0/1 per sample in id order
  assert res["per_subset"]["03"]["chance"] == pytest.approx(0.5)
  assert res["per_subset"]["04"]["chance"] == pytest.approx(0.25)
  assert res["per_subset"]["28"]["chance"] == pytest.approx(1 / 3)
  assert res["outcomes"]["03"]["correct"] == "100" and res["outcomes"]["28"]["correct"] == "10"
  assert res["outcomes"]["03"]["ids_digest"] == stats.outcomes_digest(["s3", "s1", "s2"])


def test_old_records_without_num_options_still_aggregate():
  d = hand_records()[0].to_dict()
  assert d["num_options"] == 2
  del d["num_options"]
  res = metrics.aggregate([d])
  assert "chance" not in res["per_subset"]["03"] and res["overall"]["n"] == 1


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


def _results_with(acc_by_subset, seed=None, options=2):
  """A results dict whose subsets have the given accuracies (100 samples each, the first ones right)."""
  recs = []
  for sid, acc in acc_by_subset.items():
    trip = mat.get(sid).triplet
    for i in range(100):
      ok = i < round(acc * 100)
      recs.append(metrics.SampleRecord(f"{sid}-{i:03d}", sid, trip, "q", "A", "A", "letter", ok, "A" if ok else "B",
                                       num_options=options))
  res = metrics.aggregate(recs)
  if seed is not None:
    res["seed"] = seed
  return res


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
  arms = {"baseline": [_results_with({3: 0.47}, seed=0)],
          "baseline_plus": [_results_with({3: a}, seed=s) for s, a in enumerate((0.46, 0.48, 0.50))],
          "related": [_results_with({3: a}, seed=s) for s, a in enumerate((0.70, 0.72, 0.74))]}
  entry = report.CGEntry(combo, arms, paper.table3_row(15))
  decision = entry.decision()
  assert decision.verdict == "helps" and decision.test == "paired bootstrap"
  assert decision.diff == pytest.approx(0.24) and 0.1 < decision.low < 0.24 < decision.high
  table = report.cg_table([entry])
  header, rows = _parse_markdown_tables(table)[0]
  assert header[3:7] == ["n", "Baseline", "Baseline+", "Trained"]
  assert rows[0][0] == "15" and rows[0][3] == "100"
  assert rows[0][4] == "47.0 [37.5, 56.7]"                     # one run: its Wilson interval
  assert rows[0][5] == "48.0 ± 2.0 (seeds 0,1,2)" and rows[0][6] == "72.0 ± 2.0 (seeds 0,1,2)"
  assert rows[0][7].startswith("+24.0 [") and rows[0][8].startswith("**helps** (p<")
  assert rows[0][9] == "47 / 46 / 72" and rows[0][10] == "✓"
  assert "two-level bootstrap" in table
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
  assert subset_rows["03"][3] == "100" and subset_rows["03"][4] == "80.0 [71.1, 86.7]"
  assert subset_rows["03"][5:] == ["47", "49", "89"]
  assert subset_rows["04"][6] == "–" and subset_rows["04"][7] == "26"
  scaling = {r[0]: r[1:] for r in tables[2][1]}
  assert scaling["All Related"] == ["100", "72.0 ± 2.0 (seeds 0,1,2)", "–", "–", "73"]   # no All Unrelated runs
  assert scaling["w/o Task"] == ["–", "–", "–", "–", "48"]
  vs = _parse_markdown_tables(report.scaling_table(3, {"all_related": arms["related"],
                                                      "all_unrelated": arms["baseline_plus"]}))[0][1]
  assert vs[2][0] == "All Related" and vs[2][3].startswith("+24.0") and vs[2][4].startswith("**higher**")
  summary = {r[0]: r[1:] for r in tables[3][1]}
  assert summary["Overall (samples)"] == ["200", "55.0", "[48.1, 61.7]"]


def test_report_helpers():
  assert report.fmt_pct([]) == "–" and report.fmt_pct([0.5]) == "50.0"
  with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
    report.markdown_table(["a", "b"], [["x"]])
  assert "a \\| b" in report.markdown_table(["h"], [["a | b"]])
  with pytest.raises(ValueError, match="unknown scaling setting"):
    report.scaling_table(3, {"everything": []})
  entry = report.CGEntry(splits.table3_combination(1), {"related": [_results_with({4: 0.3})]})
  assert entry.decision() is None and report.fmt_decision(None) == ("–", "–")


def _is_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as im:
    im.verify()
  return True


def _bars(ax, gid):
  return [p.get_height() for p in ax.patches if p.get_gid() == gid]


def _line(ax, gid):
  return [list(l.get_ydata()) for l in ax.lines if l.get_gid() == gid]


def test_cg_rows_plot_draws_the_table(tmp_path):
  entries = []
  for row, (b, bp, t) in {15: (0.47, 0.5, 0.9), 25: (0.5, 0.5, 0.52)}.items():
    arms = {"baseline": [_results_with({3: b}, seed=0)], "baseline_plus": [_results_with({3: bp}, seed=0)],
            "related": [_results_with({3: t}, seed=0)]}
    entries.append(report.CGEntry(splits.table3_combination(row), arms, paper.table3_row(row)))
  fig = plots.cg_rows_figure(entries, "Table 3: CG rows 15, 25")
  ax = fig.axes[0]
  assert _bars(ax, "ours/baseline") == pytest.approx([47, 50]) and _bars(ax, "ours/related") == pytest.approx([90, 52])
  assert _line(ax, "paper/related")[0] == [72, 81] and _line(ax, "paper/baseline_plus")[0] == [46, 50]
  chance = [c for c in ax.collections if c.get_gid() == "chance"]
  assert len(chance) == 2 and all(seg[0][1] == pytest.approx(50) for c in chance for seg in c.get_segments())
  assert [t.get_text() for t in ax.texts] == ["helps", "no evidence"]
  assert "Table 3: CG rows 15, 25" in ax.get_title() and "n=100" in ax.get_xticklabels()[0].get_text()
  png = plots.save(fig, tmp_path / "t3.png")
  assert _is_png(png) and (tmp_path / "t3.svg").read_text().lstrip().startswith("<?xml")
  with pytest.raises(ValueError, match="written as .png"):
    plots.save(plots.cg_rows_figure(entries, "x"), tmp_path / "t3.jpg")


def test_scaling_curves_heatmap_and_run_plots(tmp_path):
  accs = (0.47, 0.5, 0.7, 0.6, 0.55, 0.5, 0.72)
  runs = {s: [_results_with({3: a}, seed=0)] for s, a in zip(paper.SCALING_SETTINGS, accs)}
  fig = plots.scaling_figure(3, runs, "Fig. 4 test")
  ax = fig.axes[0]
  assert _bars(ax, "ours") == pytest.approx([100 * a for a in accs])
  assert _bars(ax, "paper") == [paper.FIG4[3][s] for s in paper.SCALING_SETTINGS]
  assert _line(ax, "chance")[0] == pytest.approx([50, 50])
  assert _is_png(plots.save(fig, tmp_path / "fig4.png"))

  def point(*values):
    return [stats.RunAccuracy(round(v * 100), 100, s) for s, v in enumerate(values)]
  curves = {"Trained": [point(0.3, 0.32), point(0.5, 0.52), point(0.6, 0.6), point(0.65, 0.7)],
            "Baseline+": [point(0.3, 0.3), [], point(0.3, 0.35), point(0.34, 0.33)]}
  fig = plots.curves_figure(paper.FIG5_SAMPLES, curves, "composition samples", "Fig. 5 test", chance=0.5)
  ax = fig.axes[0]
  assert _line(ax, "ours/Trained")[0] == pytest.approx([31, 51, 60, 67.5])
  assert len(_line(ax, "ours/Baseline+")[0]) == 3                      # the point without runs is left out
  assert "n=100" in ax.get_title() and _line(ax, "chance")[0] == pytest.approx([50, 50])
  assert _is_png(plots.save(fig, tmp_path / "fig5.png"))
  with pytest.raises(ValueError, match="3 points for 4 x values"):
    plots.curves_figure(paper.FIG5_SAMPLES, {"x": [point(0.1)] * 3}, "n", "t")

  res = _results_with({3: 0.8, 4: 0.3, 28: 0.52, 5: 0.4, 26: 0.9})
  mods, areas, grid, counts = plots.element_matrix(res, "COVID")
  assert mods == ["CT", "X-ray"] and areas == ["Lung"] and grid.tolist() == [[80.0], [52.0]]
  assert counts.tolist() == [[100], [100]]
  fig = plots.heatmap_figure(res, "heat test")
  cells = {t.get_gid(): t.get_text() for a in fig.axes for t in a.texts}
  assert cells["cell/CT|Lung|COVID"] == "80\nn=100"
  assert cells["cell/X-ray|Lung|COVID"] == "52*\nn=100"                # 52 of 100 on two options: at chance
  framed = {p.get_gid() for a in fig.axes for p in a.patches if (p.get_gid() or "").startswith("chance/")}
  assert framed == {"chance/X-ray|Lung|COVID"}
  assert "heat test" in fig._suptitle.get_text() and "n=500" in fig._suptitle.get_text()
  assert _is_png(plots.save(fig, tmp_path / "heat.png"))

  one = _results_with({3: 0.9})
  one["config"] = {"experiment": {"name": "cg_table3", "row": 25, "arm": "related", "target": 3}}
  fig = plots.run_figure(one, "cg_table3, row 25, Trained")
  ax = fig.axes[0]
  assert _bars(ax, "ours") == pytest.approx([90]) and _line(ax, "paper")[0] == [81]
  assert _is_png(plots.save(fig, tmp_path / "run.png"))
  assert not list(tmp_path.glob(".*tmp*"))


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


def test_run_report_follows_the_experiment(tmp_path):
  from medcg.eval import runner
  cg = _results_with({3: 0.9}, options=2)
  cg["step"] = 444
  cg["config"] = {"seed": 0, "experiment": {"name": "cg_table3", "row": 25, "arm": "related", "target": 3,
                                            "direction": "task"}}
  runner.write_report(str(tmp_path / "cg"), cg, {"step": 444})
  text = (tmp_path / "cg" / runner.REPORT_FILE).read_text()
  assert text.startswith("# cg_table3, row 25, direction task, Trained (step 444)")
  tables = dict(zip([h for h in text.split("## ")[1:]], _parse_markdown_tables(text)))
  against = next(t for h, t in tables.items() if h.startswith("Against the paper"))
  assert against[0] == ["Target", "Role", "n", "Ours [95 % CI]", "Chance", "Paper", "Paper value"]
  assert against[1][0] == ["03 CT Lung COVID", "target (held out)", "100", "90.0 [82.6, 94.5]", "50.0",
                           "Table 3 row 25 (Fixed task), Trained", "81"]
  per_subset = next(t for h, t in tables.items() if h.startswith("Per subset"))
  assert per_subset[0][2] == "Role" and "Paper multi-task" not in per_subset[0]   # not Tables 1-2, not ID/OOD
  summary = next(t for h, t in tables.items() if h.startswith("Summary"))
  assert [r[0] for r in summary[1]] == ["Overall (samples)", "Mean over subsets", "Unparsed answers"]
  assert _is_png(tmp_path / "cg" / runner.BARS_FILE)

  multi = _results_with({3: 0.8, 5: 0.4})
  multi["config"] = {"experiment": {"name": "multitask", "arm": "multi", "target": 0}}
  runner.write_report(str(tmp_path / "multi"), multi, {})
  text = (tmp_path / "multi" / runner.REPORT_FILE).read_text()
  assert "Against the paper" not in text and "| 05 | CT Brain State | OOD | 100 |" in text
  assert "Paper multi-task" in text and _is_png(tmp_path / "multi" / runner.HEATMAP_FILE)

  scaling = _results_with({3: 0.7})
  scaling["config"] = {"experiment": {"name": "scaling", "target": 3, "setting": "wo_area"}}
  assert report.paper_reference(scaling["config"]["experiment"])[:2] == ("Fig. 4, target 03, w/o Area", 58)
  limited = {"name": "limited_data", "fig": 6, "direction": "area", "n": 500, "arm": "related", "target": 3,
             "target_samples": 100}
  assert report.paper_reference(limited)[1] is None and report.subset_roles(limited) == {
      3: "target (100 samples in training)"}
