"""python -m medcg.train --config configs/x.py[:args] --workdir DIR [--overwrite] [--config.a.b=value ...]

DIR may be local or gs://BUCKET/... (on a pod, the same gs:// workdir on every worker). Re-running the same
command resumes; a workdir that holds another experiment is refused unless --overwrite. SIGTERM or Ctrl-C
checkpoints at the next step and exits 0 (a second Ctrl-C aborts at once).

A mistake in the flags, the config or the data (an unknown `--config.x.y` key, a bad value, a missing path)
prints one line `medcg.train: error: ...` and exits 2; `--verbose` or MEDCG_VERBOSE=1 adds its traceback.
`--help` lists these flags with their defaults (`--helpfull`: every library's too).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from medcg import errors

PROG = "medcg.train"

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics, run record. "
                    "Re-using it resumes.")
flags.DEFINE_bool("overwrite", False, "Delete what the workdir holds (another experiment's checkpoints, metrics, "
                  "results) and start again.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host); 0 = single or from the environment.")
flags.DEFINE_integer("process_id", -1, "This process's index for multi-process runs.")
flags.DEFINE_string("compilation_cache_dir", None, "JAX persistent compilation cache folder (local or gs://); \"off\" disables it. Default: $MEDCG_COMPILATION_CACHE, else ~/.cache/medcg/jax (medcg/compile_cache.py).")
errors.define_verbose_flag()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if not FLAGS["verbosity"].present:  # orbax and grain log every step at INFO
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    errors.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}; see --help")
  from medcg import compile_cache
  from medcg.train import trainer
  compile_cache.enable(FLAGS.compilation_cache_dir)
  try:
    trainer.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    result = trainer.train(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  except KeyboardInterrupt:
    print("medcg.train: aborted (second Ctrl-C); the last checkpoint is as it was", file=sys.stderr, flush=True)
    os._exit(130)  # at once: background checkpoint and data threads are not waited for
  except Exception as e:  # the user's to fix (config, paths, data, storage): one line; anything else: a bug
    status = errors.exit_status(e, PROG)
    if status is None:
      raise
    sys.exit(status)
  # The trainer printed the closing lines (medcg.train.summary): final metrics and where the outputs are.
  logging.info("finished at step %d%s; last metrics %s", result.step, " (preempted)" if result.preempted else "",
               result.metrics)


if __name__ == "__main__":
  app.run(main, flags_parser=errors.absl_flags_parser(PROG))
