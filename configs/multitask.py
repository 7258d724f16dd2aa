"""Tables 1-2: multi-task vs single-task training (the paper's pilot, §2.2).

Arms: `baseline` (untrained, evaluated on every classification subset), `multi` (trained on every ID subset up
to the 3,000 cap, 600 on SynthMAT; evaluated on every ID and OOD subset, so Table 2's OOD columns come from the
same run), `single` (trained on one ID subset, `target=N`, and tested on it). Here the trained subsets are
tested on purpose (that is the pilot's question); OOD subsets never enter training.

  python -m medcg.train --config configs/multitask.py:arm=multi,seed=0 --workdir runs/multitask/multi
  python -m medcg.train --config configs/multitask.py:arm=single,target=3 --workdir runs/multitask/single03
  python -m experiments.sweep --config configs/multitask.py --launcher local
  python -m experiments.sweep --config configs/multitask.py:targets=3+28 --launcher local --collect

Expected runtime at the default size (SynthMAT, tiny, 32 px, 0.28 s per step of 32 on a 2-core CPU, measured
for the demo): `single` 600 samples x 12 epochs = 225 steps, about a minute; `multi` 15,000 samples x 12 epochs
= 5,625 steps, about 26 CPU minutes (use an accelerator); evaluating all 37 test splits (2,220 samples) a minute.

The paper's numbers (LLaVA-v1.5-7B, %; a few rows of `medcg.paper.TABLE1` / `TABLE2`):

| Subset | Triplet | Status | Baseline | Single-task | Multi-task |
|---|---|---|---|---|---|
| 03 | CT Lung COVID | ID | 47 | 49 | 89 |
| 28 | X-ray Lung COVID | ID | 30 | 64 | 72 |
| 32 | X-ray Brain State | ID | 49 | 97 | 100 |
| 05 | CT Brain State | OOD | 33 | – | 70 |
| 06 | CT Brain Cancer | OOD | 33 | – | 31 |
"""
from __future__ import annotations

from configs import common
from medcg import mat
from medcg import splits
from medcg.eval import report

ARMS = ("baseline", "multi", "single")
ARM_TITLES = {"baseline": "Baseline", "single": "Single-task", "multi": "Multi-task"}


def get_config(arg=None):
  """`arm` (multi | single | baseline), `target` (the ID subset of a single-task run), plus the common run args."""
  args = common.run_args(arg, arm="multi", target=3)
  common.check_choice(args, "arm", ARMS)
  setting = common.data_setting(args)
  cap = common.cap(setting)
  if args.arm == "single":
    target = mat.get(args.target)
    if target.status != "ID":
      raise ValueError(f"config arg 'target': single-task trains on an ID subset; {target} is {target.status}")
    with common.sizing(setting):
      train = splits.multitask_mixture(setting.counts, per_subset_cap=cap, subsets=[target.id])
    evals = common.target_eval(target.id)
  else:
    with common.sizing(setting):
      train = splits.multitask_mixture(setting.counts, per_subset_cap=cap)
    evals = [(s, "test", -1) for s in mat.CLASSIFICATION_SUBSETS]
  if args.arm == "baseline":
    train = []  # evaluated untrained
  elif not train:
    raise ValueError(f"config: no ID subset has training samples in {setting.source}")
  for subset, _, _ in train:
    if mat.get(subset).status != "ID":
      raise AssertionError(f"multitask: OOD subset {subset:02d} in the training mixture")
  return common.build_config(
      args, setting, train_mixture=train, eval_mixture=evals, trained=args.arm != "baseline",
      experiment=dict(name="multitask", arm=args.arm, target=args.target if args.arm == "single" else 0,
                      train_total=sum(n for _, _, n in train)))


def get_sweep(arg=None):
  """baseline and multi x seeds, then single for each of `targets` (default every ID subset) x seeds."""
  args = common.sweep_args(arg, targets="+".join(str(s) for s in mat.ID_SUBSETS), seeds=1)
  targets = common.int_list(args.targets, "targets")
  for t in targets:
    if mat.get(t).status != "ID":
      raise ValueError(f"config arg 'targets': {mat.get(t)} is not an ID subset")
  tail = common.pass_through(args)
  out = [common.entry(arm=arm, seed=s) + tail for arm in ("baseline", "multi") for s in common.seeds(args)]
  out += [common.entry(arm="single", target=t, seed=s) + tail for t in targets for s in common.seeds(args)]
  return out


def collect(results):
  """Tables 1-2 as one per-subset table (Baseline / Single-task / Multi-task with n and intervals, beside the
  paper's columns) and the multi-task run's modality x area heatmap (its first seed)."""
  by = common.group_runs(results, lambda p: p.get("arm", "multi"))
  runs = {ARM_TITLES[arm]: by[arm] for arm in ARMS if arm in by}
  figures = {}
  if by.get("multi"):
    def figure(res=by["multi"][0]):
      from medcg.eval import plots  # matplotlib only when the plot is written
      return plots.heatmap_figure(res, f"Tables 1-2: multi-task ({common.runs_label(results)}), seed {res['seed']}")
    figures["multitask_heatmap"] = figure
  return {"markdown": report.subset_table(runs, subsets=list(mat.CLASSIFICATION_SUBSETS)), "figures": figures}
