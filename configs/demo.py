"""The CPU demo (the main job): one Table 3 row on SynthMAT, Baseline vs Baseline+ vs Related, in minutes.

Target: Subset 03 (CT Lung COVID) via Table 3 row 25, CT-Brain-State (05) + X-ray-Lung-COVID (28) -> CT-Lung-COVID
(03), the fixed-task row with the paper's largest CG gain on 03 and the combination SynthMAT is built to carry:
05 teaches how CT renders findings, 28 what a COVID finding in the lungs looks like. `row=N` picks another row.

  python -m medcg.train --config configs/demo.py:arm=related --workdir runs/demo/related
  python -m medcg.train --config configs/demo.py:arm=baseline_plus --workdir runs/demo/baseline_plus
  python -m medcg.train --config configs/demo.py:arm=baseline --workdir runs/demo/baseline
  python -m experiments.sweep --config configs/demo.py --launcher local --root runs   # all three + the table
  python -m experiments.sweep --config configs/demo.py:seeds=3 --launcher local --root runs

Needs SynthMAT shards in data/synthmat_shards (see configs/common.py for the two commands). Expected runtime at
the default size (tiny model from scratch, 32 px, 600 train samples per subset, 1,200 per trained arm, 12 epochs
= 444 steps of 32, 0.28 s each): about 2.5 minutes per trained arm on a 2-core CPU, seconds for the baseline;
`python -m medcg.demo` (data + all three arms) takes about 5 minutes (experiments/results/demo.md).

Expected result (3 seeds, `python -m experiments.sweep --config configs/demo.py:seeds=3 --launcher local`), accuracy %
on 03's 60 test samples beside the paper's (LLaVA-v1.5-7B):

| Row | Combination -> target | Baseline | Baseline+ | Trained | Paper B / B+ / T |
|---|---|---|---|---|---|
| 25 | CT-Brain 05 + X-ray-Lung 28 -> CT-Lung 03 | 48.3 ± 2.9 | 50.0 ± 0.0 | 95.6 ± 1.9 | 47 / 50 / 81 |
"""
from __future__ import annotations

from configs import cg_table3
from configs import common

DEMO_ROW = 25
ARMS = ("baseline", "baseline_plus", "related")


def get_config(arg=None):
  """`arm` (related | baseline_plus | baseline), `row` (default 25), plus the common run args."""
  args = common.run_args(arg, row=DEMO_ROW, arm="related")
  common.check_choice(args, "arm", ARMS)
  run = ",".join(f"{k}={args[k]}" for k in args)
  config = cg_table3.get_config(run)
  config.experiment.name = "demo"
  return config


def get_sweep(arg=None):
  """The three arms x seeds (default 1); `row=N` moves the demo to another Table 3 row."""
  args = common.sweep_args(arg, row=DEMO_ROW, seeds=1)
  row = "" if args.row == DEMO_ROW else f",row={args.row}"
  tail = common.pass_through(args)
  return [common.entry(arm=arm, seed=s) + row + tail for arm in ARMS for s in common.seeds(args)]


def collect(results):
  """The demo row's CG table beside the paper's (runs without `row=` are the demo row)."""
  keyed = {}
  for arg, res in results.items():
    parsed = common.parse_entry(arg)
    parsed.setdefault("row", str(DEMO_ROW))
    keyed[common.entry(**parsed)] = res
  return cg_table3.collect(keyed)
