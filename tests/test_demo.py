"""The main job end to end at a toy size: SynthMAT -> shards -> tokenizer -> three arms -> the CG table."""
import os
import time

from medcg import demo


def test_demo_runs_all_arms_and_prints_the_table(tmp_path, capsys):
  rc = demo.main(["--workdir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "synthmat"),
                  "--shards", str(tmp_path / "shards"), "--format", "array_record",
                  "--synth-train", "12", "--synth-test", "4", "--epochs", "1"])
  assert rc == 0
  table = (tmp_path / "runs" / "demo.md").read_text()
  assert "| 25 | Fixed task |" in table and "47 / 50 / 81" in table   # our row beside the paper's
  row = next(line for line in table.splitlines() if line.startswith("| 25 |"))
  cells = [c.strip() for c in row.strip("|").split(" | ")]
  assert cells[3] == "4" and "[" in cells[4]                          # n, and a Wilson interval on one run
  assert any(v in cells[8] for v in ("helps", "no evidence", "hurts")) and "p" in cells[8]  # the CG test
  assert "![table3](demo_table3.png)" in table
  assert (tmp_path / "runs" / "demo_table3.png").read_bytes()[:4] == b"\x89PNG"
  arms = sorted(os.listdir(tmp_path / "runs" / "demo"))
  assert [a.split("__")[0] for a in arms] == ["arm=baseline", "arm=baseline_plus", "arm=related"]
  for arm in arms:
    assert (tmp_path / "runs" / "demo" / arm / "results.json").exists()
  # A re-run finds every arm done and trains nothing.
  assert demo.main(["--workdir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "synthmat"),
                    "--shards", str(tmp_path / "shards"), "--synth-train", "12", "--synth-test", "4",
                    "--epochs", "1"]) == 0
  assert capsys.readouterr().out.count(": done") >= 3


def test_undersized_shards_fail_before_any_arm(synth_shards, tmp_path, capsys):
  """Shards of 24 per subset when the recipe needs 600: one clear error in seconds, nothing trained or written."""
  t = time.perf_counter()
  rc = demo.main(["--workdir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "synthmat"),
                  "--shards", synth_shards])
  elapsed = time.perf_counter() - t
  err = capsys.readouterr().err
  assert rc == 2 and elapsed < 30, (rc, elapsed)
  assert err.startswith("medcg.demo: error: data not ready for 2 of 3 runs: ") and "Traceback" not in err
  assert f"subset 05 split 'train': 600 needed (data.mixture[0]), 24 available in {synth_shards}" in err
  assert (f"python -m medcg.data synth --out {tmp_path / 'synthmat'} --image_size 32 --per_subset 600 "
          "--test_per_subset 60") in err
  assert not (tmp_path / "runs").exists()                                  # no arm started
  assert not os.path.exists(os.path.join(synth_shards, "tokenizer-bpe512.json"))  # nor the tokenizer trained


def test_qwen_demo_needs_its_own_112px_shards(synth_shards, tmp_path, capsys):
  """--model tiny-qwen2vl reads SynthMAT at its static 112 px grid: 32 px shards fail in seconds, naming the size."""
  rc = demo.main(["--model", "tiny-qwen2vl", "--workdir", str(tmp_path / "runs"), "--data-dir",
                  str(tmp_path / "synthmat"), "--shards", synth_shards])
  err = capsys.readouterr().err
  assert rc == 2 and "Traceback" not in err
  assert "the shards are 32 px, config data.image_size is 112" in err
  assert "--image_size 112" in err
  assert not (tmp_path / "runs").exists()
