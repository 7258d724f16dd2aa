"""Table 10 (App. A.4): modality, area and task each from a different training subset -> an unseen target.

Nine rows (`row=0..8`, the order of the paper's table). Arms: `related` trains on the three source subsets
(each up to the 3,000 cap, 600 on SynthMAT); `baseline_plus` on as many samples from the subsets sharing
no element with the target; `baseline` is the untrained model. The target never enters training.

  python -m medcg.train --config configs/cg_three_source.py:row=3,arm=related,seed=0 --workdir runs/t10/r3
  python -m experiments.sweep --config configs/cg_three_source.py --launcher local
  python -m experiments.sweep --config configs/cg_three_source.py:rows=2+3,seeds=3 --launcher local --collect

Expected runtime at the default size (SynthMAT, tiny, 32 px, 1,800 samples x 12 epochs = 675 steps): about
3-4 minutes per trained run on a 2-core CPU (0.28 s per step of 32, measured for the demo).

The paper's numbers (LLaVA-v1.5-7B, %; the paper ran no Baseline+ here):

| Row | Modality + area + task sources -> target | Baseline | Trained |
|---|---|---|---|
| 0 | CT 02 + Brain 22 + Cancer 07 -> CT Brain Cancer 06 | 28 | 26 |
| 3 | CT 03 + Brain 22 + State 26 -> CT Brain State 05 | 33 | 70 |
| 4 | X-ray 25 + Lung 03 + Diseases 02 -> X-ray Lung Diseases 30 | 30 | 45 |
| 8 | X-ray 28 + Breast 24 + Diseases 08 -> X-ray Breast Diseases 29 | 31 | 52 |
"""
from __future__ import annotations

from configs import common
from medcg import mat
from medcg import paper
from medcg import splits
from medcg.eval import report

ARMS = ("baseline", "baseline_plus", "related")
ROWS = tuple(range(len(paper.TABLE10)))


def get_config(arg=None):
  """`row` (0-8), `arm` (related | baseline_plus | baseline), plus the common run args."""
  args = common.run_args(arg, row=3, arm="related")
  common.check_choice(args, "arm", ARMS)
  common.check_choice(args, "row", ROWS)
  return common.cg_run_config(args, splits.table10_combination(args.row), "cg_three_source", row=args.row)


def get_sweep(arg=None):
  """rows (default 0-8) x arms x seeds (default 1)."""
  args = common.sweep_args(arg, rows="0-8", seeds=1)
  rows = common.int_list(args.rows, "rows")
  for r in rows:
    if r not in ROWS:
      raise ValueError(f"config arg 'rows': Table 10 has rows 0-{len(ROWS) - 1}, not {r}")
  tail = common.pass_through(args)
  return [common.entry(row=r, arm=arm, seed=s) + tail for r in rows for arm in ARMS for s in common.seeds(args)]


def _label(combo: splits.Combination) -> str:
  src = " + ".join(f"{s:02d} {'-'.join(mat.get(s).triplet)}" for s in combo.train)
  t = mat.get(combo.target)
  return f"{src} -> {t.id:02d} {'-'.join(t.triplet)}"


def collect(results):
  """Table 10 beside the paper: Baseline / Baseline+ / Trained with n and intervals, the CG test, a bar plot."""
  by = common.group_runs(results, lambda p: (int(p["row"]), p.get("arm", "related")))
  rows, entries = [], []
  for r in sorted({row for row, _ in by}):
    combo, p = splits.table10_combination(r), paper.TABLE10[r]
    entry = report.CGEntry(combo, {arm: by.get((r, arm), ()) for arm in ARMS}, p)
    entries.append(entry)
    arms = [entry.runs(arm) for arm in ARMS]
    n = report.shared_n(*arms)
    gain, verdict = report.fmt_decision(entry.decision())
    rows.append([r, _label(combo), n if n is not None else "varies",
                 *[report.fmt_arm(a, with_n=n is None) for a in arms], gain, verdict,
                 f"{p.baseline:g} / {p.trained:g}", "✓" if p.helps else "✗"])
  headers = ["Row", "Sources -> target", "n", "Baseline", "Baseline+", "Trained", "Trained − B+ [95 % CI]",
             "CG helps?", "Paper B / T", "Paper helps"]

  def figure():
    from medcg.eval import plots
    rows_done = ", ".join(str(r) for r in sorted({row for row, _ in by}))
    return plots.cg_rows_figure(entries, f"Table 10: three-source CG rows {rows_done} ({common.runs_label(results)})")

  return {"markdown": report.markdown_table(headers, rows) + "\n" + report.CG_TEST_NOTE + "\n",
          "decisions": {str(r): None if (d := e.decision()) is None else d.to_dict()
                        for r, e in zip(sorted({row for row, _ in by}), entries)},
          "figures": {"table10": figure} if entries else {}}
