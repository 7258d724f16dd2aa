"""Table 9 style repeats: the 8 cross-backbone combinations (Tables 4 / 11 / 12) x 3 seeds, mean ± sd.

The 8 rows are Table 3 rows 9, 13, 16, 17, 24, 26, 37, 38 (two per direction type, picked by the paper with seed
42, App. A.5). `backbone` (llava | qwen2-vl | llama-3.2-v) chooses the paper column to compare with and, on the
release, the recipe (lr 5e-6 for LLaVA, 2e-6 for Qwen2-VL / Llama-3.2-V; 5 epochs, batch 32, full fine-tune of
the decoder and merger with the vision tower frozen); `model` is the medcg preset that runs and must belong to the
backbone on the release: LLaVA-1.5 presets, or `qwen2-vl-7b` (also `qwen2.5-vl-3b` / `qwen2.5-vl-7b`) with
`hf=` the Qwen2-VL-7B-Instruct checkpoint. Llama-3.2-Vision has no preset yet. Arms: `baseline` (untrained),
`related` (trained), `baseline_plus` on request.

  python -m medcg.train --config configs/cross_backbone.py:row=16,arm=related,seed=1 --workdir runs/xb/r16_s1
  python -m medcg.train --config configs/cross_backbone.py:backbone=qwen2-vl,data=medmat,model=qwen2-vl-7b,\
hf=ckpt/Qwen2-VL-7B-Instruct,hw=v5p-8 --workdir runs/xb/qwen_r16
  python -m medcg.train --config configs/cross_backbone.py:backbone=qwen2-vl,model=tiny-qwen2vl --workdir \
      runs/xb/tiny_qwen   # the Qwen2-VL architecture from scratch on SynthMAT (CPU)
  python -m experiments.sweep --config configs/cross_backbone.py --launcher local
  python -m experiments.sweep --config configs/cross_backbone.py:data=medmat,hf=ckpt/llava-1.5-7b-hf --launcher pod \
      --tpu my-v5p --zone us-east5-a

Expected runtime at the default size (SynthMAT, tiny, 32 px, 1,200 samples x 12 epochs = 444 steps): about
2.5 minutes per trained run on a 2-core CPU (0.28 s per step of 32, measured for the demo); the sweep (8 rows x
3 seeds x 2 arms) about an hour.

The paper's numbers (%; Baseline -> Trained; LLaVA as mean ± sd of 3 runs, Table 9):

| Row | Combination | Qwen2-VL | Llama-3.2-V | LLaVA baseline | LLaVA trained |
|---|---|---|---|---|---|
| 9 | Bones-State + Breast-Diseases -> Bones-Diseases | 61 -> 65 | 52 -> 59 | 37.31 | 43.78 ± 0.87 |
| 16 | X-ray-Diseases + CT-COVID -> X-ray-COVID | 35 -> 40 | 33 -> 38 | 30.00 | 48.66 ± 1.15 |
| 26 | CT-Brain + X-ray-Lung -> CT-Lung (b) | 65 -> 72 | 49 -> 57 | 47.00 | 70.67 ± 0.58 |
| 38 | Mic-Cell Recognition + FP-Fundus Level -> Mic-Cell Level | 34 -> 41 | 10 -> 32 | 23.00 | 31.83 ± 0.29 |
"""
from __future__ import annotations

from configs import cg_table3
from configs import common
from medcg import paper
from medcg import splits
from medcg.eval import report
from medcg.eval import stats

BACKBONES = ("llava", "qwen2-vl", "llama-3.2-v")
ROWS = tuple(r.table3_row for r in paper.TABLE9)
ARMS = ("baseline", "baseline_plus", "related")
SWEEP_ARMS = ("baseline", "related")
_BY_ROW = {r.table3_row: r for r in paper.TABLE9}


def get_config(arg=None):
  """`row` (one of the 8), `arm`, `backbone` (llava | qwen2-vl | llama-3.2-v), plus the common run args."""
  args = common.run_args(arg, row=16, arm="related", backbone="llava")
  common.check_choice(args, "row", ROWS)
  common.check_choice(args, "arm", ARMS)
  common.check_choice(args, "backbone", BACKBONES)
  if args.data == "medmat" and common.backbone_family(args.model) != args.backbone:
    raise ValueError(f"config args: backbone={args.backbone} but model={args.model} is a "
                     f"{common.backbone_family(args.model)} preset; pass model= a {args.backbone} preset")
  run = ",".join(f"{k}={args[k]}" for k in args if k != "backbone")
  config = cg_table3.get_config(run)
  config.experiment.name = "cross_backbone"
  config.experiment.backbone = args.backbone
  if args.data == "medmat":
    config.train.lr = common.RECIPE_LR[args.backbone]
  return config


def get_sweep(arg=None):
  """The 8 rows x (baseline, related) x seeds (default 3)."""
  args = common.sweep_args(arg, backbone="llava", seeds=3)
  if args.backbone not in BACKBONES:
    raise ValueError(f"config arg 'backbone': expected one of {BACKBONES}, got {args.backbone!r}")
  tail = ("" if args.backbone == "llava" else f",backbone={args.backbone}") + common.pass_through(args)
  return [common.entry(row=r, arm=a, seed=s) + tail for r in ROWS for a in SWEEP_ARMS for s in common.seeds(args)]


def _paper_cells(row: paper.CrossBackboneRow, backbone: str) -> tuple[str, str]:
  if backbone == "qwen2-vl":
    return f"{row.qwen[0]:g}", f"{row.qwen[1]:g}"
  if backbone == "llama-3.2-v":
    return f"{row.llama[0]:g}", f"{row.llama[1]:g}"
  return f"{row.llava_baseline:.2f}", f"{row.llava_mean:.2f} ± {row.llava_sd:.2f}"


def collect(results):
  """Per row: our Baseline / Baseline+ / Trained (n, intervals), Trained vs Baseline tested as the CG tables are
  (`medcg.eval.stats.compare`), beside the paper's backbone column."""
  by = common.group_runs(results, lambda p: (p.get("backbone", "llava"), int(p["row"]), p.get("arm", "related")))
  sections = []
  for backbone in sorted({b for b, _, _ in by}):
    rows = []
    for r in ROWS:
      if not any(k[:2] == (backbone, r) for k in by):
        continue
      target = splits.table3_combination(r).target
      acc = {arm: report.arm_runs(by.get((backbone, r, arm), ()), target) for arm in ARMS}
      base, trained = acc["baseline"], acc["related"]
      n = report.shared_n(*acc.values())
      # The paper's cross-backbone tables print Baseline -> Trained, so the test here is against Baseline.
      gain, verdict = report.fmt_decision(stats.compare(trained, base) if trained and base else None)
      pb, pt = _paper_cells(_BY_ROW[r], backbone)
      rows.append([r, _BY_ROW[r].label, n if n is not None else "varies",
                   *[report.fmt_arm(acc[a], with_n=n is None) for a in ARMS], gain, verdict, pb, pt])
    headers = ["Row", "Combination", "n", "Baseline", "Baseline+", "Trained", "Trained − Baseline [95 % CI]",
               "Trained > Baseline?", f"Paper {backbone} baseline", f"Paper {backbone} trained"]
    sections.append(f"### Backbone: {backbone}\n\n" + report.markdown_table(headers, rows))
  return {"markdown": "\n".join(sections)}
