"""experiments.sweep's progress lines: skip, summary, start, done (with the run's accuracy), fail, the tally.

The runs are tiny python subprocesses standing in for medcg.train: no training, seconds on a CPU.
"""
import json
import os
import re
import sys

from experiments import sweep
from experiments.launchers import local

WRITE_RESULTS = ("import json, os, sys; os.makedirs(sys.argv[1], exist_ok=True); print('training...'); "
                 "json.dump(json.loads(sys.argv[2]), open(os.path.join(sys.argv[1], 'results.json'), 'w'))")
FAIL = "import sys; print('step 1'); print('ValueError: bad shards', flush=True); print(); sys.exit(3)"


def _results(acc: float, n: int = 60, ciou: float | None = None) -> dict:
  out = {"overall": {"n": n, "correct": round(n * acc), "accuracy": acc},
         "per_subset": {"03": {"n": n, "correct": round(n * acc), "accuracy": acc}}}
  if ciou is not None:
    out["detection"] = {"overall": {"ciou": ciou, "n": 10, "parse_failure_rate": 0.0}, "per_subset": {}}
  return out


def _ok(workdir, results: dict) -> list[str]:
  return [sys.executable, "-c", WRITE_RESULTS, str(workdir), json.dumps(results)]


def _run(tmp_path, arg: str, cmd=None, *, done: bool = False) -> dict:
  workdir = tmp_path / "runs" / "cfg" / sweep.run_name(arg)
  if done:
    workdir.mkdir(parents=True)
    (workdir / "results.json").write_text(json.dumps(_results(0.5)))
  return {"arg": arg, "workdir": str(workdir), "done": done, "cmd": cmd or _ok(workdir, _results(0.95))}


def test_local_runs_report_skip_start_done_fail_and_the_tally(tmp_path, capsys):
  finished = _run(tmp_path, "arm=baseline,seed=0", done=True)
  good = _run(tmp_path, "arm=related,seed=0")
  bad = _run(tmp_path, "arm=baseline_plus,seed=0", [sys.executable, "-c", FAIL])
  assert local.run([finished, good, bad], 1) == [("arm=related,seed=0", 0), ("arm=baseline_plus,seed=0", 3)]
  err = capsys.readouterr().err.splitlines()
  good_log, bad_log = (os.path.join(r["workdir"], "sweep.log") for r in (good, bad))
  assert err[:3] == [
      f"[skip] arm=baseline,seed=0: finished ({finished['workdir']})",
      "3 runs: 1 finished already, 2 to run",
      f"[start 1/2] arm=related,seed=0 -> {good['workdir']} (log: {good_log})"]
  assert re.fullmatch(r"\[done 1/2\] arm=related,seed=0 in \d+(\.\d)? s: accuracy 95\.0 % \(n=60\)", err[3]), err[3]
  assert err[4] == f"[start 2/2] arm=baseline_plus,seed=0 -> {bad['workdir']} (log: {bad_log})"
  assert re.fullmatch(rf"\[fail 2/2\] arm=baseline_plus,seed=0: exit code 3 after \d+(\.\d)? s; log: "
                      rf"{re.escape(bad_log)}", err[5]), err[5]
  assert err[6] == "  last log line: ValueError: bad shards"
  assert err[7] == "sweep: 1 finished, 1 failed, 1 skipped (failed: arm=baseline_plus,seed=0)"
  assert len(err) == 8
  assert open(good_log).read() == "training...\n"  # the runs' own output stays in their logs


def test_the_headline_reports_ciou_and_is_left_out_without_results(tmp_path, capsys):
  det = _run(tmp_path, "arm=det")
  det["cmd"] = _ok(det["workdir"], _results(0.5, n=20, ciou=0.625))
  det_only = _run(tmp_path, "arm=det_only")  # a detection-only evaluation: n=0, no accuracy
  det_only["cmd"] = _ok(det_only["workdir"], _results(0.0, n=0, ciou=0.4))
  none = _run(tmp_path, "arm=none", [sys.executable, "-c", "print('no evaluation')"])
  broken = _run(tmp_path, "arm=broken")
  broken["cmd"] = [sys.executable, "-c", f"open({os.path.join(broken['workdir'], 'results.json')!r}, 'w').write('{{')"]
  assert [rc for _, rc in local.run([det, det_only, none, broken], 1)] == [0, 0, 0, 0]
  done = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[done")]
  assert done[0].endswith("s: accuracy 50.0 % (n=20); cIoU 62.5 %"), done[0]
  assert done[1].endswith("s: cIoU 40.0 %"), done[1]
  assert re.fullmatch(r"\[done 3/4\] arm=none in \d+(\.\d)? s", done[2]), done[2]
  assert re.fullmatch(r"\[done 4/4\] arm=broken in \d+(\.\d)? s", done[3]), done[3]


def test_parallel_runs_print_whole_lines(tmp_path, capsys):
  runs = [_run(tmp_path, f"seed={i}") for i in range(6)]
  runs += [_run(tmp_path, f"bad={i}", [sys.executable, "-c", FAIL]) for i in range(3)]
  runs += [_run(tmp_path, "old", done=True)]
  out = local.run(runs, 4)
  assert sorted(rc for _, rc in out) == [0] * 6 + [3] * 3
  err = capsys.readouterr().err.splitlines()
  patterns = [r"\[skip\] old: finished \(.*\)", r"10 runs: 1 finished already, 9 to run",
              r"\[start [1-9]/9\] \S+ -> \S+ \(log: \S+\)", r"\[done [1-9]/9\] seed=\d in .*: accuracy 95\.0 % \(n=60\)",
              r"\[fail [1-9]/9\] bad=\d: exit code 3 after .* s; log: \S+", r"  last log line: ValueError: bad shards",
              r"sweep: 6 finished, 3 failed, 1 skipped \(failed: .*\)"]
  for line in err:
    assert any(re.fullmatch(p, line) for p in patterns), line
  assert len(err) == 2 + 9 + 9 + 3 + 1
  assert sorted(int(re.match(r"\[start (\d)", line)[1]) for line in err if line.startswith("[start")) == list(
      range(1, 10))


def test_stop_on_failure_starts_nothing_after_a_failure(tmp_path, capsys):
  runs = [_run(tmp_path, "a", [sys.executable, "-c", FAIL]), _run(tmp_path, "b"), _run(tmp_path, "c", done=True)]
  assert local.run(runs, 1, stop_on_failure=True, announce_skips=False) == [("a", 3)]
  err = capsys.readouterr().err.splitlines()
  assert err[0] == "3 runs: 1 finished already, 2 to run"  # no skip line: the caller named the finished runs
  assert err[-1] == "sweep: 0 finished, 1 failed, 1 skipped, 1 not started (failed: a)"
  assert not any(line.startswith("[start 2/2]") for line in err)


def test_a_run_that_cannot_start_is_reported(tmp_path, capsys):
  run = _run(tmp_path, "a", [str(tmp_path / "no-such-python")])
  try:
    local.run([run], 1)
  except OSError:
    pass
  else:
    raise AssertionError("a missing interpreter raises, as before")
  assert "[fail 1/1] a: could not start (" in capsys.readouterr().err


def test_the_local_launcher_reports_progress_and_keeps_its_exit_status(tmp_path, capsys, monkeypatch):
  config = tmp_path / "cfg.py"
  config.write_text("def get_sweep():\n  return ['arm=ok', 'arm=bad', 'arm=old']\n")
  root = tmp_path / "runs"
  old = sweep.workdir_for(str(root), str(config), "arm=old")
  os.makedirs(old)
  with open(os.path.join(old, "results.json"), "w") as f:
    json.dump(_results(0.5), f)

  def fake_command(config_path, arg, workdir, python="python"):
    return [sys.executable, "-c", FAIL] if arg == "arm=bad" else _ok(workdir, _results(0.9, n=30))

  monkeypatch.setattr(sweep, "train_command", fake_command)
  monkeypatch.setattr(sweep, "check_data", lambda *a, **k: None)  # no data: the runs are stand-ins
  assert sweep.main(["--config", str(config), "--launcher", "local", "--root", str(root), "--parallel", "2"]) == 1
  err = capsys.readouterr().err
  assert f"[skip] arm=old: finished ({old})\n3 runs: 1 finished already, 2 to run\n" in err
  assert re.search(r"\[done [12]/2\] arm=ok in .* s: accuracy 90\.0 % \(n=30\)\n", err)
  bad_log = os.path.join(sweep.workdir_for(str(root), str(config), "arm=bad"), "sweep.log")
  assert re.search(rf"\[fail [12]/2\] arm=bad: exit code 3 after .* s; log: {re.escape(bad_log)}\n"
                   r"  last log line: ValueError: bad shards\n", err)
  assert "sweep: 1 finished, 1 failed, 1 skipped" in err
  assert "failed with exit code" not in err  # the old end-of-sweep lines are gone

  # Everything finished: the skip lines, the tally, exit status 0.
  monkeypatch.setattr(sweep, "train_command", lambda c, arg, workdir, python="python": _ok(workdir, _results(1.0)))
  assert sweep.main(["--config", str(config), "--launcher", "local", "--root", str(root)]) == 0
  err = capsys.readouterr().err.splitlines()
  assert err[:2] == [f"[skip] arm=ok: finished ({sweep.workdir_for(str(root), str(config), 'arm=ok')})",
                     f"[skip] arm=old: finished ({old})"]
  assert "sweep: 1 finished, 0 failed, 2 skipped" in err
