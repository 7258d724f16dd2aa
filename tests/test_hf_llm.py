"""HF safetensors import of LlamaForCausalLM / Qwen2ForCausalLM: transformers parity, errors."""
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd as core_spmd

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medcg.model import hf, llm  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _save(tmp_path, name, model, **kwargs):
  path = str(tmp_path / name)
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  return path


def _llama(**overrides):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{**TINY, **overrides})
  return _random_biases(transformers.LlamaForCausalLM(cfg).eval())


def _random_biases(model):
  """Random init leaves biases at 0, which would hide a mis-wired bias."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.normal_(0, 0.5)
  return model


def _parity(model, path, seq_len=12, seed=None):
  seed = np.random.SeedSequence().entropy if seed is None else seed
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, TINY["vocab_size"], (2, seq_len))
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  ours, _ = llm.load_hf(path)(jnp.asarray(ids))
  diff = np.abs(np.asarray(ours) - ref).max()
  assert diff <= 1e-4, f"max abs logit diff {diff} (seed {seed})"


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False),
    dict(tie_word_embeddings=True),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
    dict(attention_bias=True, mlp_bias=True),
], ids=["untied", "tied", "llama3", "linear", "dynamic", "biases"])
def test_llama_logits_match_transformers(tmp_path, overrides):
  model = _llama(**overrides)
  path = _save(tmp_path, "llama", model)
  _parity(model, path)


def test_qwen2_logits_match_transformers(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=False)
  model = _random_biases(transformers.Qwen2ForCausalLM(cfg).eval())
  path = _save(tmp_path, "qwen2", model)
  assert llm.from_hf_config(json.load(open(os.path.join(path, "config.json")))).qkv_bias
  _parity(model, path)


def test_sharded_checkpoint_loads(tmp_path):
  model = _llama()
  path = _save(tmp_path, "sharded", model, max_shard_size="20KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
  _parity(model, path)


def test_load_onto_mesh_reads_only_local_slices(tmp_path):
  model = _llama()
  path = _save(tmp_path, "mesh", model)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
           ("vocab", "tensor"), ("layers", None), ("head_dim", None), ("norm", None),
           ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"))
  ckpt = hf.open_checkpoint(path)
  cfg = llm.from_hf_config(ckpt.config)
  graphdef, abstract = llm.abstract_model(cfg)
  with core_spmd.logical_axis_rules(rules):
    shardings = nnx.get_named_sharding(abstract, mesh)
  reads = []
  original_get = ckpt.get

  def counting_get(name, index=None):
    out = original_get(name, index)
    reads.append((name, out.size))
    return out

  ckpt.get = counting_get
  state = hf.load_params(abstract, ckpt, hf.llm_table(cfg), shardings=shardings)
  q = state["layers"]["attn"]["q"]["kernel"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  full_q = TINY["hidden_size"] * TINY["hidden_size"]
  q_reads = [n for name, n in reads if name.endswith("q_proj.weight")]
  assert max(q_reads) == full_q // 8, "each device must read only its (embed, heads) block"
  norm_reads = [n for name, n in reads if name == "model.norm.weight"]
  assert norm_reads == [TINY["hidden_size"]], "a replicated tensor is read once per host"
  # Same values as a plain single-device load.
  plain = hf.load_params(abstract, ckpt, hf.llm_table(cfg))
  np.testing.assert_array_equal(np.asarray(q), np.asarray(plain["layers"]["attn"]["q"]["kernel"]
                                                          .get_value()))
  # Shardings carried by the abstract state itself (nnx.get_abstract_model) are honoured too.
  with core_spmd.logical_axis_rules(rules):
    _, carried = nnx.get_abstract_model(lambda: llm.LLM(cfg, rngs=nnx.Rngs(0)), mesh)
  down = hf.load_params(carried, ckpt, hf.llm_table(cfg))["layers"]["mlp"]["down"]["kernel"]
  assert down.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  ids = jnp.arange(10).reshape(1, 10) % TINY["vocab_size"]
  with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
    sharded_logits = jax.jit(lambda m, x: m(x)[0])(nnx.merge(graphdef, state), ids)
  assert sharded_logits.sharding.spec[-1] == "tensor"  # the act_vocab constraint took effect
  np.testing.assert_allclose(sharded_logits, nnx.merge(graphdef, plain)(ids)[0], atol=1e-5)


def test_missing_tensor_and_wrong_shape_are_listed(tmp_path):
  from safetensors.numpy import load_file, save_file
  path = _save(tmp_path, "bad", _llama())
  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  del tensors["model.norm.weight"]
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  tensors["model.extra.weight"] = np.zeros((3,), np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with pytest.raises(hf.CheckpointError) as err:
    llm.load_hf(path)
  msg = str(err.value)
  assert "missing HF tensors (2)" in msg
  assert "model.layers.1.mlp.up_proj.weight" in msg and "model.norm.weight" in msg
  assert "model.layers.0.self_attn.k_proj.weight: checkpoint shape (8, 32)" in msg
  assert "unexpected HF tensors (1): model.extra.weight" in msg
  assert path in msg


def test_unknown_architecture(tmp_path):
  path = _save(tmp_path, "arch", _llama())
  cfg_file = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_file))
  cfg["architectures"] = ["MistralForCausalLM"]
  json.dump(cfg, open(cfg_file, "w"))
  with pytest.raises(hf.CheckpointError, match="unsupported architecture 'MistralForCausalLM'"):
    llm.load_hf(path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
  path = tmp_path / "pickle"
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
  marker = tmp_path / "unpickled"

  class CreatesFileWhenUnpickled:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  with open(path / "pytorch_model.bin", "wb") as f:
    pickle.dump(CreatesFileWhenUnpickled(), f)
  with pytest.raises(hf.CheckpointError, match=r"only pickle weights \['pytorch_model.bin'\]"):
    hf.open_checkpoint(str(path))
  assert not marker.exists()


def test_no_config_and_missing_shard(tmp_path):
  with pytest.raises(hf.CheckpointError, match="has no config.json"):
    hf.open_checkpoint(str(tmp_path))
  path = _save(tmp_path, "shards", _llama(), max_shard_size="20KB")
  shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
  os.remove(os.path.join(path, shard))
  with pytest.raises(hf.CheckpointError, match=shard):
    hf.open_checkpoint(path)


def test_bf16_checkpoint_and_prefixed_table(tmp_path):
  model = _llama().to(torch.bfloat16)
  path = _save(tmp_path, "bf16", model)
  ckpt = hf.open_checkpoint(path)
  assert ckpt.dtype("model.norm.weight") == "BF16"
  cfg = llm.from_hf_config(ckpt.config)
  _, abstract = llm.abstract_model(cfg)
  state = hf.load_params(abstract, ckpt, hf.llm_table(cfg))
  want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(state["layers"]["mlp"]["down"]["kernel"]
                                           .get_value()[1]), want)
  # A prefixed table (as LLaVA's language model uses) renames both sides.
  table = hf.llm_table(cfg).prefixed("llm.", {"model.": "model.language_model."})
  assert hf.Rule("llm.final_norm.scale", "model.language_model.norm.weight") in table.rules
  assert any(r.hf == "lm_head.weight" for r in table.rules)


def test_conv_and_unscanned_layer_list_rules(tmp_path):
  """The generic pieces the vision towers use: CONV permute, `{i}` in param paths, head splits."""
  from safetensors.numpy import save_file
  from medcg.model import layers

  class Toy(nnx.Module):
    def __init__(self, rngs):
      self.patch = nnx.Conv(3, 4, (2, 2), padding="VALID", rngs=rngs)
      self.blocks = nnx.List([layers.Dense((6,), (2, 3), in_names=("embed",),
                                           out_names=("heads", "head_dim"), use_bias=True,
                                           rngs=rngs) for _ in range(2)])

  rng = np.random.default_rng(0)
  tensors = {"patch.weight": rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
             "patch.bias": rng.normal(size=(4,)).astype(np.float32)}
  for i in range(2):
    tensors[f"blocks.{i}.proj.weight"] = rng.normal(size=(6, 6)).astype(np.float32)
    tensors[f"blocks.{i}.proj.bias"] = rng.normal(size=(6,)).astype(np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Toy"]}))
  table = hf.named_table([
      ("patch.kernel", "patch.weight", hf.CONV), ("patch.bias", "patch.bias", hf.IDENTITY),
      ("blocks.{i}.kernel", "blocks.{i}.proj.weight", hf.LINEAR),
      ("blocks.{i}.bias", "blocks.{i}.proj.bias", hf.IDENTITY)])
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Toy(nnx.Rngs(0))), nnx.Param)
  toy = nnx.merge(graphdef, hf.load_params(abstract, hf.open_checkpoint(str(tmp_path)), table))
  np.testing.assert_array_equal(toy.patch.kernel[...],
                                tensors["patch.weight"].transpose(2, 3, 1, 0))
  x = rng.normal(size=(1, 6)).astype(np.float32)
  want = (x @ tensors["blocks.1.proj.weight"].T + tensors["blocks.1.proj.bias"]).reshape(1, 2, 3)
  np.testing.assert_allclose(toy.blocks[1](jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
  # torch conv2d (NCHW) == nnx.Conv (NHWC) on the permuted kernel.
  img = rng.normal(size=(1, 3, 5, 5)).astype(np.float32)
  ref = torch.nn.functional.conv2d(torch.tensor(img), torch.tensor(tensors["patch.weight"]),
                                   torch.tensor(tensors["patch.bias"])).numpy()
  ours = toy.patch(jnp.asarray(img.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
