"""One fit recipe as a runnable config: Table 3 row 15 on Med-MAT with the recipe for MODEL on TARGET.

  python -m medcg.compile --config configs/fit.py:llava-1.5-7b@h100x8 --target h100x8 --json fit.json

Expected: exit status 0 (the train step fits) with the per-device peak of experiments/results/aot_fit.md for the
pair. The recipes themselves are the table in configs/hardware.py; any experiment config takes one with
`hw=TARGET`, which is how a real run uses it (`configs/cg_table3.py:row=15,data=medmat,hf=DIR,hw=v5p-8`).
"""
from __future__ import annotations

import ml_collections

from configs import cg_table3
from configs import hardware


def get_config(arg: str | None = None, *, allow_misses: bool = False) -> ml_collections.ConfigDict:
  """`MODEL@TARGET` (default llava-1.5-7b@v5p-8). `allow_misses` also builds a pair the compiler showed cannot
  fit (experiments/aot_fit compiles those too, to keep the evidence)."""
  model, _, target = (arg or "llava-1.5-7b@v5p-8").partition("@")
  hardware.recipe(model, target, allow_misses=allow_misses)  # an unknown pair fails here, naming the known ones
  return hardware.apply(cg_table3.get_config(f"data=medmat,model={model}"), model, target, allow_misses=allow_misses)
