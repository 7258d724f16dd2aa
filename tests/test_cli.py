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
    ("medcg.compile", ["--config", "--target", "--verbose"]),
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
    ("medcg.compile", ["--config", "configs/demo.py", "--target", "bogus"], "--target='bogus' is not a known target"),
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


# ----------------------------------------------------------------------------------------------------------
# One flag spelling: underscores (absl's, as big_vision and MaxText), with the dashed spelling accepted too.
def test_argparse_commands_list_underscore_flags_and_take_both_spellings():
  from medcg import errors
  p = errors.ArgumentParser(prog="x")
  p.add_argument("--image-size", type=int, default=3)
  p.add_argument("--no_progress", action="store_true")
  assert p.parse_args(["--image_size", "4"]).image_size == 4
  assert p.parse_args(["--image-size", "5", "--no-progress"]).no_progress
  text = p.format_help()
  assert "--image_size IMAGE_SIZE" in text and "--image-size" not in text and "--no-progress" not in text
  for module, args in (("medcg.data", ["synth", "--help"]), ("medcg.demo", ["--help"]),
                       ("experiments.sweep", ["--help"])):
    r = run(module, args)
    assert r.returncode == 0 and "_" in r.stdout, r.stderr[-2000:]
    dashed = [w for w in r.stdout.split() if w.startswith("--") and "-" in w[2:].split("=")[0]]
    assert not dashed, (module, dashed)


def test_absl_commands_take_dashed_flags_too():
  from medcg import errors
  argv = ["prog", "--batch-size=8", "--likelihood-target", "text-x", "--config.a_b.c=x-y", "--", "--x-y"]
  assert errors.dashes_to_underscores(argv) == [
      "prog", "--batch_size=8", "--likelihood_target", "text-x", "--config.a_b.c=x-y", "--", "--x-y"]
  r = run("medcg.eval", ["--workdir", "/nonexistent", "--batch-size", "8"])  # parsed: the error is the workdir's
  assert r.returncode == 2 and "/nonexistent" in r.stderr and "Unknown command line flag" not in r.stderr, r.stderr
