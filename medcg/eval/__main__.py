"""Evaluate a training run: `python -m medcg.eval --workdir DIR`.

    python -m medcg.eval --workdir runs/row15 [--step N] [--mode generate|likelihood] [--batch_size B]
        [--mixture 3:test:-1,5:test:100] [--likelihood_target letter|text] [--out DIR]

Loads the run's config.json and the params of its checkpoint (the latest unless --step; an untrained
run gives the initial model), evaluates the mixture (default: config.data.eval_mixture), writes
samples.jsonl, results.json, report.md (+ heatmap) into --out (default workdir/eval/step_<N>, with the
mode / mixture in the name when they differ from the config's) and prints a summary table. Multi-host:
run the same command on every worker (as `python -m medcg.train`).

A bad flag, workdir or mixture prints one line `medcg.eval: error: ...` and exits 2; `--verbose` or
MEDCG_VERBOSE=1 adds its traceback. `--help` lists these flags with their defaults.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from absl import app, flags, logging

from medcg import errors

PROG = "medcg.eval"

flags.DEFINE_string("workdir", None, "A medcg.train run directory (config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_enum("mode", None, ["likelihood", "generate"], "MCQ mode (default: config.eval.mode).")
flags.DEFINE_integer("batch_size", None, "Global evaluation batch size (default: config.eval.batch_size).")
flags.DEFINE_string("mixture", None, "subset:split:n entries, comma-separated, n=-1 for all "
                    "(default: config.data.eval_mixture).")
flags.DEFINE_enum("likelihood_target", None, ["letter", "text"],
                  "Likelihood mode: score the option letter (as trained) or the option text.")
flags.DEFINE_string("out", None, "Output directory (default: workdir/eval/step_<N>[...]).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host); 0 = single or from the environment.")
flags.DEFINE_integer("process_id", -1, "This process's index for multi-process runs.")
flags.DEFINE_string("compilation_cache_dir", None, "JAX persistent compilation cache folder (local or gs://); \"off\" disables it. Default: $MEDCG_COMPILATION_CACHE, else ~/.cache/medcg/jax (medcg/compile_cache.py).")
errors.define_verbose_flag()
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def parse_mixture_flag(text: str) -> list[tuple[int, str, int]]:
  """"3:test:-1,05:test:100" -> [(3, "test", -1), (5, "test", 100)]; errors name the bad entry.

  Only the text is split here; the entries are checked by the pipeline's own mixture validation.
  """
  from medcg.data import pipeline
  entries = []
  for i, item in enumerate(x.strip() for x in text.split(",")):
    if not item:
      continue
    parts = item.split(":")
    if len(parts) != 3:
      raise errors.ConfigError(f"--mixture entry {i} {item!r}: expected subset:split:n")
    try:
      entries.append((parts[0], parts[1], int(parts[2])))
    except ValueError:
      raise errors.ConfigError(f"--mixture entry {i} {item!r}: n must be an integer (-1 for all)") from None
  if not entries:
    raise errors.ConfigError(f"--mixture {text!r} has no entries")
  try:
    parsed = pipeline.parse_mixture(entries)
  except ValueError as e:
    raise errors.ConfigError(f"--mixture: {e}".replace("data.mixture", "entry")) from e
  return [(e.subset, e.split, -1 if e.n_samples is None else e.n_samples) for e in parsed]


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step of a run, or None when it has none (an untrained arm)."""
  from medcg import fileio
  from medcg.train import checkpoint as ckpt_lib
  return ckpt_lib.latest_step(fileio.join(workdir, "checkpoints"))


def default_out(workdir: str, step: int, mode: str, mixture, config) -> str:
  """workdir/eval/step_<N>; a mode or mixture other than the config's gets its own name."""
  from medcg.eval import metrics, runner
  out = runner.step_dir(workdir, step)
  if mode != config.eval.mode:
    out += f"-{mode}"
  if [list(m) for m in mixture] != [list(m) for m in config.data.eval_mixture]:
    out += f"-mix{metrics.fingerprint([list(m) for m in mixture])[:8]}"
  return out


def print_summary(results: Mapping[str, Any], out_dir: str) -> None:
  """A rich table: overall, mean over subsets, unparsed rate, then one row per subset."""
  from rich import box
  from rich.console import Console
  from rich.table import Table
  from medcg.eval import stats
  from medcg.eval import report
  # A CG arm's subsets are labelled by their role in the experiment (its target is held out), as in report.md;
  # the paper's ID / OOD status only for a multitask run.
  roles = report.subset_roles(report.experiment_of(results))
  table = Table(title=f"medcg eval: {results['eval']['mode']} (step {results.get('step')})",
                box=box.SIMPLE_HEAD, pad_edge=False)  # no vertical rules: a CG run's rows fit 80 columns
  for col in ("", "triplet", "status" if roles is None else "role", "n", "acc. %", "95 % CI"):
    table.add_column(col, justify="right" if col in ("n", "acc. %", "95 % CI") else "left",
                     no_wrap=col in ("", "triplet", "role", "95 % CI"))
  overall = results["overall"]
  table.add_row("overall", "", "", str(overall["n"]), f"{100 * overall['accuracy']:.1f}",
                stats.wilson_text(overall["correct"], overall["n"]))
  table.add_row("subset mean", "", "", str(results["counts"]["subsets"]),
                f"{100 * results['macro_subset']:.1f}", "")
  table.add_row("unparsed", "", "", str(results["parse"]["unparsed"]),
                f"{100 * results['parse']['failure_rate']:.1f}", "")
  for key, v in results["per_subset"].items():
    role = v["status"] if roles is None else roles.get(int(key), report.MISSING)
    table.add_row(f"subset {key}", " ".join(v["triplet"]), role, str(v["n"]), f"{100 * v['accuracy']:.1f}",
                  stats.wilson_text(v["correct"], v["n"]))
  console = Console()
  console.print(table)
  if "detection" in results:  # detection subsets score boxes: cIoU, not accuracy
    det = Table(title="detection")
    for col in ("", "triplet", "n", "cIoU %", "mean IoU %", "unparsed %"):
      det.add_column(col, justify="left" if col in ("", "triplet") else "right")
    rows = [("overall", "", results["detection"]["overall"])]
    rows += [(f"subset {k}", " ".join(v["triplet"]), v) for k, v in results["detection"]["per_subset"].items()]
    for name, triplet, v in rows:
      det.add_row(name, triplet, str(v["n"]), f"{100 * v['ciou']:.1f}", f"{100 * v['mean_iou']:.1f}",
                  f"{100 * v['parse_failure_rate']:.1f}")
    console.print(det)
  print(f"wrote {out_dir}", flush=True)  # plain print: rich would wrap a long path over several lines


def run(workdir: str, *, step: int | None = None, mode: str | None = None, batch_size: int | None = None,
        mixture: Sequence[Sequence[Any]] | None = None, likelihood_target: str | None = None,
        out: str | None = None) -> tuple[dict[str, Any], str]:
  """Loads a run and evaluates it; returns (results, output directory)."""
  import jax
  from medcg.data import tokenizer as tok_lib
  from medcg.eval import runner
  from medcg.train import sharding as shd
  from medcg.train import trainer

  config = trainer.load_run_config(workdir)
  try:
    mesh = runner.mesh_from_config(config)
  except ValueError as e:  # trained elsewhere (a pod, more GPUs): evaluate data-parallel on what is here
    logging.warning("%s; evaluating on a data-parallel mesh over the %d devices here", e, jax.device_count())
    mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  if step is None:
    step = latest_step(workdir)
  model, config = trainer.load_model_from_workdir(workdir, step=step, config=config, mesh=mesh)
  step = 0 if step is None else int(step)
  tokenizer = tok_lib.make_tokenizer(config.data.tokenizer)
  mode = mode or config.eval.mode
  mixture = [tuple(m) for m in (mixture or config.data.eval_mixture)]
  out = out or default_out(workdir, step, mode, mixture, config)
  results = runner.evaluate(model, config, tokenizer, mixture=mixture, mode=mode, batch_size=batch_size,
                            out_dir=out, step=step, mesh=mesh, likelihood_target=likelihood_target,
                            checkpoint=runner.checkpoint_info(workdir, step, config),
                            progress=jax.process_index() == 0)
  return results, out


def main(argv):
  if len(argv) > 1:
    errors.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}; see --help")
  if not FLAGS["verbosity"].present:  # orbax logs each restore step at INFO (about 37 lines)
    logging.set_verbosity(logging.WARNING)
  from medcg import compile_cache
  from medcg.train import trainer
  import jax
  try:
    compile_cache.enable(FLAGS.compilation_cache_dir)
    trainer.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    mixture = parse_mixture_flag(FLAGS.mixture) if FLAGS.mixture else None
    results, out = run(FLAGS.workdir, step=FLAGS.step, mode=FLAGS.mode, batch_size=FLAGS.batch_size,
                       mixture=mixture, likelihood_target=FLAGS.likelihood_target, out=FLAGS.out)
  except Exception as e:  # the user's to fix: one line; anything else: a bug
    status = errors.exit_status(e, PROG)
    if status is None:
      raise
    sys.exit(status)
  if jax.process_index() == 0:
    print_summary(results, out)


parse_flags = errors.absl_flags_parser(PROG)

if __name__ == "__main__":
  app.run(main, argv=sys.argv, flags_parser=parse_flags)
