"""Every command line: --help lists its flags (exit 0); a user's mistake is one stderr line, exit 2, no traceback."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JUDGE_DATA = os.path.join(REPO, "tests", "data", "judge")

# (module, flags its --help must list)
HELP = [
    ("medcg.data", ["synth", "convert", "--verbose"]),
    ("medcg.train", ["--workdir", "--config", "--overwrite", "--verbose"]),
    ("medcg.eval", ["--workdir", "--mixture", "--verbose"]),
    ("medcg.judge", ["--config", "--label_policy", "--verbose"]),
    ("medcg.demo", ["--workdir", "--seeds", "(default: 1)", "--verbose"]),
    ("experiments.sweep", ["--config", "--launcher", "(default: print)", "--verbose"]),
]


# (module, args, what the error line must name) per command line; none of them trains or writes data. "{tmp}" is
# the test's tmp_path.
BAD = [
    ("medcg.data", ["convert", "--src", "/nonexistent", "--out", "{tmp}/y"], "/nonexistent"),
    ("medcg.train", ["--config", "configs/demo.py", "--workdir", "{tmp}/x", "--config.train.lrr=1"],
     'medcg.train: error: --config.train.lrr: no such key in config.train (did you mean "lr"?)'),
    ("medcg.eval", ["--workdir", "/nonexistent"], "/nonexistent"),
    ("medcg.judge", ["--config", "configs/judge.py", f"--config.data.path={JUDGE_DATA}/questions.json",
                     "--config.answers.reference=/nonexistent/ref.jsonl", "--config.workdir={tmp}/j"],
     "/nonexistent/ref.jsonl"),
    ("medcg.demo", ["--seeds", "0", "--workdir", "{tmp}/d"], "--seeds"),
    ("experiments.sweep", ["--config", "configs/nonexistent.py"], "configs/nonexistent.py"),
]


def run(module, args, verbose=False):
  """`python -m module args` from the repository root, as a user runs it (MEDCG_VERBOSE=1 only if `verbose`)."""
  env = {k: v for k, v in os.environ.items() if k != "MEDCG_VERBOSE"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **({"MEDCG_VERBOSE": "1"} if verbose else {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("module,names", HELP, ids=[m for m, _ in HELP])
def test_help_lists_the_flags(module, names):
  r = run(module, ["--help"])
  assert r.returncode == 0, r.stderr[-2000:]
  for name in names:
    assert name in r.stdout, (name, r.stdout[-3000:])


@pytest.mark.parametrize("module,args,named", BAD, ids=[m for m, _, _ in BAD])
def test_a_bad_argument_is_one_line(module, args, named, tmp_path):
  r = run(module, [a.replace("{tmp}", str(tmp_path)) for a in args])
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
  assert len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith(f"{module}: error: ") and named in lines[0], lines


def test_absl_flag_errors_are_one_line(tmp_path):
  r = run("medcg.train", ["--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.train.lr=abc"])
  assert r.returncode == 2 and r.stderr.splitlines() == [
      "medcg.train: error: flag --config.train.lr=abc: could not convert string to float: 'abc'; see --help"]
  r = run("medcg.train", ["--bogus"])
  assert r.returncode == 2 and r.stderr.splitlines() == [
      "medcg.train: error: Unknown command line flag 'bogus'; see --help"]


def test_verbose_shows_the_traceback(tmp_path):
  r = run("experiments.sweep", ["--config", "configs/nonexistent.py", "--verbose"])
  assert r.returncode == 2 and "Traceback" in r.stderr, r.stderr[-3000:]
  assert r.stderr.rstrip().splitlines()[-1] == (
      "experiments.sweep: error: --config: no such config file configs/nonexistent.py")
  r = run("medcg.train", ["--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.train.lrr=1"],
          verbose=True)  # absl: MEDCG_VERBOSE=1 (or --verbose)
  assert r.returncode == 2 and "Traceback" in r.stderr, r.stderr[-3000:]
  assert r.stderr.rstrip().splitlines()[-1].startswith("medcg.train: error: --config.train.lrr: no such key")
