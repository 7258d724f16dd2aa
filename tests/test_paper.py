"""The paper's numbers as data: internal consistency and agreement with the registry."""
import pytest

from medcg import mat
from medcg import paper
from medcg.eval import report


def test_tables_1_and_2_cover_id_and_ood():
  assert tuple(sorted(paper.TABLE1)) == mat.ID_SUBSETS
  assert tuple(sorted(paper.TABLE2)) == mat.OOD_SUBSETS
  assert all(len(v) == 3 for v in paper.TABLE1.values()) and all(len(v) == 2 for v in paper.TABLE2.values())
  assert paper.TABLE1[3] == (47, 49, 89) and paper.TABLE1[32] == (49, 97, 100) and paper.TABLE2[20] == (13, 40)
  assert paper.paper_baseline(28) == 30 and paper.paper_baseline(5) == 33 and paper.paper_baseline(40) is None


def test_table3_shape():
  assert [r.row for r in paper.TABLE3] == list(range(1, 44))
  assert sum(r.helps for r in paper.TABLE3) == 37
  assert [r.row for r in paper.TABLE3 if not r.helps] == [4, 18, 22, 27, 38, 39]
  assert all(r.direction in paper.DIRECTIONS for r in paper.TABLE3)
  with pytest.raises(KeyError, match="rows 1..43"):
    paper.table3_row(44)


def test_table3_check_marks_mean_trained_beats_both_baselines():
  for r in paper.TABLE3:
    assert r.helps == (r.trained > max(r.baseline, r.baseline_plus)), r.row


def test_table3_targets_match_tables_1_2_baselines():
  # The inferred target of each row has the paper's baseline for that subset, except where noted.
  mismatched = [r.row for r in paper.TABLE3 if paper.paper_baseline(r.target) != r.baseline]
  assert mismatched == [21, 37]
  assert all(paper.table3_row(n).note for n in mismatched)


def test_table3_training_subsets_are_classification_subsets():
  for r in paper.TABLE3:
    assert all(mat.get(s).is_classification for s in r.train) and r.target not in r.train


def test_table10():
  assert len(paper.TABLE10) == 9
  assert [r.helps for r in paper.TABLE10] == [False, False] + [True] * 7
  for r in paper.TABLE10:
    assert " ".join(mat.get(r.target).triplet[:2]) in r.label


def test_fig4():
  assert paper.FIG4[3]["all_related"] == 73 and paper.FIG4[28]["all_data"] == 42
  assert all(list(v) == list(paper.SCALING_SETTINGS) for v in paper.FIG4.values())
  assert paper.FIG4[3]["baseline"] == paper.TABLE1[3][0] and paper.FIG4[28]["baseline"] == paper.TABLE1[28][0]


def test_table9_is_consistent():
  for r in paper.TABLE9:
    row = paper.table3_row(r.table3_row)
    assert round(r.llava_baseline) == row.baseline, r.label
    if r.llava_runs:
      mean, sd, n = report.mean_sd(r.llava_runs)
      assert n == 3 and abs(mean - r.llava_mean) <= 0.01 and abs(sd - r.llava_sd) <= 0.01, r.label
  # Two combinations per direction type (App. A.5).
  dirs = [paper.table3_row(r.table3_row).direction for r in paper.TABLE9]
  assert sorted(dirs) == sorted(list(paper.DIRECTIONS) * 2)


def test_detection_tables():
  assert len(paper.TABLE13_14) == 8
  for r in paper.TABLE13_14:
    statuses = {mat.get(s).status for s in r.train}
    assert "det" in statuses and (statuses & {"ID", "OOD"}), r.label
    assert mat.get(r.target).is_classification
  assert paper.TABLE5[1].gains == {"Next-Chat": 8.4, "MiniGPT-v2": 7.6}
  assert paper.TABLE16["LLaVA+CG"][3] == (37.00, 0.82)


def test_fig5_fig6_candidates():
  rows = lambda rs: [r.row for r in rs]
  assert rows(paper.fig5_candidates("modality")) == [5]
  assert rows(paper.fig5_candidates("area")) == [15, 16, 17]
  assert rows(paper.fig5_candidates("task")) == [19, 20, 21, 23, 24, 25, 26, 30]
  assert rows(paper.fig5_candidates("pair")) == [33, 34, 40]
  assert {d: rows(paper.fig6_candidates(d)) for d in paper.DIRECTIONS} == {
      "modality": [4], "area": [18], "task": [22, 27], "pair": [38, 39]}
  assert paper.pick(paper.fig6_candidates("task")) == paper.pick(paper.fig6_candidates("task"), seed=42)
  assert paper.cg_gain(paper.table3_row(5)) == 19
  with pytest.raises(ValueError, match="unknown direction"):
    paper.fig5_candidates("colour")
  with pytest.raises(ValueError, match="no rows"):
    paper.pick([])
