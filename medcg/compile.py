"""Compile a run for the hardware before renting it: memory fit, FLOPs, collectives, on a CPU-only host.

    python -m medcg.compile --config configs/cg_table3.py:data=medmat,model=llava-1.5-7b --target v5p-8
    python -m medcg.compile --config configs/cg_table3.py:data=medmat,model=llava-1.5-13b --target v5e-16 --search
    python -m medcg.compile --config configs/fit.py:llava-1.5-7b@h100x8 --target h100x8 --json fit.json
    python -m medcg.compile --config ... --target h200x1 --measure      # on an H200: also run one real step

The trainer's own step (medcg.train.state) is lowered from abstract shapes on the target's devices (libtpu's
topology for TPUs, the CUDA plugin's deviceless client for GPUs, `cpu8` for 8 host devices) and compiled by
the target's compiler: per-device bytes of params, optimizer state, frozen params and batch, XLA's temporaries
and the peak against the device's usable memory, a fit verdict with headroom (or how much is missing and which
knob helps), compile time, FLOPs reconciled with `model_flops`, the collectives of the optimised HLO and the
custom calls (TRIM kernels). `--config.mesh.*`, `--config.train.accum_steps`, `--config.model.llm.remat`
override the recipe as in medcg.train. Targets: see `medcg.aot.targets.TARGETS`.

Exit status: 0 when the train step fits (or the report was written for a target without a memory limit),
1 when it does not fit, 2 for a usage error (unknown target, mesh vs device count, missing backend), printed as
one line `medcg.compile: error: ...` (`--verbose` or MEDCG_VERBOSE=1 adds its traceback).
"""
from __future__ import annotations

import os
import sys


def _prepare_environment(argv) -> None:
  """Before jax starts: a CPU host compiling for a target needs no accelerator runtime; cpu8 needs 8 devices."""
  target = ""
  for i, a in enumerate(argv):
    if a.startswith("--target="):
      target = a.split("=", 1)[1]
    elif a == "--target" and i + 1 < len(argv):
      target = argv[i + 1]
  if "--measure" not in argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if target.startswith("cpu"):
    n = target.removeprefix("cpu") or "8"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  if target.startswith(("h100", "h200")):
    try:  # the CUDA plugin's environment (ptxas, no-driver checks) must be set before jax starts
      from medcg.aot import gpu_target  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except Exception:  # pylint: disable=broad-except  (no plugin: targets.check_backend says so in one line)
      pass


if __name__ == "__main__":
  _prepare_environment(sys.argv)

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).", lock_config=False)
flags.DEFINE_string("target", None, "Hardware target, e.g. v5p-8, v5e-16, v4-32, v6e-8, h100x8, h200x1, cpu8.")
flags.DEFINE_string("json", "", "Also write the report as JSON here (local or gs://).")
flags.DEFINE_bool("search", False, "Try a small grid (remat x accumulation x mesh) and report the best that fits.")
flags.DEFINE_bool("eval", True, "Also compile the evaluation (multiple-choice scoring) step.")
flags.DEFINE_bool("flops", True, "Reconcile compiler FLOPs with model_flops (two small extra compiles).")
flags.DEFINE_bool("measure", False, "Run one real step on this host's accelerator (the target's kind) and "
                  "compare its measured peak memory with the compiler's.")
from medcg import errors  # pylint: disable=wrong-import-position

errors.define_verbose_flag()
flags.mark_flags_as_required(["config", "target"])
FLAGS = flags.FLAGS
PROG = "medcg.compile"


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from medcg.aot import report as report_lib
  from medcg.aot import search as search_lib
  from medcg.aot import step_compile
  from medcg.aot import targets
  from medcg import fileio
  try:
    target = targets.get(FLAGS.target)
    config = FLAGS.config
    if FLAGS.measure:
      from medcg.aot import measure
      devices = measure.local_devices(target)
    else:
      devices = targets.devices(target)
    step_compile.target_mesh(config, devices)  # mesh vs device count: before anything compiles
    if FLAGS.search:
      print(f"medcg.compile: searching recipes for {target.name} ({search_lib.CRITERION})")
      found = search_lib.search(config, target.name, devices)
      result = found["best"] or {"target": target.name, "search": found}
      result["search"] = {k: v for k, v in found.items() if k != "best"}
      if found["best"] is None:
        print(f"medcg.compile: no candidate fits {target.name}")
    else:
      result = step_compile.run(config, target.name, with_eval=FLAGS.eval, with_flops=FLAGS.flops,
                                devices=devices)
    if FLAGS.measure and "train" in result and result["train"].get("fits") is not False:
      result["measured"] = measure.measure(config, devices, result)
    print(report_lib.format_text(result))
    if FLAGS.json:
      fileio.atomic_write_json(FLAGS.json, report_lib.jsonable(result))
      print(f"medcg.compile: wrote {FLAGS.json}")
  except Exception as e:  # the user's to fix: one line; anything else is a bug and keeps its traceback
    status = errors.exit_status(e, PROG)
    if status is None:
      raise
    sys.exit(status)
  fits = result.get("train", {}).get("fits")
  sys.exit(1 if fits is False else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=errors.absl_flags_parser(PROG))
