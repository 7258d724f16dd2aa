"""Fig. 4: scaling and disrupting CG with a fixed training volume, targets 03 (CT Lung COVID) and 28 (X-ray Lung COVID).

Seven settings per target: `baseline` (untrained), `all_unrelated`, `all_related` (every ID subset sharing an element),
`wo_modality` / `wo_area` / `wo_task` (All Related minus the subsets sharing that element), `all_data` (every ID
subset but the target). Each trained setting draws 15,000 samples (3,000 on SynthMAT), split as evenly as the
3,000 cap (600) allows; a pool too small for the total trains on what it has, and the run records the shortfall
(`config.experiment.shortfall`). With the registry's pools three settings fall short at 3,000 per subset:
03 w/o Area (4 subsets, 12,000), 03 w/o Task (2 subsets, 6,000) and 28 w/o Modality (2 subsets, 6,000).

  python -m medcg.train --config configs/scaling.py:target=3,setting=all_related,seed=0 --workdir runs/scaling/03_rel
  python -m experiments.sweep --config configs/scaling.py --launcher local
  python -m experiments.sweep --config configs/scaling.py:targets=3,seeds=3 --launcher local --collect

Expected runtime at the default size (SynthMAT, tiny, 32 px, up to 3,000 samples x 12 epochs = 1,125 steps):
about 5-6 minutes per trained setting on a 2-core CPU (0.28 s per step of 32, measured for the demo); the full
sweep (2 targets x 7 settings) about an hour.

The paper's bars (LLaVA-v1.5-7B, %; bar labels read from the text in legend order):

| Target | Baseline | All Unrelated | All Related | w/o Modality | w/o Area | w/o Task | All Data |
|---|---|---|---|---|---|---|---|
| 03 CT Lung COVID | 47 | 51 | 73 | 62 | 58 | 48 | 76 |
| 28 X-ray Lung COVID | 30 | 33 | 46 | 38 | 37 | 36 | 42 |
"""
from __future__ import annotations

from configs import common
from medcg import mat
from medcg import paper
from medcg import splits
from medcg.eval import report

TARGETS = tuple(paper.FIG4)              # (3, 28)
SETTINGS = paper.SCALING_SETTINGS        # baseline first, then the six pools


def mixture(args, setting: common.DataSetting) -> splits.Mixture | None:
  """The setting's training mixture (None for the untrained baseline)."""
  if args.setting == "baseline":
    return None
  return splits.scaling_mixture(args.target, args.setting, setting.counts, total=splits.SCALING_TOTAL,
                                per_subset_cap=splits.PER_SUBSET_CAP, scale=setting.scale)


def get_config(arg=None):
  """`target` (3 | 28, or any ID subset), `setting` (one of paper.SCALING_SETTINGS), plus the common run args."""
  args = common.run_args(arg, target=3, setting="all_related")
  common.check_choice(args, "setting", SETTINGS)
  mat.get(args.target)
  setting = common.data_setting(args)
  with common.sizing(setting):
    mix = mixture(args, setting)
  train = mix.as_list() if mix else []
  common.assert_target_held_out(train, args.target)
  return common.build_config(
      args, setting, train_mixture=train, eval_mixture=common.target_eval(args.target), trained=mix is not None,
      experiment=dict(name="scaling", target=mat.get(args.target).id, setting=args.setting,
                      mixture=mix.describe() if mix else "untrained", shortfall=mix.shortfall if mix else 0))


def get_sweep(arg=None):
  """targets (default 3+28) x settings x seeds (default 1)."""
  args = common.sweep_args(arg, targets="3+28", seeds=1)
  targets = common.int_list(args.targets, "targets")
  tail = common.pass_through(args)
  return [common.entry(target=t, setting=s, seed=seed) + tail
          for t in targets for s in SETTINGS for seed in common.seeds(args)]


def collect(results):
  """One Fig. 4 table and bar plot per target: each setting's accuracy (n, interval) beside the paper's bar."""
  by = common.group_runs(results, lambda p: (int(p["target"]), p["setting"]))
  sections, figures = [], {}
  for target in sorted({t for t, _ in by}):
    runs = {s: by[(t, s)] for (t, s) in by if t == target}
    t = mat.get(target)
    sections.append(f"### Target {t.id:02d} {' '.join(t.triplet)}\n\n" + report.scaling_table(target, runs))

    def figure(target=target, runs=runs):
      from medcg.eval import plots  # matplotlib only when the plot is written
      return plots.scaling_figure(target, runs, f"Fig. 4: scaling and disrupting CG ({common.runs_label(results)})")

    figures[f"fig4_target{target:02d}"] = figure
  return {"markdown": "\n".join(sections), "figures": figures}
