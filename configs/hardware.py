"""Fit recipes: the mesh, remat and accumulation that fit a model's full fine-tune on a given target.

The paper's recipe (LLaVA-1.5, vision tower frozen, global batch 32, 5 epochs, f32 master weights with AdamW,
bf16 compute) on each target, every one checked by the target's own compiler on a CPU host:

  python -m experiments.aot_fit                      # compiles every recipe -> experiments/results/aot_fit.{md,json}
  python -m medcg.compile --config configs/cg_table3.py:data=medmat,model=llava-1.5-7b,hw=v5p-8 --target v5p-8

Any experiment config takes a recipe with the run arg `hw=<target>` (configs/common.py), e.g.

  python -m medcg.train --config configs/cg_table3.py:row=15,data=medmat,hf=ckpt/llava-1.5-7b-hf,hw=v5e-16 ...

A recipe changes partitioning and recompute only (mesh, remat, accum_steps): the same global batch gives the same
loss and gradients whatever the recipe (medcg.train.step), so runs on different hardware stay comparable. GPU
recipes may also set XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates 75 % of a card by default); the trainer
does not set environment variables, so `env` is printed by medcg.compile and experiments/aot_fit for the launch
command. This module is the table only (configs/common.py imports it for `hw=`); `configs/fit.py:MODEL@TARGET`
is the runnable config of one recipe.
"""
from __future__ import annotations

import ml_collections

from medcg import configlib

# (model preset, target) -> recipe. mesh: (data, fsdp, tensor); remat: every tower's policy. A recipe with
# `use` is a pair the compiler showed cannot fit even at the smallest micro-batch (experiments/results/aot_fit.md
# gives its numbers): `hw=` refuses it and names the nearest target that fits; experiments/aot_fit still compiles
# it, as written, so the table keeps the evidence.
RECIPES: dict[tuple[str, str], dict] = {
    ("llava-1.5-7b", "v5p-8"): dict(mesh=(1, 4, 1), remat="full", accum_steps=1),
    ("llava-1.5-7b", "v5e-16"): dict(mesh=(1, 16, 1), remat="full", accum_steps=1),
    ("llava-1.5-7b", "v4-16"): dict(mesh=(1, 8, 1), remat="full", accum_steps=1),
    ("llava-1.5-7b", "h100x8"): dict(mesh=(1, 8, 1), remat="full", accum_steps=1),
    ("llava-1.5-7b", "h200x1"): dict(mesh=(1, 1, 1), remat="full", accum_steps=8,
                                     env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}),
    ("llava-1.5-13b", "v5p-8"): dict(mesh=(1, 4, 1), remat="full", accum_steps=1),
    ("llava-1.5-13b", "v5e-16"): dict(mesh=(1, 16, 1), remat="full", accum_steps=2, use="v5e-32"),
    ("llava-1.5-13b", "v5e-32"): dict(mesh=(1, 32, 1), remat="full", accum_steps=1),
    ("llava-1.5-13b", "v4-16"): dict(mesh=(1, 8, 1), remat="full", accum_steps=4, use="v4-32"),
    ("llava-1.5-13b", "v4-32"): dict(mesh=(1, 16, 1), remat="full", accum_steps=2),
    ("llava-1.5-13b", "h100x8"): dict(mesh=(1, 8, 1), remat="full", accum_steps=1),
    ("llava-1.5-13b", "h200x1"): dict(mesh=(1, 1, 1), remat="full", accum_steps=32,
                                      env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}, use="h100x8"),
    # Qwen2-VL-7B (8.3B params: 675M ViT, frozen; merger + 7.6B decoder trained), 256 image tokens at 448 px.
    ("qwen2-vl-7b", "v5p-8"): dict(mesh=(1, 4, 1), remat="full", accum_steps=1),
    ("qwen2-vl-7b", "h100x8"): dict(mesh=(1, 8, 1), remat="full", accum_steps=1),
}


def recipe(model: str, target: str, *, allow_misses: bool = False) -> dict:
  if (model, target) not in RECIPES:
    known = ", ".join(f"{m}@{t}" for m, t in RECIPES if "use" not in RECIPES[(m, t)])
    raise ValueError(f"config arg 'hw': no fit recipe for {model} on {target}; recipes: {known}")
  r = RECIPES[(model, target)]
  if "use" in r and not allow_misses:
    raise ValueError(f"config arg 'hw': {model} does not fit {target} even at a per-device micro-batch of 1 "
                     f"(experiments/results/aot_fit.md has the compiler's numbers); use hw={r['use']}")
  return r


def apply(config: ml_collections.ConfigDict, model: str, target: str, *,
          allow_misses: bool = False) -> ml_collections.ConfigDict:
  """Set config.mesh, every tower's remat and train.accum_steps from the recipe; returns config."""
  r = recipe(model, target, allow_misses=allow_misses)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = r["mesh"]
  config.mesh.num_devices = 0
  config.train.accum_steps = r["accum_steps"]
  configlib.set_remat(config, r["remat"])
  config.hardware.target = target
  config.hardware.env = ml_collections.ConfigDict(dict(r.get("env", {})))
  return config
