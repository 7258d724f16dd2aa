"""configs/cls_det.py: Tables 13-14 (detection -> classification) and 5 (classification -> detection)."""
import re

import pytest

from configs import cls_det
from configs import common
from medcg import mat
from medcg import paper

MEDMAT = "data=medmat,model=llava-1.5-7b,shards=/nonexistent/medcg_shards"


def test_table13_rows_train_one_detection_and_one_classification_subset():
  for row, p in enumerate(paper.TABLE13_14, 1):
    c = cls_det.get_config(f"table=13,row={row},arm=related")
    det, cls = p.train
    assert c.data.mixture == [(det, "train", 600), (cls, "train", 600)], row
    assert mat.get(det).status == "det" and mat.get(cls).is_classification, row
    assert c.data.eval_mixture == [(p.target, "test", -1)] and c.experiment.metric == "accuracy"
    assert c.experiment.target_samples == 0 and c.checkpoint.best_metric == "eval/accuracy"
    plus = cls_det.get_config(f"table=13,row={row},arm=baseline_plus").data.mixture
    assert sum(n for *_, n in plus) == 1200 and all(not mat.shared_elements(p.target, s) for s, _, _ in plus)
    base = cls_det.get_config(f"table=13,row={row},arm=baseline")
    assert base.data.mixture == [] and base.train.steps == 0


def test_table5_adds_the_declared_target_samples_to_every_trained_arm():
  related = cls_det.get_config("table=5,row=1,arm=related")
  plus = cls_det.get_config("table=5,row=1,arm=baseline_plus")
  target_n = round(cls_det.TARGET_SAMPLES * 0.2)
  assert related.data.mixture == [(38, "train", 600), (13, "train", 600), (39, "train", target_n)]
  assert plus.data.mixture[-1] == (39, "train", target_n)
  assert sum(n for *_, n in plus.data.mixture) == sum(n for *_, n in related.data.mixture)
  for c in (related, plus):
    assert c.experiment.target_samples == target_n and c.experiment.metric == "ciou"
    assert c.data.eval_mixture == [(39, "test", -1)] and c.checkpoint.best_metric == "eval/ciou"
  assert cls_det.get_config("table=5,row=2").data.mixture[:2] == [(39, "train", 600), (7, "train", 600)]
  assert cls_det.get_config("table=5,row=1,arm=baseline").data.mixture == []
  assert cls_det.get_config("table=5,row=1,target_n=1000").data.mixture[-1] == (39, "train", 200)
  # The release's scale: planning counts put every detection subset at the cap.
  c = cls_det.get_config(f"table=5,row=2,{MEDMAT}")
  assert c.data.mixture == [(39, "train", 3000), (7, "train", 3000), (38, "train", 300)]
  assert "detection subsets planned at 3000" in c.experiment.data_counts


@pytest.mark.parametrize("bad, match", [("table=6", "table"), ("table=13,row=9", "rows 1-8"),
                                        ("table=5,row=3", "rows 1-2"), ("table=5,target_n=0", "target_n"),
                                        ("arm=trained", "arm")])
def test_bad_args_fail_naming_the_arg(bad, match):
  with pytest.raises(ValueError, match=match):
    cls_det.get_config(bad)


def test_sweep_and_its_selectors():
  sweep = cls_det.get_sweep()
  assert len(sweep) == (8 + 2) * 3 and sweep[0] == "table=13,row=1,arm=baseline,seed=0"
  assert sweep[-1] == "table=5,row=2,arm=related,seed=0"
  assert cls_det.get_sweep("tables=5,seeds=2,data=medmat")[:2] == [
      "table=5,row=1,arm=baseline,seed=0,data=medmat", "table=5,row=1,arm=baseline,seed=1,data=medmat"]
  assert len(cls_det.get_sweep("tables=13,rows=2+6")) == 2 * 3
  with pytest.raises(ValueError, match="tables"):
    cls_det.get_sweep("tables=7")


def _results(subset, value, det):
  key = f"{subset:02d}"
  if det:
    return {"overall": {"n": 0, "correct": 0, "accuracy": 0.0}, "per_subset": {},
            "detection": {"per_subset": {key: {"n": 10, "ciou": value}}}}
  return {"overall": {"n": 60, "correct": 0, "accuracy": value},
          "per_subset": {key: {"n": 60, "correct": round(60 * value), "accuracy": value}}}


def test_collect_puts_ciou_gains_and_accuracies_beside_the_paper():
  runs = {}
  for seed, (b, p, r) in enumerate(((0.02, 0.30, 0.40), (0.02, 0.32, 0.38))):
    for arm, v in zip(cls_det.ARMS, (b, p, r)):
      runs[f"table=5,row=1,arm={arm},seed={seed}"] = _results(39, v, det=True)
  for arm, v in zip(cls_det.ARMS, (0.5, 0.55, 0.8)):
    runs[f"table=13,row=6,arm={arm},seed=0"] = _results(28, v, det=False)
  md = cls_det.collect(runs)["markdown"]
  assert "### Tables 13-14" in md and "### Table 5" in md
  t13 = next(line for line in md.splitlines() if line.startswith("| 6 |"))
  # accuracies with n and Wilson intervals, the gain with the CG test (counts only: unpaired)
  assert ("| 50.0 [37.7, 62.3] (n=60) | 55.0 [42.5, 66.9] (n=60) | 80.0 [68.2, 88.2] (n=60) | +25.0 [" in t13
          and "**helps** (p=" in t13 and "unpaired) | 23 -> 26 | 22 -> 23 |" in t13), t13
  t5 = next(line for line in md.splitlines() if line.startswith("| 1 |") and "39" in line)
  assert re.search(r"\| 2\.0 ± 0\.0 \| 31\.0 ± 1\.4 \| 39\.0 ± 1\.4 \| 8\.0 ± 2\.8 \| \+3\.8 \| \+4\.1 \|", t5), t5
  # A run whose results miss the detection section shows as missing, not as zero.
  md = cls_det.collect({"table=5,row=2,arm=related,seed=0": _results(28, 0.9, det=False)})["markdown"]
  assert "| – | – | – | – | +8.4 | +7.6 |" in md


def test_target_samples_are_the_only_target_data():
  for arg in cls_det.get_sweep():
    c = cls_det.get_config(arg)
    e = c.experiment
    common.assert_target_held_out(c.data.mixture, e.target, allowed=e.target_samples)
    assert e.target_samples == (0 if e.table == 13 or e.arm == "baseline" else 60), arg
