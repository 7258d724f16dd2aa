"""CLI: `python -m medcg.judge --config configs/judge.py[:args] [--config.x=...] [--no_cache]
[--label_policy=last_line|strict]`.

Writes judgements.jsonl, results.json and leaderboard.md into `config.workdir` (local or gs://); judgements
are cached in `config.cache.path` (default `<workdir>/judge_cache.sqlite`; a local file, as SQLite needs), so
rerunning after a crash only sends what is missing.

Answer files are named (in the leaderboard and results.json) by, first that applies:
NAME=PATH in config answers.reference / answers.candidates; the model id every record carrying one agrees on
(`model`, `model_id`, `gen_model_id`, `name`); the file name, or the folder of a `samples.jsonl`. Two files
with one name are an error; name them apart:

  --config.answers.candidates=run_a=runs/a/eval/step_444/samples.jsonl,run_b=runs/b/eval/step_444/samples.jsonl

A judge leaving more than config protocol.max_unparsed_rate (default 0.2) of its replies unparsed is warned
about at the end (and in leaderboard.md / results.json), with its first replies.

A bad flag, config key or path prints one line `medcg.judge: error: ...` and exits 2; `--verbose` or
MEDCG_VERBOSE=1 adds its traceback. `--help` lists these flags with their defaults.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from medcg import errors
from medcg import fileio
from medcg.judge import launch

PROG = "medcg.judge"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Judge config file (configs/judge.py). Answer files: --config.answers.reference and "
    "--config.answers.candidates (comma-separated), each entry PATH or NAME=PATH; a file's model name is its "
    "NAME=, else its records' model id (model / model_id / gen_model_id / name), else its file or folder name.",
    lock_config=True)
flags.DEFINE_bool("no_cache", False, "Send every judge call again instead of replaying cached judgements.")
flags.DEFINE_string("label_policy", None, "How a reply with several label lines is read: 'last_line' (the last "
                    "one wins) or 'strict' (different labels: unparsed). Default: config protocol.label_policy, "
                    "else 'last_line'. Cached replies are re-read under it.")
errors.define_verbose_flag()
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    errors.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}; see --help")
  try:
    paths = launch.run_config(_CONFIG.value, read_cache=not flags.FLAGS.no_cache,
                              label_policy=flags.FLAGS.label_policy)
  except Exception as e:  # the user's to fix (a config key, a path, storage): the message, no traceback
    status = errors.exit_status(e, PROG)
    if status is None:
      raise
    sys.exit(status)
  logging.info("leaderboard: %s", paths["leaderboard.md"])
  print(fileio.read_text(paths["leaderboard.md"]))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.absl_flags_parser(PROG))
