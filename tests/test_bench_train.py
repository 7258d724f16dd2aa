"""experiments/bench_train.py: the smallest run writes a complete report; batch layout; the auto batch search."""
import json
import math

import numpy as np
import pytest

from experiments import bench_train

ROW_FIELDS = ("trim", "batch", "seq_len", "image_slots", "status", "compile_s", "step_s", "tokens_per_s",
              "effective_tokens_per_s", "positions_per_s", "flops_per_step", "tflops_per_s", "mfu",
              "xla_memory_gib", "device_peak_gib", "loss", "image_tokens_kept_mean")
REPORT_FIELDS = ("command", "backend", "device", "n_devices", "mesh", "versions", "note", "preset", "dtype",
                 "param_dtype", "steps", "train_step", "target_mfu", "verdict", "rows")


def test_smallest_run_writes_documented_report(tmp_path):
  report = bench_train.main(["--preset", "tiny", "--devices", "1", "--batch-sizes", "2", "--steps", "1",
                             "--warmup", "0", "--text-len", "16", "--trim", "off,ratio", "--dtype", "float32",
                             "--out", str(tmp_path), "--profile-dir", str(tmp_path / "prof")])
  written = json.loads((tmp_path / "bench_train_cpu.json").read_text())
  assert written == json.loads(json.dumps(report))
  for key in REPORT_FIELDS:
    assert key in written, key
  assert written["backend"] == "cpu" and "CPU run" in written["note"] and "owed" in written["verdict"]
  assert written["versions"]["jax"] and written["versions"]["flax"]
  assert written["train_step"] == "medcg.train.step.make_train_step"
  rows = {r["trim"]: r for r in written["rows"]}
  assert set(rows) == {"off", "ratio"}
  for row in rows.values():
    for key in ROW_FIELDS:
      assert key in row, (row["trim"], key)
    assert row["status"] == "ok" and row["batch"] == 2
    assert row["step_s"] > 0 and row["compile_s"] > 0 and math.isfinite(row["loss"])
    assert row["positions_per_s"] >= row["tokens_per_s"] >= row["effective_tokens_per_s"] > 0
    assert row["flops_per_step"] > 0 and row["mfu"] is None  # CPU: no peak FLOP/s
  # tiny: 4x4 = 16 patches; ratio 121/576 keeps int(16 * 0.21) = 3 tokens, + 1 mean slot.
  assert rows["off"]["image_slots"] == 16 and rows["off"]["seq_len"] == 16 + 16
  assert rows["ratio"]["image_slots"] == 4 and rows["ratio"]["image_tokens_kept_mean"] == 3.0
  # The decoder sees 12 fewer positions; at tiny size the CLIP text tower TRIM adds (77 tokens) costs more
  # than that saves, so total FLOPs are not compared here (bench-1b's are, in the script's GPU targets).
  assert rows["ratio"]["seq_len"] == rows["off"]["seq_len"] - 12
  md = (tmp_path / "bench_train_cpu.md").read_text()
  assert "| off | 2 |" in md and "| ratio | 2 |" in md and "owed" in md
  assert not list(tmp_path.glob("*.tmp.*"))
  for trim in ("off", "ratio"):  # --profile-dir traced the timed steps of each row
    assert rows[trim]["profile"] == str(tmp_path / "prof" / f"{trim}_b2")
    assert any(p.is_file() for p in (tmp_path / "prof" / f"{trim}_b2").rglob("*"))  # atomic writes leave no temp files


def test_batch_layout_matches_pipeline_contract():
  cfg = bench_train.model_config("tiny", "float32", "none")
  rng = np.random.default_rng()
  b, slots, text_len = 5, 16, 20
  batch = bench_train.make_batch(cfg, slots, text_len, b, rng)
  ids, mask, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
  assert ids.shape == mask.shape == loss.shape == (b, slots + text_len)
  assert np.all((ids == cfg.image_token_id).sum(1) == slots)
  assert np.all(ids[:, 0] == cfg.llm.bos_token_id)
  lengths = mask.sum(1)
  for row in range(b):
    n = lengths[row]
    assert np.all(mask[row, :n] == 1) and np.all(mask[row, n:] == 0)  # right padding
    assert ids[row, n - 1] == cfg.llm.eos_token_id and np.all(ids[row, n:] == cfg.llm.pad_token_id)
    assert np.flatnonzero(loss[row]).tolist() == list(range(n - bench_train.ANSWER_TOKENS, n))
  assert batch["text_ids"].shape == (b, bench_train.TEXT_TOWER_LEN)
  assert batch["text_ids"].max() < cfg.text.vocab_size


def test_vocab_covers_image_placeholder():
  cfg = bench_train.model_config("bench-1b", "bfloat16", "none")
  assert cfg.llm.vocab_size > cfg.image_token_id and cfg.llm.vocab_size % 8 == 0


def _fake_try(fits_up_to):
  tried = []

  def try_batch(b):
    tried.append(b)
    if b > fits_up_to:
      raise bench_train.OutOfMemory(f"batch {b}: RESOURCE_EXHAUSTED")
    return {"batch": b, "status": "ok"}

  return try_batch, tried


def test_auto_batch_doubles_until_oom_and_keeps_the_largest_fit():
  try_batch, tried = _fake_try(fits_up_to=40)
  rows = bench_train.search_largest_batch(try_batch, 8, 1024)
  assert tried == [8, 16, 32, 64]
  assert [r["status"] for r in rows] == ["ok", "ok", "ok", "OOM"]
  assert [r["batch"] for r in rows if r.get("auto_largest")] == [32]


def test_auto_batch_stops_at_limit_and_fails_when_nothing_fits():
  try_batch, tried = _fake_try(fits_up_to=10**6)
  rows = bench_train.search_largest_batch(try_batch, 4, 16)
  assert tried == [4, 8, 16] and rows[-1].get("auto_largest")
  try_batch, _ = _fake_try(fits_up_to=2)
  with pytest.raises(bench_train.OutOfMemory, match="even batch 4"):
    bench_train.search_largest_batch(try_batch, 4, 16)
  # A smaller explicit batch already fit: OOM at the first auto batch just ends the search.
  rows = bench_train.search_largest_batch(try_batch, 4, 16, smaller_fits=True)
  assert [r["status"] for r in rows] == ["OOM"]


def test_oom_detection_and_bad_arguments():
  assert bench_train.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
  assert not bench_train.is_oom(ValueError("shape mismatch"))
  with pytest.raises(ValueError, match="--batch_sizes: 3 is not a positive multiple"):
    bench_train._batch_plan("3,auto", 2)
  with pytest.raises(ValueError, match="'x' is neither"):
    bench_train._batch_plan("x", 1)
  assert bench_train._batch_plan("16,8,auto", 8) == ([8, 16], True)
  with pytest.raises(ValueError, match="--trim: unknown mode 'fast'"):
    bench_train.trim_config("fast", 576)
  assert bench_train.trim_config("ratio", 576).k_max == 121
  assert bench_train.trim_config("iqr_example", 576).k_max == 288


def test_loop_mode_runs_the_trainer_both_ways_and_writes_the_comparison(synth_shards, tmp_path):
  from medcg.train import trainer
  report = bench_train.main(["--loop", "--shards", synth_shards, "--log-every", "2", "--windows", "1",
                             "--repeats", "1", "--batch-sizes", "2", "--devices", "1", "--dtype", "float32",
                             "--out", str(tmp_path)])
  written = json.loads((tmp_path / "bench_train_loop_cpu.json").read_text())
  assert written == json.loads(json.dumps(report))
  assert written["train_loop"] == "medcg.train.trainer.train" and written["steps_per_run"] == 6
  assert written["command"].startswith("JAX_PLATFORMS=cpu python -m experiments.bench_train --loop")
  assert written["machine"] and "CPU run" in written["note"]
  # After two warm-up windows (step 1, steps 2..2) the windows alternate: async (steps 3-4), sync (5-6), ...
  (result,) = written["results"]
  assert result["batch"] == 2
  (run,) = result["runs"]
  assert run["first"] == "sync"
  assert [(w["step"], w["loop"]) for w in run["windows"]] == [(4, "async"), (6, "sync")]
  summary = result["summary"]
  assert summary["losses_identical"] is True
  for loop in ("sync", "async"):
    assert summary[loop]["step_s"] > 0 and summary[loop]["windows"] == 1 and summary[loop]["steps"] == 2
  assert len(summary["pair_ratios"]) == 1 and summary["ratio_sync_over_async"] > 0
  assert trainer._WAIT_EACH_STEP is False  # the benchmark switch is put back
  md = (tmp_path / "bench_train_loop_cpu.md").read_text()
  assert "| 2 | sync |" in md and "| 2 | async |" in md and written["command"] in md and "Machine:" in md
  assert not list(tmp_path.glob("*.tmp.*"))
