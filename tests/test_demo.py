"""The main job end to end at a toy size: SynthMAT -> shards -> tokenizer -> three arms -> the CG table."""
import os

from medcg import demo


def test_demo_runs_all_arms_and_prints_the_table(tmp_path, capsys):
  rc = demo.main(["--workdir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "synthmat"),
                  "--shards", str(tmp_path / "shards"), "--format", "array_record",
                  "--synth-train", "12", "--synth-test", "4", "--epochs", "1"])
  assert rc == 0
  table = (tmp_path / "runs" / "demo.md").read_text()
  assert "| 25 | Fixed task |" in table and "47 / 50 / 81" in table   # our row beside the paper's
  assert "standard error" in table
  arms = sorted(os.listdir(tmp_path / "runs" / "demo"))
  assert [a.split("__")[0] for a in arms] == ["arm=baseline", "arm=baseline_plus", "arm=related"]
  for arm in arms:
    assert (tmp_path / "runs" / "demo" / arm / "results.json").exists()
  # A re-run finds every arm done and trains nothing.
  assert demo.main(["--workdir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "synthmat"),
                    "--shards", str(tmp_path / "shards"), "--synth-train", "12", "--synth-test", "4",
                    "--epochs", "1"]) == 0
  assert capsys.readouterr().out.count(": done") >= 3
