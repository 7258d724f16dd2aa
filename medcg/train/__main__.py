"""python -m medcg.train --config configs/x.py[:args] --workdir DIR [--config.a.b=value ...]"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, run record. Re-using it resumes.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host); 0 = single or from the environment.")
flags.DEFINE_integer("process_id", -1, "This process's index for multi-process runs.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax and grain log every step at INFO
    logging.set_verbosity(logging.WARNING)
  from medcg.train import trainer
  trainer.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  result = trainer.train(FLAGS.config, FLAGS.workdir)
  logging.info("finished at step %d%s; last metrics %s", result.step, " (preempted)" if result.preempted else "",
               result.metrics)
  print(f"medcg.train: step {result.step}{' preempted' if result.preempted else ''} "
        f"loss {result.losses[-1] if result.losses else float('nan'):.6f}")


if __name__ == "__main__":
  app.run(main)
