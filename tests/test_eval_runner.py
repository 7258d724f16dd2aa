"""The evaluation runner: batch-size invariance, unparsed answers, output files, the CLI and the trainer hook.

One session fixture builds SynthMAT (subsets 03, 05, 28; 12 test samples each, 32 px), converts it to
ArrayRecord shards, and trains the `tiny` preset for 2 steps on a 2-device mesh with the runner's hook
as `evaluate_fn`; every test reuses that workdir. 18 test samples make batch 8 and 16 end in padded
batches; batch 3 does not divide the mesh and runs replicated, 8 and 16 run sharded.
"""
import json
import os
import re
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import models
from medcg import configlib
from medcg.data import pipeline
from medcg.data import shards
from medcg.data import synth
from medcg.data import tfds_builder
from medcg.data import tokenizer as tok_lib
from medcg.eval import __main__ as eval_cli
from medcg.eval import metrics
from medcg.eval import runner
from medcg.train import run_info
from medcg.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSETS = (3, 5, 28)
TEST_PER_SUBSET = 6
N_TEST = len(SUBSETS) * TEST_PER_SUBSET
EVAL_MIXTURE = [(s, "test", -1) for s in SUBSETS]


def _config(shards_dir: str):
  c = configlib.base_config()
  c.model = models.get("tiny")
  c.data.shards_dir = shards_dir
  c.data.image_size = 32
  c.data.seq_len = 256
  c.data.batch_size = 8
  c.data.mixture = [(s, "train", 8) for s in SUBSETS]
  c.data.eval_mixture = EVAL_MIXTURE
  c.train.steps = 2
  c.train.log_every = 1
  c.mesh.num_devices = 2
  c.checkpoint.async_save = False
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 4
  return c


def _synth_shards(root, subsets, test_per_subset):
  """SynthMAT (8 train samples per subset, 32 px) converted to ArrayRecord shards under root/shards."""
  synth.write_synthmat(root / "src", image_size=32, per_subset=8, test_per_subset=test_per_subset,
                       subsets=list(subsets), progress=False)
  tfds_builder.convert(root / "src", root / "shards", image_size=32, shard_size=16, fmt="array_record",
                       progress=False)
  return root


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
  """(workdir, config, train result) of a 2-step tiny run whose final evaluation used the runner's hook."""
  root = _synth_shards(tmp_path_factory.mktemp("eval_runner"), SUBSETS, TEST_PER_SUBSET)
  manifest = shards.Manifest.load(root / "shards")
  assert sum(manifest.count(s, "test") for s in SUBSETS) == N_TEST
  config = _config(str(root / "shards"))
  workdir = str(root / "run")
  tokenizer = tok_lib.make_tokenizer(config.data.tokenizer)
  hook = runner.make_trainer_hook(config, workdir, tokenizer)
  result = trainer.train(config, workdir, evaluate_fn=hook)
  return workdir, config, result


@pytest.fixture(scope="session")
def loaded(run_dir):
  workdir, config, _ = run_dir
  mesh = runner.mesh_from_config(config)
  model, config = trainer.load_model_from_workdir(workdir, config=config, mesh=mesh)
  return model, config, tok_lib.make_tokenizer(config.data.tokenizer), mesh


def _evaluate(loaded, tmp_path, mode, batch_size, **kw):
  model, config, tokenizer, mesh = loaded
  out = tmp_path / f"{mode}_{batch_size}"
  results = runner.evaluate(model, config, tokenizer, mixture=EVAL_MIXTURE, mode=mode, batch_size=batch_size,
                            out_dir=str(out), step=2, mesh=mesh, **kw)
  return results, [r.to_dict() for r in metrics.read_samples(out / metrics.SAMPLES_FILE)], out


def _without_run_fields(results):
  return {k: v for k, v in results.items() if k not in ("eval", "config", "config_fingerprint")}


@pytest.mark.parametrize("mode", ["likelihood", "generate"])
def test_batch_size_and_padding_do_not_change_results(loaded, tmp_path, mode):
  mesh = loaded[3]
  assert [runner._Placement(mesh, b).sharded for b in (3, 8, 16)] == [False, True, True]  # both paths
  by_batch = {b: _evaluate(loaded, tmp_path, mode, b) for b in (3, 8, 16)}
  ref_results, ref_samples, _ = by_batch[8]
  assert len(ref_samples) == N_TEST  # padding rows never count
  assert len({s["sample_id"] for s in ref_samples}) == len(ref_samples)
  for b, (results, samples, _) in by_batch.items():
    assert samples == ref_samples, f"batch {b} changed per-sample outputs ({mode})"
    assert _without_run_fields(results) == _without_run_fields(ref_results), f"batch {b} changed results"
    assert results["eval"]["batch_size"] == b


def test_files_written_and_well_formed(loaded, tmp_path):
  results, samples, out = _evaluate(loaded, tmp_path, "likelihood", 8)
  on_disk = metrics.load_results(out)
  assert on_disk["overall"] == results["overall"]
  assert on_disk["checkpoint"]["step"] == 2 and on_disk["step"] == 2
  assert on_disk["config_fingerprint"] == metrics.fingerprint(loaded[1].to_dict())
  assert set(on_disk["per_subset"]) == {f"{s:02d}" for s in SUBSETS}
  assert sum(v["n"] for v in on_disk["per_subset"].values()) == len(samples)
  for element in ("modality", "area", "task"):
    assert sum(v["n"] for v in on_disk["per_element"][element].values()) == len(samples)
  assert on_disk["eval"] == {"mode": "likelihood", "batch_size": 8, "likelihood_target": "letter",
                             "likelihood_reduction": "mean", "mixture": [list(m) for m in EVAL_MIXTURE]}
  for s in samples:
    assert s["stage"] in ("loglik", "tie")
    assert s["correct"] == (s["parsed"] == s["answer"])
    assert "Answer with the option's letter" in s["prompt"] and s["triplet"]
  text = (out / runner.REPORT_FILE).read_text()
  assert text.startswith("# medcg evaluation")
  for heading in ("## Summary", "## Per subset", "## Per triplet", "## Per modality", "## Answer stages"):
    assert heading in text
  assert (out / runner.HEATMAP_FILE).stat().st_size > 0
  assert (out / runner.BARS_FILE).stat().st_size > 0 and (out / runner.BARS_FILE).with_suffix(".svg").exists()
  assert "![accuracy per subset](accuracy_per_subset.png)" in text
  # chance: each sample's options as offered (SynthMAT offers min(4, labels)); outcomes: one 0/1 per sample
  from configs import common
  for s in SUBSETS:
    key = f"{s:02d}"
    assert on_disk["per_subset"][key]["chance"] == pytest.approx(common.synth_chance(s))
    assert on_disk["outcomes"][key]["correct"].count("1") == on_disk["per_subset"][key]["correct"]
  assert not [p for p in os.listdir(out) if ".tmp" in p]  # atomic writes leave no temp files


def test_likelihood_scores_the_trained_answer_tokens(loaded):
  _, config, tokenizer, _ = loaded
  data_cfg = run_info.pipeline_config(config, [(28, "test", 4)], 4, 16)
  batch = next(pipeline.make_eval_iterator(data_cfg, tokenizer, include_answer=True, process_index=0,
                                           process_count=1))
  for b in range(4):
    start, end = int(batch["prompt_len"][b]), int(batch["attention_mask"][b].sum())
    trained = batch["input_ids"][b, start:end].tolist()
    options = list(batch["options"][b])
    per_option = runner.option_answer_ids(tokenizer, config.data.chat_template, options, "letter")
    assert per_option[int(batch["answer_idx"][b])] == trained
    texts = runner.option_answer_ids(tokenizer, config.data.chat_template, options, "text")
    assert texts[0][-1] == tokenizer.eos_id and tokenizer.decode(texts[0]).strip() == options[0]
  with pytest.raises(ValueError, match="likelihood_target"):
    runner.option_answer_ids(tokenizer, "plain", ["a", "b"], "word")


def test_text_target_runs(loaded, tmp_path):
  results, samples, _ = _evaluate(loaded, tmp_path, "likelihood", 16, likelihood_target="text")
  assert results["eval"]["likelihood_target"] == "text"
  assert len(samples) == N_TEST


def test_likelihood_target_follows_the_trained_answer_format(loaded, tmp_path):
  """Unset `eval.likelihood_target` scores what the model was trained to say (`data.answer_format`)."""
  model, config, tokenizer, mesh = loaded
  assert config.eval.likelihood_target == ""
  text_config = ml_collections.ConfigDict(config.to_dict())
  text_config.data.answer_format = "text"
  explicit, _, _ = _evaluate(loaded, tmp_path / "explicit", "likelihood", 8, likelihood_target="text")
  implied = runner.evaluate(model, text_config, tokenizer, mixture=EVAL_MIXTURE, mode="likelihood", batch_size=8,
                            out_dir=str(tmp_path / "implied"), step=2, mesh=mesh)
  assert implied["eval"]["likelihood_target"] == "text"
  assert _without_run_fields(implied) == _without_run_fields(explicit)


def _fake_local(tokenizer, outputs):
  """A host batch of len(outputs) rows (the last a padding row) for `_records_for_batch`."""
  n = len(outputs)
  ids = np.full((n, 8), tokenizer.pad_id, np.int32)
  ids[:, :3] = tokenizer.encode("Q? ")
  options = np.empty((n,), object)
  options[:] = [("Normal", "Abnormal")] * n
  tokens = np.full((n, 12), tokenizer.pad_id, np.int32)
  lengths = np.zeros((n,), np.int32)
  for i, text in enumerate(outputs):
    t = tokenizer.encode(text) + [tokenizer.eos_id]
    tokens[i, :len(t)], lengths[i] = t, len(t)
  local = {"input_ids": ids, "prompt_len": np.full((n,), 3, np.int32), "subset": np.full((n,), 3, np.int32),
           "num_options": np.full((n,), 2, np.int32), "valid": np.array([True] * (n - 1) + [False]),
           "sample_id": np.array([f"s{i}" for i in range(n - 1)] + [""], object),
           "answer": np.array(["B"] * n, object), "options": options}
  return local, (tokens, lengths)


def test_unparsed_generations_are_wrong_and_reported(loaded, tmp_path):
  tokenizer = loaded[2]
  local, scored = _fake_local(tokenizer, ["B", "zzz", "abnormal", "(A)", "pad row"])
  records = runner._records_for_batch(local, scored, mode="generate", tokenizer=tokenizer, reduction="mean")
  assert [(r.output, r.parsed, r.stage, r.correct) for r in records] == [
      ("B", "B", "letter", True), ("zzz", None, "unparsed", False), ("abnormal", "B", "text", True),
      ("(A)", "A", "letter", False)]  # the padding row is dropped
  results = metrics.write_results(tmp_path, records)
  assert results["parse"]["unparsed"] == 1 and results["parse"]["failure_rate"] == 0.25
  assert results["overall"]["correct"] == 2
  # In a real run every unparsed answer counts as wrong and the rate matches the records.
  gen, samples, _ = _evaluate(loaded, tmp_path, "generate", 16)
  unparsed = [s for s in samples if s["parsed"] is None]
  assert all(not s["correct"] and s["stage"] == "unparsed" for s in unparsed)
  assert gen["parse"]["unparsed"] == len(unparsed)
  assert gen["parse"]["failure_rate"] == pytest.approx(len(unparsed) / len(samples))


def test_trainer_hook_wrote_results_and_returned_metrics(run_dir):
  workdir, config, result = run_dir
  latest = metrics.load_results(workdir)
  assert latest == metrics.load_results(runner.step_dir(workdir, 2))
  assert latest["checkpoint"] == {"workdir": os.path.abspath(workdir), "step": 2, "source": "checkpoint"}
  assert latest["eval"]["mode"] == config.eval.mode
  m = result.metrics
  assert m["eval/accuracy"] == pytest.approx(latest["overall"]["accuracy"])
  assert m["eval/parse_failure_rate"] == latest["parse"]["failure_rate"]
  assert m["eval/samples"] == N_TEST
  for s in SUBSETS:
    assert m[f"eval/subset/{s:02d}"] == pytest.approx(latest["per_subset"][f"{s:02d}"]["accuracy"])
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("eval/accuracy" in row for row in logged)


def test_mixture_flag():
  assert eval_cli.parse_mixture_flag("3:test:-1, 05:test:10") == [(3, "test", -1), (5, "test", 10)]
  for bad, match in [("3:test", "subset:split:n"), ("99:test:1", "unknown subset"), ("3:test:x", "integer"),
                     ("3:test:0", "positive"), (",", "no entries")]:
    with pytest.raises(ValueError, match=match):
      eval_cli.parse_mixture_flag(bad)


def test_cli_on_a_workdir(run_dir, tmp_path):
  workdir, _, _ = run_dir
  out = tmp_path / "cli"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "medcg.eval", "--workdir", workdir, "--mode", "generate",
                         "--batch-size", "8", "--mixture", "28:test:5", "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "subset 28" in proc.stdout and "unparsed" in proc.stdout
  assert proc.stdout.rstrip().splitlines()[-1] == f"wrote {out}"  # one line, however long the path
  assert "1/1 [" in proc.stderr  # the bar knows its total: 5 samples in one batch of 8
  assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr[:2000]  # no absl/orbax INFO lines
  results = metrics.load_results(out)
  assert results["overall"]["n"] == 5 and results["eval"]["mode"] == "generate"
  assert results["checkpoint"]["step"] == 2 and results["checkpoint"]["source"] == "checkpoint"
  assert len(metrics.read_samples(out / metrics.SAMPLES_FILE)) == 5


def test_cli_rejects_a_directory_that_is_not_a_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a medcg.train workdir"):
    eval_cli.run(str(tmp_path))


MULTIHOST_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
import numpy as np
from medcg.eval import metrics, runner
from medcg.train import sharding as shd
pid = jax.process_index()
mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
place = runner._Placement(mesh, 8)
local = {"input_ids": np.arange(16, dtype=np.int32).reshape(4, 4) + 100 * pid}
doubled = place.local(jax.jit(lambda x: x * 2)(place.put(local)["input_ids"]))
assert np.array_equal(doubled, local["input_ids"] * 2), doubled
recs = [metrics.score_generation(f"p{pid}-{i}", 3, ("CT", "Lung", "x"), "q", "B", ["a", "b"], "B")
        for i in range(pid + 1)]
print("RESULT", json.dumps(sorted(r.sample_id for r in runner.gather_records(recs))))
"""


def test_two_processes_read_back_their_rows_and_gather_records(tmp_path):
  """Two real processes on loopback: each gets its own rows back from a global batch; records reach all."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  script = tmp_path / "multihost.py"
  script.write_text(MULTIHOST_SCRIPT)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert 'RESULT ["p0-0", "p1-0", "p1-1"]' in out


# -- detection subsets in the evaluation mixture (boxes by greedy generation, IoU / cIoU) -----------------
DET_SUBSETS = (3, 39)          # a classification and a detection subset in one mixture
DET_MIXTURE = [(s, "test", -1) for s in DET_SUBSETS]
DET_TEST = 5


@pytest.fixture(scope="session")
def det_loaded(tmp_path_factory):
  """A tiny model trained 2 steps on SynthMAT 03 + 39 (a detection subset), ready to evaluate."""
  root = _synth_shards(tmp_path_factory.mktemp("eval_runner_det"), DET_SUBSETS, DET_TEST)
  config = _config(str(root / "shards"))
  config.data.mixture = [(s, "train", 8) for s in DET_SUBSETS]
  config.data.eval_mixture = DET_MIXTURE
  workdir = str(root / "run")
  tokenizer = tok_lib.make_tokenizer(config.data.tokenizer)
  result = trainer.train(config, workdir, evaluate_fn=runner.make_trainer_hook(config, workdir, tokenizer))
  mesh = runner.mesh_from_config(config)
  model, config = trainer.load_model_from_workdir(workdir, config=config, mesh=mesh)
  return model, config, tokenizer, mesh, result


def _evaluate_det(det_loaded, out, mode, batch_size):
  model, config, tokenizer, mesh, _ = det_loaded
  results = runner.evaluate(model, config, tokenizer, mixture=DET_MIXTURE, mode=mode, batch_size=batch_size,
                            out_dir=str(out), step=2, mesh=mesh)
  return results, [r.to_dict() for r in metrics.read_samples(out / metrics.SAMPLES_FILE)]


@pytest.mark.parametrize("mode", ["likelihood", "generate"])
def test_detection_rows_are_generated_scored_and_batch_invariant(det_loaded, tmp_path, mode):
  by_batch = {b: _evaluate_det(det_loaded, tmp_path / f"{mode}{b}", mode, b) for b in (3, 8)}
  results, samples = by_batch[8]
  for b, (res, smp) in by_batch.items():
    assert smp == samples, f"batch {b} changed per-sample outputs ({mode})"
    assert _without_run_fields(res) == _without_run_fields(results), f"batch {b} changed results"
  det = [s for s in samples if s["subset"] == 39]
  cls = [s for s in samples if s["subset"] == 3]
  assert len(det) == DET_TEST and len(cls) == 4     # 03's test split rounds down to its 2 labels
  for s in det:
    assert set(s) >= {"output", "parsed", "box", "iou"} and 0.0 <= s["iou"] <= 1.0
    assert (s["box"] is None) == (s["parsed"] is None) == (s["stage"] == "unparsed")
    assert s["correct"] == (s["iou"] >= 0.5) and s["answer"].startswith("[")
    assert "[x1, y1, x2, y2]" in s["prompt"] and "Answer with the option" not in s["prompt"]
  assert all("box" not in s and "iou" not in s for s in cls)  # classification rows keep their schema
  # Accuracies cover the classification samples only; detection has its own section.
  assert results["overall"]["n"] == len(cls) and set(results["per_subset"]) == {"03"}
  section = results["detection"]
  assert section["overall"]["n"] == section["per_subset"]["39"]["n"] == DET_TEST
  unparsed = sum(s["parsed"] is None for s in det)
  assert section["per_subset"]["39"]["parse_failure_rate"] == pytest.approx(unparsed / DET_TEST)
  assert section["per_subset"]["39"]["mean_iou"] == pytest.approx(np.mean([s["iou"] for s in det]))
  on_disk = metrics.load_results(tmp_path / f"{mode}8")
  assert on_disk["detection"] == section and on_disk["eval"]["detection"]["decoding"] == "greedy"
  text = (tmp_path / f"{mode}8" / runner.REPORT_FILE).read_text()
  assert "## Detection (cIoU)" in text and "| 39 | End Intestine Det |" in text


def test_detection_max_new_tokens_fits_the_longest_box(det_loaded):
  _, config, tokenizer, _, _ = det_loaded
  from configs import models as _  # noqa: F401 (the config is already built)
  data_cfg = run_info.pipeline_config(config, [(39, "test", -1)], 8, 16)
  auto = runner.detection_max_new_tokens(config, data_cfg, tokenizer)
  # Byte tokenizer: " [0.123, 0.456, 0.789, 0.987]" is 29 bytes, + eos + margin.
  assert auto == 29 + 1 + runner.DETECTION_MARGIN
  fixed = ml_collections.ConfigDict(config.to_dict())
  fixed.eval.detection_max_new_tokens = 50
  assert runner.detection_max_new_tokens(fixed, data_cfg, tokenizer) == 50
  fixed.eval.detection_max_new_tokens = -1
  with pytest.raises(ValueError, match="detection_max_new_tokens"):
    runner.detection_max_new_tokens(fixed, data_cfg, tokenizer)


def test_detection_outputs_scored_by_iou(det_loaded, tmp_path):
  tokenizer = det_loaded[2]
  truth = "[0.100, 0.100, 0.500, 0.500]"
  outputs = ["[0.100, 0.100, 0.500, 0.500]", "[0.300, 0.300, 0.700, 0.700]", "no box", "{<10><10><50><40>}",
             "pad row"]
  local, _ = _fake_local(tokenizer, ["x"] * len(outputs))
  n = len(outputs)
  tokens = np.full((n, 40), tokenizer.pad_id, np.int32)
  lengths = np.zeros((n,), np.int32)
  for i, text in enumerate(outputs):
    t = tokenizer.encode(text) + [tokenizer.eos_id]
    tokens[i, :len(t)], lengths[i] = t, len(t)
  scored = (tokens, lengths)
  local["subset"] = np.full((n,), 39, np.int32)
  local["num_options"] = np.zeros((n,), np.int32)
  local["answer"] = np.array([truth] * n, object)
  local["options"] = np.empty((n,), object)
  local["options"][:] = [()] * n
  records = runner._records_for_batch(local, scored, mode="generate", tokenizer=tokenizer, reduction="mean")
  assert [(r.parsed, r.stage, r.correct) for r in records] == [
      (truth, "box", True), ("[0.300, 0.300, 0.700, 0.700]", "box", False), (None, "unparsed", False),
      ("[0.100, 0.100, 0.500, 0.400]", "box", True)]
  assert [r.iou for r in records] == pytest.approx([1.0, 0.04 / 0.28, 0.0, 0.75])
  results = metrics.write_results(tmp_path, records)
  det = results["detection"]["overall"]
  assert det["n"] == 4 and det["parse_failure_rate"] == 0.25 and results["overall"]["n"] == 0
  # cIoU sums intersections over unions: (0.16 + 0.04 + 0 + 0.12) / (0.16 + 0.28 + 0.16 + 0.16).
  assert det["ciou"] == pytest.approx(0.32 / 0.76)
  assert metrics.read_samples(tmp_path / metrics.SAMPLES_FILE) == sorted(records, key=lambda r: r.sample_id)
  with pytest.raises(ValueError, match="without 'iou'"):
    metrics.SampleRecord.from_dict({**records[0].to_dict(), "iou": None}, where="line 1")


def test_trainer_hook_reports_ciou(det_loaded):
  m = det_loaded[4].metrics
  assert "eval/ciou" in m and "eval/ciou/39" in m and m["eval/samples"] == 4


@pytest.mark.slow
def test_tiny_model_learns_to_answer_with_a_box(tmp_path):
  """End to end (~60 s on 2 CPU cores): 60 steps on 64 SynthMAT polyp images and the tiny model's greedy
  answers parse as boxes most of the time (its cIoU is still near zero at this length)."""
  synth.write_synthmat(tmp_path / "src", image_size=32, per_subset=64, test_per_subset=8, subsets=[39],
                       progress=False)
  tfds_builder.convert(tmp_path / "src", tmp_path / "shards", image_size=32, shard_size=64, fmt="array_record",
                       progress=False)
  c = _config(str(tmp_path / "shards"))
  c.data.update(dict(seq_len=224, batch_size=16, chat_template="plain", mixture=[(39, "train", 64)],
                     eval_mixture=[(39, "test", -1)]))
  c.train.update(dict(steps=60, log_every=20, lr=3e-3, warmup_steps=5))
  c.mesh.num_devices = 1
  tokenizer = tok_lib.make_tokenizer(c.data.tokenizer)
  result = trainer.train(c, str(tmp_path / "run"), evaluate_fn=runner.make_trainer_hook(c, str(tmp_path / "run"),
                                                                                      tokenizer))
  assert result.metrics["eval/detection_parse_failure_rate"] <= 0.5, result.metrics


def test_summary_labels_a_cg_runs_subsets_by_role_and_fits_80_columns(loaded, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("COLUMNS", "80")
  results, _, out = _evaluate(loaded, tmp_path, "likelihood", 8)
  eval_cli.print_summary(results, str(out))  # a multitask-style run: the paper's ID / OOD status
  plain = capsys.readouterr().out
  assert " status " in plain and "held out" not in plain
  target = int(next(iter(results["per_subset"])))
  cg = dict(results, config={"experiment": {"name": "cg_table3", "table": 3, "row": 1, "target": target}})
  eval_cli.print_summary(cg, str(out))
  text = capsys.readouterr().out
  assert " role " in text and "target (held out)" in text
  assert max(len(line) for line in text.splitlines()[:-1]) <= 80  # the table; the last line is the path
  assert text.rstrip().splitlines()[-1] == f"wrote {out}"
