"""Classification <-> detection CG (paper Tables 13-14 and 5): one detection + one classification subset.

`table=13` (Tables 13/14, "does detection data help classification?"): train on a detection subset and a
classification subset whose elements cover a classification target; evaluate the target's accuracy.
`table=5` ("does classification data help detection?"): train on a detection subset and a classification
subset whose elements cover a detection target (38 skin lesion or 39 polyp, whose objects sit at random
positions); evaluate the target's cIoU. The paper added "a fixed amount" of the target's own detection data
because neither baseline localises medical objects at all, without saying how much; medcg adds
`target_n` = 300 samples at the release's scale (a tenth of the 3,000 cap; 60 on SynthMAT at 0.2) to every
trained arm, declared through `splits.add_target_samples` and recorded as `config.experiment.target_samples`.
The paper does not name the classification subsets of Table 5 either: C-Intestine is 13 (End Intestine
Diseases, whose labels include "Polyp") and C-Skin is 07 (Der Skin lesion type, benign / malignant lesions).

Arms (both tables): `related` trains on the row's two subsets (each up to the 3,000 cap, 600 on SynthMAT);
`baseline_plus` trains on as many samples from the classification subsets sharing no MAT element with the
target; `baseline` is the untrained model. Table 5's trained arms both add the target samples, so its gain
(Trained − Baseline+) is what the related classification data adds. Every arm evaluates the target's whole
test split. SynthMAT needs its detection subsets (38-50) written and converted:

  python -m medcg.data synth --out data/synthmat --image_size 32 --per_subset 600 --test_per_subset 60 --detection
  python -m medcg.data convert --src data/synthmat --out data/synthmat_shards --image_size 32
  python -m medcg.data tokenizer data/synthmat_shards --vocab_size 512 --out data/synthmat_shards/tokenizer-bpe512.json

(convert keeps the classification subsets it already holds; delete an older tokenizer-bpe512.json first so the
BPE also learns the box answers.) One run, the sweep, and the table beside the paper:

  python -m medcg.train --config configs/cls_det.py:table=13,row=6,arm=related --workdir runs/cls_det/t13r6
  python -m medcg.train --config configs/cls_det.py:table=5,row=1,arm=related --workdir runs/cls_det/t5r1
  python -m experiments.sweep --config configs/cls_det.py --launcher local
  python -m experiments.sweep --config configs/cls_det.py:tables=5,seeds=3 --launcher local --collect

With `data=medmat` the configs build from the manifest's counts (or, without one, the release's shape with
every detection subset planned at the cap); the release ships no detection data, so a real run needs
detection subsets converted from schema-A JSON of your own (`medcg/data/medmat.py`).

The paper's numbers. Tables 13/14, accuracy % Baseline -> Trained (Next-Chat | MiniGPT-v2):

| Row | Det + Cls -> target | Next-Chat | MiniGPT-v2 |
|---|---|---|---|
| 1 | X-ray Lung Det 47 + X-ray Bones Diseases 36 -> X-ray Lung Diseases 30 | 49 -> 52 | 41 -> 47 |
| 2 | X-ray Lung Det 47 + X-ray Breast Diseases 37 -> X-ray Lung Diseases 30 | 49 -> 54 | 41 -> 49 |
| 3 | X-ray Bones Det 49 + X-ray Breast Diseases 37 -> X-ray Bones Diseases 27 | 20 -> 30 | 31 -> 35 |
| 4 | X-ray Bones Det 49 + X-ray Lung Diseases 30 -> X-ray Bones Diseases 27 | 20 -> 33 | 31 -> 37 |
| 5 | MRI Intestine Det 45 + End Intestine Level 11 -> End Intestine Diseases 13 | 24 -> 27 | 24 -> 26 |
| 6 | X-ray Lung Det 47 + CT Lung COVID 03 -> X-ray Lung COVID 28 | 23 -> 26 | 22 -> 23 |
| 7 | Der Skin Det 38 + FP Fundus Diseases 14 -> Der Skin Diseases 08 | 24 -> 29 | 27 -> 30 |
| 8 | Mic Cell Det 42 + CT Kidney Diseases 02 -> Mic Cell Diseases 33 | 24 -> 26 | 20 -> 24 |

Table 5, cIoU gain in points (Next-Chat | MiniGPT-v2): row 1, D-Skin 38 + C-Intestine 13 -> D-Intestine 39:
+3.8 | +4.1; row 2, D-Intestine 39 + C-Skin 07 -> D-Skin 38: +8.4 | +7.6.
Expected runtime at the default size (SynthMAT, tiny, 32 px): like a Table 3 run, 2-3 minutes per trained arm
on a 2-core CPU (1,200-1,320 samples, 12 epochs).
"""
from __future__ import annotations

import dataclasses

from configs import common
from medcg import mat
from medcg import paper
from medcg import splits
from medcg.eval import report

TABLES = (13, 5)
ARMS = ("baseline", "baseline_plus", "related")
TARGET_SAMPLES = 300     # Table 5: the target's own detection samples every trained arm adds (release scale)
DIRECTION = "cls-det"
# Table 5 rows: (detection subset, classification subset) -> detection target (see the module docstring).
TABLE5_COMBOS = (((38, 13), 39), ((39, 7), 38))


def combination(table: int, row: int) -> splits.Combination:
  """The training subsets and target of a row of Table 13/14 (1-8) or Table 5 (1-2)."""
  rows = paper.TABLE13_14 if table == 13 else TABLE5_COMBOS
  if not 1 <= row <= len(rows):
    raise ValueError(f"config arg 'row': Table {table} has rows 1-{len(rows)}, got {row}")
  if table == 13:
    r = paper.TABLE13_14[row - 1]
    return splits.Combination(tuple(r.train), r.target, DIRECTION)
  train, target = TABLE5_COMBOS[row - 1]
  return splits.Combination(train, target, DIRECTION)


def data_setting(args) -> common.DataSetting:
  """common.data_setting plus the detection subsets' train counts where the counts are planned, not read."""
  setting = common.data_setting(args)
  if not isinstance(setting.counts, dict):  # a manifest: detection subsets count as converted
    return setting
  per_det = args.synth_train if args.data == "synth" else splits.PER_SUBSET_CAP
  counts = {**setting.counts, **{s: per_det for s in mat.DETECTION_SUBSETS}}
  return dataclasses.replace(setting, counts=counts,
                             source=f"{setting.source}; detection subsets planned at {per_det}")


def arm_mixture(args, combo: splits.Combination, setting: common.DataSetting) -> splits.Mixture | None:
  """The arm's training mixture (None: the untrained baseline); Table 5's trained arms add the target samples."""
  if args.arm == "baseline":
    return None
  with common.sizing(setting):
    mix = splits.cg_mixtures(combo, setting.counts, scale=setting.scale)[args.arm]
    if args.table == 5:
      mix = splits.add_target_samples(mix, setting.counts, setting.scaled(args.target_n))
  return mix


def get_config(arg=None):
  """`table` (13 | 5), `row`, `arm`, `target_n` (Table 5's target samples, release scale), common run args."""
  args = common.run_args(arg, table=13, row=1, arm="related", target_n=TARGET_SAMPLES)
  common.check_choice(args, "table", TABLES)
  common.check_choice(args, "arm", ARMS)
  if args.target_n < 1:
    raise ValueError(f"config arg 'target_n': must be positive, got {args.target_n}")
  combo = combination(args.table, args.row)
  setting = data_setting(args)
  mix = arm_mixture(args, combo, setting)
  train = mix.as_list() if mix else []
  target_samples = mix.target_samples if mix else 0
  common.assert_target_held_out(train, combo.target, allowed=target_samples)
  c = common.build_config(
      args, setting, train_mixture=train, eval_mixture=common.target_eval(combo.target), trained=mix is not None,
      experiment=dict(name="cls_det", table=args.table, row=args.row, arm=args.arm, target=combo.target,
                      train_subsets=list(combo.train), target_samples=target_samples,
                      metric="accuracy" if args.table == 13 else "ciou",
                      mixture=mix.describe() if mix else "untrained"))
  if args.table == 5:  # the target is a detection subset: keep the checkpoint with the best cIoU
    c.checkpoint.best_metric = "eval/ciou"
  return c


def get_sweep(arg=None):
  """tables (default 13+5) x rows x arms x seeds (default 1), tables and rows outermost."""
  args = common.sweep_args(arg, tables="13+5", rows="", seeds=1)
  tables = [t for t in TABLES if t in common.int_list(args.tables, "tables")]
  if len(tables) != len(common.int_list(args.tables, "tables")):
    raise ValueError(f"config arg 'tables': expected 13 and/or 5, got {args.tables!r}")
  tail = common.pass_through(args)
  out = []
  for t in tables:
    n_rows = len(paper.TABLE13_14) if t == 13 else len(TABLE5_COMBOS)
    rows = common.int_list(args.rows, "rows") if args.rows else list(range(1, n_rows + 1))
    for r in rows:
      combination(t, r)
      out += [common.entry(table=t, row=r, arm=a, seed=s) + tail for a in ARMS for s in common.seeds(args)]
  return out


def _ciou(results, subset: int) -> float | None:
  entry = results.get("detection", {}).get("per_subset", {}).get(f"{mat.get(subset).id:02d}")
  return None if entry is None else entry["ciou"]


def _cious(runs, target: int) -> list[float]:
  return [v for v in (_ciou(r, target) for r in runs) if v is not None]


def _gain(related: list[float], plus: list[float]) -> str:
  return report.fmt_pct([r - p for r, p in zip(related, plus)]) if related and len(related) == len(plus) \
      else report.MISSING


def collect(results):
  """Tables 13/14 (accuracy %, with n, intervals and the CG test) and 5 (cIoU %, mean ± sd over seeds) beside
  the paper, per arm, and the gain."""
  by = common.group_runs(results, lambda p: (int(p["table"]), int(p["row"]), p.get("arm", "related")))
  sections = []
  for table in TABLES:
    rows_seen = sorted({row for t, row, _ in by if t == table})
    if not rows_seen:
      continue
    body = []
    for row in rows_seen:
      combo = combination(table, row)
      label = " + ".join(f"{s:02d}" for s in combo.train) + f" -> {combo.target:02d}"
      if table == 13:  # accuracies: n, intervals and the CG test, as in Table 3
        entry = report.CGEntry(combo, {arm: by.get((table, row, arm), []) for arm in ARMS})
        gain, verdict = report.fmt_decision(entry.decision())
        ours = [report.fmt_arm(entry.runs(a)) for a in ARMS] + [f"{gain}; {verdict}"]
      else:  # cIoU is a ratio of summed areas, not a count: mean ± sd over seeds
        vals = {arm: _cious(by.get((table, row, arm), []), combo.target) for arm in ARMS}
        ours = [report.fmt_pct(vals[a]) for a in ARMS] + [_gain(vals["related"], vals["baseline_plus"])]
      if table == 13:
        p = paper.TABLE13_14[row - 1]
        body.append([row, f"{label}: {p.label}", *ours, f"{p.next_chat[0]:g} -> {p.next_chat[1]:g}",
                     f"{p.minigpt_v2[0]:g} -> {p.minigpt_v2[1]:g}"])
      else:
        p = paper.TABLE5[row - 1]
        body.append([row, f"{label}: {p.label}", *ours, f"+{p.gains['Next-Chat']:g}", f"+{p.gains['MiniGPT-v2']:g}"])
    metric = "accuracy %" if table == 13 else "cIoU %"
    paper_cols = (["Paper Next-Chat B -> T", "Paper MiniGPT-v2 B -> T"] if table == 13
                  else ["Paper gain Next-Chat", "Paper gain MiniGPT-v2"])
    gain_col = "Trained − B+ [95 % CI]; CG helps?" if table == 13 else "Trained − B+"
    headers = ["Row", "Det + Cls -> target", "Baseline", "Baseline+", "Trained", gain_col] + paper_cols
    title = "Tables 13-14: detection -> classification" if table == 13 else "Table 5: classification -> detection"
    sections.append(f"### {title} ({metric})\n\n" + report.markdown_table(headers, body))
  return {"markdown": "\n".join(sections)}
