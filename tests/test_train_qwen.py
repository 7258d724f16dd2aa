"""The Qwen2-VL family through the same trainer and evaluation: FSDP and FSDP + tensor meshes equal one device,
exact resume, medcg.eval in both modes, and TRIM refused at config validation. A micro Qwen2-VL (56 px -> 4 merged
image tokens, width 32 + 64) keeps the compiles short."""
import json
import os

import numpy as np
import pytest

from configs import models
from medcg.data import tokenizer as tok_lib
from medcg.eval import metrics
from medcg.eval import runner
from medcg.train import trainer
from medcg.train.trainer import NonFiniteLossError

from test_train import final_params, micro_config, run_log


def micro_qwen():
  m = models.get("tiny-qwen2vl")
  m.vision.update(dict(image_size=56, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       out_hidden_size=64))
  m.llm.update(dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    mrope_section=[2, 3, 3]))
  return m


def qwen_config(shards: str, **train):
  """test_train's micro run with the micro Qwen2-VL at 56 px (and two evaluation subsets)."""
  c = micro_config(shards, **{"steps": 3, **train})
  c.data.eval_mixture = [(3, "test", 6), (28, "test", 6)]
  c.data.image_size = 56
  c.model = micro_qwen()
  c.eval.max_new_tokens = 4
  return c


@pytest.fixture(scope="module")
def qwen_shards(tmp_path_factory) -> str:
  """SynthMAT subsets 03, 05, 28 at 56 px (the micro Qwen's static grid: 2 x 2 merged tokens)."""
  from medcg.data import synth, tfds_builder
  root = tmp_path_factory.mktemp("synthmat56")
  synth.write_synthmat(root / "raw", image_size=56, per_subset=24, test_per_subset=6, seed=0,
                       subsets=[3, 5, 28], progress=False)
  tfds_builder.convert(root / "raw", root / "shards", image_size=56, fmt="array_record", progress=False)
  return str(root / "shards")


def test_fsdp_and_fsdp_tensor_match_one_device(qwen_shards, tmp_path):
  losses = {}
  for name, mesh in (("one", None), ("fsdp", (1, 8, 1)), ("fsdp_tp", (1, 4, 2))):
    c = qwen_config(qwen_shards)
    if mesh is None:
      c.mesh.num_devices = 1
    else:
      c.mesh.update(dict(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]))
    result = trainer.train(c, str(tmp_path / name), evaluate_fn=lambda model, step: {})
    losses[name] = result.losses
    if name == "fsdp_tp":  # the Qwen towers' params follow the same logical rules as LLaVA's
      specs = result.param_specs
      assert specs["vision/blocks/attn/qkv/kernel"] == (None, "fsdp", None, "tensor", None), specs
      assert specs["merger/fc1/kernel"] == ("fsdp", "tensor"), specs
      assert specs["llm/layers/attn/q/kernel"] == (None, "fsdp", "tensor", None), specs
  assert len(losses["one"]) == 3 and np.all(np.isfinite(losses["one"]))
  np.testing.assert_allclose(losses["fsdp"], losses["one"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(losses["fsdp_tp"], losses["one"], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def qwen_run(qwen_shards, tmp_path_factory):
  """A 4-step micro Qwen2-VL run, and the same run stopped by a NaN at step 3 and resumed from step 2."""
  root = tmp_path_factory.mktemp("qwen_run")
  c = qwen_config(qwen_shards, steps=4)
  c.checkpoint.every = 1
  straight = str(root / "straight")
  tokenizer = tok_lib.make_tokenizer(c.data.tokenizer)
  trainer.train(c, straight, evaluate_fn=runner.make_trainer_hook(c, straight, tokenizer))
  resumed = str(root / "resumed")
  with pytest.raises(NonFiniteLossError):
    trainer.train(c, resumed, evaluate_fn=lambda model, step: {}, fail_at_step=3)
  trainer.train(c, resumed, evaluate_fn=lambda model, step: {})
  return c, straight, resumed


def test_exact_resume(qwen_run):
  _, straight, resumed = qwen_run
  assert run_log(resumed, "loss") == run_log(straight, "loss")  # floats compared exactly
  assert run_log(resumed, "sample_ids") == run_log(straight, "sample_ids")
  s1, p1 = final_params(straight)
  s2, p2 = final_params(resumed)
  assert s1 == s2 == 4
  for a, b in zip(p1, p2):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["likelihood", "generate"])
def test_eval_both_modes(qwen_run, tmp_path, mode):
  config, straight, _ = qwen_run
  mesh = runner.mesh_from_config(config)
  model, config = trainer.load_model_from_workdir(straight, config=config, mesh=mesh)
  assert type(model).__name__ == "QwenVLM"
  tokenizer = tok_lib.make_tokenizer(config.data.tokenizer)
  results = {}
  for batch_size in (8, 5):  # a ragged last batch and another padding must not change a single answer
    out = tmp_path / f"{mode}_{batch_size}"
    results[batch_size] = runner.evaluate(model, config, tokenizer, mixture=config.data.eval_mixture, mode=mode,
                                          batch_size=batch_size, out_dir=str(out), step=4, mesh=mesh)
    rows = metrics.read_samples(out / metrics.SAMPLES_FILE)
    assert len(rows) == 12
  assert results[8]["overall"]["n"] == 12
  assert results[8]["overall"] == results[5]["overall"]
  # The trainer's own final evaluation (runner hook) wrote the run's results.
  with open(os.path.join(straight, "results.json")) as f:
    assert json.load(f)["overall"]["n"] == 12


def test_trim_with_a_qwen_model_fails_at_validation(qwen_shards, tmp_path):
  c = qwen_config(qwen_shards)
  c.trim.enabled = True
  with pytest.raises(Exception, match="TRIM scores CLIP patch embeddings.*LLaVA family"):
    trainer.train(c, str(tmp_path / "trim"))


def _qwen_tokenizer_json(path) -> str:
  """A character-level tokenizer.json laid out like a Qwen2 vocabulary for the tiny HF checkpoints of
  tests/qwen_hf_reference.py: ids 0..249 ordinary, then <|im_start|> 250, <|endoftext|> 251 (pad), <|im_end|> 252
  (eos), <|vision_start|> 253, <|vision_end|> 254, <|image_pad|> 255 (image)."""
  import tokenizers
  chars = [chr(i) for i in range(32, 127)] + ["\n"]
  vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
  vocab.update({f"[unused{i}]": i for i in range(len(vocab), 250)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  tok.add_special_tokens(["<|im_start|>", "<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|image_pad|>"])
  assert tok.token_to_id("<|image_pad|>") == 255 and tok.token_to_id("<|im_start|>") == 250
  out = os.path.join(path, "tokenizer.json")
  tok.save(out)
  return out


def test_fine_tunes_from_a_hugging_face_qwen_checkpoint(qwen_shards, tmp_path):
  """train.init_from_hf with a Qwen2-VL checkpoint: the checkpoint's config and weights, its tokenizer.json
  (kind "qwen", no BOS) and the qwen2_vl chat template; at lr 0 the trained params stay the checkpoint's."""
  pytest.importorskip("transformers")
  from tests import qwen_hf_reference as R
  from medcg.model import qwen_vl
  ckpt = R.make_checkpoint(tmp_path, "qwen2_vl", seed=0)
  _qwen_tokenizer_json(ckpt)
  c = qwen_config(qwen_shards, steps=1, lr=0.0)
  c.train.init_from_hf = ckpt
  c.data.chat_template = "qwen2_vl"
  c.data.tokenizer.update(dict(kind="qwen", path=ckpt))
  c.data.num_image_tokens = 4  # 56 px: a 2 x 2 merged grid
  c.data.seq_len = 448  # a character-level tokenizer
  result = trainer.train(c, str(tmp_path / "run"), evaluate_fn=lambda model, step: {})
  assert len(result.losses) == 1 and np.isfinite(result.losses[0])
  with open(tmp_path / "run" / "config.json") as f:
    assert ckpt in json.dumps(json.load(f))
  _, params = final_params(str(tmp_path / "run"))
  loaded = qwen_vl.load_qwen_vl(ckpt, image_size=56)
  from flax import nnx
  expected = {tuple(str(k) for k in p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
  trained = [v for k, v in sorted(expected.items())]  # nothing frozen in this config: every param trains
  assert len(params) == len(trained)
  for got, want in zip(sorted(params, key=lambda a: (a.shape, float(np.sum(a)))),
                       sorted(trained, key=lambda a: (a.shape, float(np.sum(a))))):
    np.testing.assert_array_equal(got, want)
