"""Fig. 5 (no target data: 0-3,000 composition samples) and Fig. 6 (limited target data: 0-2,000 target samples).

Fig. 5 (`fig=5`): per direction type, one Table 3 row where Trained beats both baselines by >= 10 points
(`paper.fig5_candidates`, ties broken with `random.Random(42)` as the paper did). The training set grows over
`n` = 0 / 1,000 / 2,000 / 3,000 composition samples, split evenly over the row's two subsets (`related`) or drawn
from the unrelated pool (`baseline_plus`); `n=0` is the untrained model (`arm=baseline`).
Fig. 6 (`fig=6`): per direction type, one row marked ✗ in Table 3 (`paper.fig6_candidates`, seed 42). The row's
full related / unrelated mixture plus `n` = 0 / 500 / ... / 2,000 samples of the target itself, the only runs in
medcg where target data is trained on (declared through `splits.add_target_samples`).
On SynthMAT every count is scaled by synth_train / 3,000 (0.2: n = 3,000 -> 600); `row=N` overrides the choice.

  python -m medcg.train --config configs/limited_data.py:fig=5,direction=task,n=2000,arm=related --workdir runs/f5
  python -m medcg.train --config configs/limited_data.py:fig=6,direction=area,n=500,arm=baseline_plus --workdir runs/f6
  python -m experiments.sweep --config configs/limited_data.py --launcher local
  python -m experiments.sweep --config configs/limited_data.py:figs=5,directions=task,seeds=3 --launcher local --collect

Expected runtime at the default size (SynthMAT, tiny, 32 px, 12 epochs, 0.28 s per step of 32 on a 2-core
CPU, measured for the demo): Fig. 5 runs 200-600 samples (75-225 steps, under 2 minutes each); Fig. 6 runs
1,200-1,600 samples (450-600 steps, 2-3 minutes each); the full sweep (68 runs) about 2-3 CPU hours.

The paper prints no numbers for these figures (curves only); its finding: related data beats unrelated data at
every size, and with target data the related combination peaks sooner. The rows picked (seed 42):

| Figure | Direction | Table 3 row | Paper Baseline / Baseline+ / Trained |
|---|---|---|---|
| 5 | each type | `paper.pick(paper.fig5_candidates(direction))` | see `configs/cg_table3.py` |
| 6 | each type | `paper.pick(paper.fig6_candidates(direction))` (✗ rows) | see `configs/cg_table3.py` |
"""
from __future__ import annotations

from configs import common
from medcg import mat
from medcg import paper
from medcg import splits
from medcg.eval import report

FIGS = (5, 6)
ARMS = ("baseline", "baseline_plus", "related")
SAMPLES = {5: paper.FIG5_SAMPLES, 6: paper.FIG6_TARGET_SAMPLES}


def chosen_row(fig: int, direction: str, row: int = 0) -> paper.CGRow:
  """The Table 3 row of a figure and direction type (the paper's seed-42 pick unless `row` is given)."""
  if row:
    r = paper.table3_row(row)
    if r.direction != direction:
      raise ValueError(f"config arg 'row': Table 3 row {row} is {r.direction!r}, not {direction!r}")
    return r
  candidates = paper.fig5_candidates(direction) if fig == 5 else paper.fig6_candidates(direction)
  return paper.pick(candidates, seed=42)


def mixture(args, setting: common.DataSetting) -> tuple[splits.Combination, splits.Mixture | None]:
  """The run's combination and training mixture (n in the paper's units, scaled; None when untrained)."""
  combo = splits.table3_combination(chosen_row(args.fig, args.direction, args.row).row)
  cap = common.cap(setting)
  if args.fig == 5:
    if args.n == 0:  # the untrained point
      return combo, None
    related = splits.combination_mixture(combo, setting.counts, total=args.n, scale=setting.scale)
    if args.arm == "related":
      return combo, related
    return combo, splits.baseline_plus_mixture(combo, setting.counts, related.total, per_subset_cap=cap)
  arms = splits.cg_mixtures(combo, setting.counts, scale=setting.scale)
  n = setting.scaled(args.n) if args.n else 0
  return combo, splits.add_target_samples(arms[args.arm], setting.counts, n)


def _check(args) -> None:
  common.check_choice(args, "fig", FIGS)
  common.check_choice(args, "direction", paper.DIRECTIONS)
  common.check_choice(args, "arm", ARMS)
  common.check_choice(args, "n", SAMPLES[args.fig])
  if args.fig == 5 and (args.n == 0) != (args.arm == "baseline"):
    raise ValueError("config args: Fig. 5 at n=0 is the untrained model (arm=baseline), and arm=baseline "
                     f"means n=0; got n={args.n}, arm={args.arm}")
  if args.fig == 6 and args.arm == "baseline":
    raise ValueError("config arg 'arm': Fig. 6 compares related and baseline_plus (both trained)")


def get_config(arg=None):
  """`fig` (5 | 6), `direction`, `n` (paper units), `arm`, `row` (0 = the paper's pick), plus the common run args."""
  args = common.run_args(arg, fig=5, direction="task", n=3000, arm="related", row=0)
  _check(args)
  setting = common.data_setting(args)
  with common.sizing(setting):
    combo, mix = mixture(args, setting)
  train = mix.as_list() if mix else []
  common.assert_target_held_out(train, combo.target, allowed=mix.target_samples if mix else 0)
  return common.build_config(
      args, setting, train_mixture=train, eval_mixture=common.target_eval(combo.target), trained=mix is not None,
      experiment=dict(name="limited_data", fig=args.fig, direction=args.direction, n=args.n, arm=args.arm,
                      row=chosen_row(args.fig, args.direction, args.row).row, target=combo.target,
                      target_samples=mix.target_samples if mix else 0,
                      mixture=mix.describe() if mix else "untrained"))


def get_sweep(arg=None):
  """figs x directions x n x arms x seeds; Fig. 6 points the target cannot supply are left out."""
  args = common.sweep_args(arg, figs="5+6", directions="+".join(paper.DIRECTIONS), seeds=1)
  figs = common.int_list(args.figs, "figs")
  directions = str(args.directions).split("+")
  for f in figs:
    if f not in FIGS:
      raise ValueError(f"config arg 'figs': expected 5 and/or 6, got {f}")
  for d in directions:
    if d not in paper.DIRECTIONS:
      raise ValueError(f"config arg 'directions': unknown direction type {d!r}; expected {paper.DIRECTIONS}")
  setting = common.data_setting(args)
  tail = common.pass_through(args)
  out = []
  for fig in figs:
    for d in directions:
      target = chosen_row(fig, d).target
      for n in SAMPLES[fig]:
        if fig == 6 and n and setting.scaled(n) > splits.available(setting.counts, target):
          continue
        arms = ("baseline",) if fig == 5 and n == 0 else ("related", "baseline_plus")
        out += [common.entry(fig=fig, direction=d, n=n, arm=a, seed=s) + tail
                for a in arms for s in common.seeds(args)]
  return out


def collect(results):
  """Per figure, a table of target accuracy (n, interval) by direction type, arm and n, and its curves (one
  panel per direction type); the paper has curves only."""
  by = common.group_runs(results, lambda p: (int(p["fig"]), p["direction"], p["arm"], int(p["n"])))
  sections, series, figures = [], {}, {}
  for fig in FIGS:
    keys = [k for k in by if k[0] == fig]
    if not keys:
      continue
    headers = ["Direction", "Row -> target", "Arm"] + [f"n={n}" for n in SAMPLES[fig]]
    rows = []
    title = ("Fig. 5: composition samples, no target data" if fig == 5
             else "Fig. 6: target samples added to the composition")
    for d in paper.DIRECTIONS:
      r = chosen_row(fig, d)
      curves, chance = {}, None
      for arm in ("related", "baseline_plus"):
        if not any(k[1] == d and k[2] == arm for k in keys):
          continue
        cells, points = [], []
        for n in SAMPLES[fig]:
          got = by.get((fig, d, "baseline" if fig == 5 and n == 0 else arm, n), ())
          runs = report.arm_runs(got, r.target)
          chance = chance if chance is not None else report.chance(got, r.target)
          cells.append(report.fmt_arm(runs))
          points.append(runs)
          series.setdefault(f"fig{fig}/{d}/{arm}", []).append([n, [a.accuracy for a in runs]])
        curves[report.ARM_TITLES[arm]] = points
        rows.append([paper.DIRECTION_TITLES[d], f"{r.row}: {' + '.join(f'{s:02d}' for s in r.train)} -> "
                     f"{mat.get(r.target).id:02d}", report.ARM_TITLES[arm]] + cells)
      if curves:
        t = mat.get(r.target)

        def figure(fig=fig, curves=curves, chance=chance, label=f"{title} ({common.runs_label(results)})\n"
                   f"{paper.DIRECTION_TITLES[d]}, "
                   f"row {r.row}: {' + '.join(f'{s:02d}' for s in r.train)} -> {t.id:02d} {' '.join(t.triplet)}"):
          from medcg.eval import plots  # matplotlib only when the plot is written
          xlabel = "composition training samples" if fig == 5 else "target samples added to training"
          return plots.curves_figure(SAMPLES[fig], curves, xlabel, label, chance)

        figures[f"fig{fig}_{d}"] = figure
    sections.append(f"### {title} (paper: curves only)\n\n" + report.markdown_table(headers, rows))
  return {"markdown": "\n".join(sections), "series": series, "figures": figures}
