"""What medcg.train prints: where the run is and what it trains on at the start, the final numbers and the output
paths at the end, the untrained arm in words, and a finished workdir recognised before anything is built."""
import jax
import jax.numpy as jnp
from flax import nnx

from medcg import preflight
from medcg.train import summary
from medcg.train import trainer
from test_train import micro_config


def _lines(capsys) -> list[str]:
  return [l for l in capsys.readouterr().out.splitlines() if l.startswith(summary.PREFIX)]


def _micro(shards, **train):
  c = micro_config(shards, log_batches=False, **train)
  c.mesh.num_devices = 1
  return c


def test_numbers_in_words():
  assert summary.human(858_496) == "858,496"
  assert summary.human(2_414_000) == "2.41 M"
  assert summary.human(7.06e9) == "7.06 B"
  assert summary.duration(4.12) == "4.1 s"
  assert summary.duration(83.4) == "1 m 23 s"
  assert summary.duration(3 * 3600 + 125) == "3 h 2 m"


def test_headline_names_accuracy_with_n_and_cious_only_for_detection_only_runs():
  assert summary.headline({"eval/accuracy": 0.95, "eval/samples": 60.0}) == "accuracy 95.0 % (n=60)"
  assert summary.headline({"eval/accuracy": 0.5, "eval/samples": 4.0, "eval/ciou": 0.25}) == \
      "accuracy 50.0 % (n=4); cIoU 25.0 %"
  # flat_metrics keeps accuracy 0 for an evaluation with no multiple-choice samples: not a 0 % accuracy.
  assert summary.headline({"eval/accuracy": 0.0, "eval/samples": 0.0, "eval/ciou": 0.4}) == "cIoU 40.0 %"


def test_mixture_text_lists_entries_and_counts_the_rest():
  assert summary.mixture_text([(5, "train", 600), (28, "train", 600)]) == \
      "2 subsets, 1,200 samples: 05 train 600, 28 train 600"
  assert summary.mixture_text([(3, "test", -1)]) == "1 subset: 03 test all"  # no total when one entry is "all"
  many = [(i, "train", 10) for i in range(1, 10)]
  text = summary.mixture_text(many)
  assert text.startswith("9 subsets, 90 samples: 01 train 10, ") and text.endswith("06 train 10, ... (+3 more)")


def test_params_text_counts_trainable_and_frozen():
  s = jax.ShapeDtypeStruct
  abstract = ({"a": s((1000, 2000), jnp.float32)}, {"v": s((300, 1000), jnp.bfloat16), "w": s((10,), jnp.float32)},
              {"rng": s((2,), jnp.uint32)})
  assert summary.params_text(abstract) == "2.3 M params, 2 M trainable, 300,010 frozen"


def test_end_lines_say_what_happened():
  m = {"eval/accuracy": 0.95, "eval/samples": 60.0}
  common = dict(total_steps=10, losses=[1.0, 0.1234], metrics=m, seconds=83.0, workdir="/w", results=None,
                report_dir=None)
  assert summary.end_lines(step=10, preempted=False, **common)[0] == \
      "finished at step 10 in 1 m 23 s: loss 0.1234; accuracy 95.0 % (n=60)"
  stopped = summary.end_lines(step=4, preempted=True, **common)
  assert stopped == ["stopped at step 4 of 10 after 1 m 23 s; loss 0.1234 (checkpointed); the same command resumes"]
  untrained = summary.end_lines(step=0, preempted=False, **{**common, "total_steps": 0, "losses": []})
  assert untrained[0] == "evaluated the initial model (untrained arm) in 1 m 23 s: accuracy 95.0 % (n=60)"
  assert "nan" not in " ".join(untrained)
  assert summary.headline({"eval/ciou": 0.5}) == "cIoU 50.0 %"


def test_a_run_prints_its_set_up_and_outputs_and_a_rerun_does_nothing(synth_shards, tmp_path, capsys, monkeypatch):
  wd = str(tmp_path / "run")
  result = trainer.train(_micro(synth_shards, steps=2), wd)
  lines = _lines(capsys)
  text = "\n".join(lines)
  assert lines[0] == f"{summary.PREFIX} workdir {wd}: new run"
  assert "1 device (cpu), mesh data=1 fsdp=1 tensor=1" in lines[1]
  model, _ = trainer.load_model_from_workdir(wd)
  n_params = summary.count_params(nnx.state(model, nnx.Param))
  assert f"model: {summary.human(n_params)} params, {summary.human(n_params)} trainable, 0 frozen" in text
  assert "train on 2 subsets, 48 samples: 05 train 24, 28 train 24; 2 steps of batch 8" in text
  assert "evaluate on 1 subset, 8 samples: 03 test 8, at the end" in text
  assert "evaluating step 2 on 1 subset, 8 samples: 03 test 8" in text
  acc = 100 * result.metrics["eval/accuracy"]
  assert f"finished at step 2 in " in text and f"accuracy {acc:.1f} % (n=8)" in text
  assert f"{summary.PREFIX} results {wd}/results.json" in lines
  assert any(l.startswith(f"{summary.PREFIX} report  {wd}/eval/step_2/report.md (plots: ") for l in lines)

  # The same command again: recognised from the checkpoint, before a model, a pipeline or a compile.
  def built(*a, **k):
    raise AssertionError("a finished run built something")
  for name in ("model_parts", "model_config", "initial_params"):
    monkeypatch.setattr(trainer, name, built)
  monkeypatch.setattr(preflight, "check_data", built)
  again = trainer.train(_micro(synth_shards, steps=2), wd)
  assert again.step == 2 and again.losses == [] and again.metrics["eval/accuracy"] == result.metrics["eval/accuracy"]
  (line,) = _lines(capsys)
  assert line.startswith(f"{summary.PREFIX} finished at step 2; nothing to do (results: {wd}/results.json)")
  assert f"python -m medcg.eval --workdir {wd}" in line
  monkeypatch.undo()

  trainer.train(_micro(synth_shards, steps=3), wd)  # extended: resumes, and says so
  lines = _lines(capsys)
  assert lines[0] == f"{summary.PREFIX} workdir {wd}: resumed from step 2 of 3; changed since the last attempt: " \
      "train.steps"


def test_the_untrained_arm_says_it_evaluates_the_initial_model(synth_shards, tmp_path, capsys):
  wd = str(tmp_path / "baseline")
  trainer.train(_micro(synth_shards, steps=0), wd)
  text = "\n".join(_lines(capsys))
  assert "no training (train.steps=0): the untrained arm evaluates the initial model" in text
  assert "evaluating the initial model (untrained arm) on 1 subset" in text
  assert "evaluated the initial model (untrained arm) in " in text and "loss" not in text
  trainer.train(_micro(synth_shards, steps=0), wd)
  assert _lines(capsys)[0].startswith(f"{summary.PREFIX} the untrained arm is evaluated; nothing to do")
