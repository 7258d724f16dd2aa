"""Table 3: compositional generalisation on classification, 43 rows (two training subsets -> an unseen target).

One run (row 15: CT-Cancer 04 + X-ray-COVID 28 -> CT-COVID 03; arms related | baseline_plus | baseline):

  python -m medcg.train --config configs/cg_table3.py:row=15,arm=related,seed=0 --workdir runs/cg_table3/r15
  python -m medcg.train --config configs/cg_table3.py:row=15,arm=related,data=medmat,hf=ckpt/llava-1.5-7b-hf \
      --workdir runs/cg_table3/r15_medmat

The sweep (every row x 3 arms x 1 seed; `rows=1-14`, `rows=2+15+25+33`, `seeds=3`, `data=medmat`, ...):

  python -m experiments.sweep --config configs/cg_table3.py --launcher local
  python -m experiments.sweep --config configs/cg_table3.py:rows=2+15+25+33,seeds=3 --launcher local --collect

Arms: `related` trains on the row's two subsets (each up to the 3,000 cap, 600 on SynthMAT); `baseline_plus`
trains on the same number of samples drawn evenly from the subsets sharing no MAT element with the target;
`baseline` is the untrained model. Every arm evaluates on the target's whole test split; the target's own
data is never in training. Expected runtime at the default size (SynthMAT, tiny, 32 px, 1,200 samples,
12 epochs = 444 steps of 32, 0.28 s each): about 2.5 minutes per trained run on a 2-core CPU (measured,
experiments/results/demo.md), seconds for `baseline`.

The paper's numbers (LLaVA-v1.5-7B; Baseline / Baseline+ / Trained, %), one row per direction type (all 43
rows: `medcg.paper.TABLE3`):

| Row | Direction | Combination -> target | Baseline | Baseline+ | Trained |
|---|---|---|---|---|---|
| 2 | Fixed modality | CT Lung-Cancer 04 + Brain-State 05 -> Lung-State 03 | 47 | 46 | 50 |
| 15 | Fixed area | CT-Cancer 04 + X-ray-COVID 28 -> CT-COVID 03 | 47 | 46 | 72 |
| 25 | Fixed task | CT-Brain 05 + X-ray-Lung 28 -> CT-Lung 03 | 47 | 50 | 81 |
| 33 | Modality-area pairs | Der-Skin Diseases 08 + DP-Mouth Cancer 10 -> Der-Skin Cancer 07 | 40 | 33 | 63 |
"""
from __future__ import annotations

from configs import common
from medcg import paper
from medcg import splits
from medcg.eval import report

ARMS = ("baseline", "baseline_plus", "related")


def get_config(arg=None):
  """`row` (1-43), `arm` (related | baseline_plus | baseline), plus the common run args (configs/common.py)."""
  args = common.run_args(arg, row=15, arm="related")
  common.check_choice(args, "arm", ARMS)
  paper.table3_row(args.row)  # a clear KeyError for a row that does not exist
  combo = splits.table3_combination(args.row)
  return common.cg_run_config(args, combo, "cg_table3", row=args.row, direction=combo.direction)


def get_sweep(arg=None):
  """rows (default 1-43) x arms x seeds (default 1), rows outermost."""
  args = common.sweep_args(arg, rows="1-43", seeds=1)
  rows = common.int_list(args.rows, "rows")
  for r in rows:
    paper.table3_row(r)
  tail = common.pass_through(args)
  return [common.entry(row=r, arm=arm, seed=s) + tail
          for r in rows for arm in ARMS for s in common.seeds(args)]


def collect(results):
  """Table 3 beside the paper: Baseline / Baseline+ / Trained with n and intervals, the CG test, a bar plot."""
  entries = common.cg_entries(results, "row", splits.table3_combination, paper.table3_row)
  rows = [str(e.paper_row.row) for e in entries if e.paper_row]
  named = f"row {rows[0]}" if len(rows) == 1 else f"rows {', '.join(rows)}" if len(rows) <= 8 else f"{len(rows)} rows"
  title = f"Table 3: CG {named} ({common.runs_label(results)})"

  def figure():
    from medcg.eval import plots  # matplotlib only when the plot is written
    return plots.cg_rows_figure(entries, title)

  return {"markdown": report.cg_table(entries), "rows": [e.combo.train for e in entries],
          "decisions": common.decisions(entries, lambda e: e.paper_row.row if e.paper_row else e.combo.target),
          "figures": {"table3": figure} if entries else {}}
