"""The judge tests' shared config: configs/judge.py pointed at the fixture questions, criteria and answers."""
import os

from configs import judge as judge_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "data", "judge")


def fixture_config(workdir, arg=None, *, fixtures=FIXTURES, candidates=("answers_a.jsonl",), elo_rounds=10):
  """get_config(arg) judging the fixture candidates against the fixture reference, writing into `workdir`."""
  c = judge_config.get_config() if arg is None else judge_config.get_config(arg)
  c.workdir = str(workdir)
  c.data.path = os.path.join(fixtures, "questions.json")
  c.data.criteria_path = os.path.join(fixtures, "criteria.json")
  c.answers.reference = os.path.join(fixtures, "answers_ref.jsonl")
  c.answers.candidates = ",".join(os.path.join(fixtures, p) for p in candidates)
  c.protocol.elo_rounds = elo_rounds
  return c
