"""CLI: `python -m medcg.judge --config configs/judge.py[:args] [--config.x=...] [--no-cache]`.

Writes judgements.jsonl, results.json and leaderboard.md into `config.workdir`; judgements are cached
in `<workdir>/judge_cache.sqlite`, so rerunning after a crash only sends what is missing.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from medcg.judge import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Judge config file (configs/judge.py).",
                                          lock_config=True)
flags.DEFINE_bool("no-cache", False, "Send every judge call again instead of replaying cached judgements.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  paths = launch.run_config(_CONFIG.value, read_cache=not flags.FLAGS["no-cache"].value)
  logging.info("leaderboard: %s", paths["leaderboard.md"])
  with open(paths["leaderboard.md"], encoding="utf-8") as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
