"""Decoder LLM: KV cache, padding, scan/remat, dtypes, sharding names, FLOPs, config import."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medcg.model import llm

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=64)


@jax.jit
def call(model, *args, **kwargs):
  """Jitted forward: eager op-by-op dispatch would dominate test time."""
  return model(*args, **kwargs)


def _model(seed=0, **overrides):
  return llm.LLM(llm.make_config(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))


@pytest.fixture
def rng():
  seed = np.random.SeedSequence().entropy
  print(f"seed {seed}")
  return np.random.default_rng(seed)


def test_kv_cache_decoding_equals_full_recomputation(rng):
  model = _model()
  ids = jnp.asarray(rng.integers(0, 64, (2, 10)))
  full, _ = call(model, ids)
  cache = llm.init_cache(model.cfg, 2, 16)
  logits, cache = call(model, ids[:, :6], cache=cache)
  steps = [logits]
  for t in range(6, 10):
    logits, cache = call(model, ids[:, t:t + 1], cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
  assert int(cache.index) == 10 and cache.lengths.tolist() == [10, 10]


def test_kv_cache_with_left_padding(rng):
  model = _model()
  ids = jnp.asarray(rng.integers(1, 64, (1, 7)))
  padded = jnp.concatenate([jnp.zeros((1, 3), ids.dtype), ids], 1)
  mask = jnp.asarray([[0, 0, 0] + [1] * 7])
  full, _ = call(model, ids)
  logits, cache = call(model, padded[:, :7], attention_mask=mask[:, :7],
                       cache=llm.init_cache(model.cfg, 1, 12))
  outs = [logits[:, 3:]]
  for t in range(7, 10):
    logits, cache = call(model, padded[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


def test_padding_does_not_change_real_token_logits(rng):
  model = _model()
  ids = jnp.asarray(rng.integers(1, 64, (1, 6)))
  alone, _ = call(model, ids)
  right = jnp.concatenate([ids, jnp.zeros((1, 3), ids.dtype)], 1)
  left = jnp.concatenate([jnp.zeros((1, 3), ids.dtype), ids], 1)
  right_out, _ = call(model, right, attention_mask=jnp.asarray([[1] * 6 + [0] * 3]))
  left_out, _ = call(model, left, attention_mask=jnp.asarray([[0] * 3 + [1] * 6]))
  np.testing.assert_allclose(right_out[:, :6], alone, atol=1e-5)
  np.testing.assert_allclose(left_out[:, 3:], alone, atol=1e-5)


def test_inputs_embeds_path_equals_ids_path(rng):
  model = _model(tie_word_embeddings=True)
  ids = jnp.asarray(rng.integers(0, 64, (2, 5)))
  a, _ = call(model, ids)
  b, _ = call(model, inputs_embeds=model.embed(ids))
  np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ValueError, match="exactly one"):
    call(model, ids, inputs_embeds=model.embed(ids))


def test_remat_keeps_values_and_grads(rng):
  policy = "full"
  ids = jnp.asarray(rng.integers(0, 64, (2, 6)))

  @jax.jit
  def loss_and_grad(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(ids)[0])[..., 0])
    return jax.value_and_grad(loss)(params)

  (l0, g0), (l1, g1) = loss_and_grad(_model()), loss_and_grad(_model(remat=policy))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="unknown remat policy 'sometimes'"):
    llm.make_config(**TINY, remat="sometimes")


def test_scan_keeps_program_size_constant_in_depth():
  def num_dots(layers):
    model = nnx.eval_shape(lambda: _model(num_layers=layers))
    jaxpr = jax.make_jaxpr(lambda m, x: m(x)[0])(model, jnp.zeros((1, 4), jnp.int32))
    return str(jaxpr).count("dot_general")

  assert num_dots(2) == num_dots(6)


def test_bf16_compute_with_f32_master_params(rng):
  ids = jnp.asarray(rng.integers(0, 64, (2, 6)))
  f32, bf16 = _model(), _model(dtype="bfloat16")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  out32, _ = call(f32, ids)
  out16, cache = call(bf16, ids, cache=llm.init_cache(bf16.cfg, 2, 8))
  assert out16.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
  assert float(jnp.abs(out32 - out16).max()) < 0.1


def test_params_carry_logical_axis_names():
  _, params = llm.abstract_model(llm.make_config(**TINY))
  names = {".".join(map(str, p)): v.get_metadata()["out_sharding"]
           for p, v in nnx.to_flat_state(params)}
  assert names["embed.embedding"] == ("vocab", "embed")
  assert names["layers.attn.q.kernel"] == ("layers", "embed", "heads", "head_dim")
  assert names["layers.attn.k.kernel"] == ("layers", "embed", "kv_heads", "head_dim")
  assert names["layers.attn.o.kernel"] == ("layers", "heads", "head_dim", "embed")
  assert names["layers.mlp.down.kernel"] == ("layers", "mlp", "embed")
  assert names["layers.input_norm.scale"] == ("layers", "norm")
  assert names["lm_head.kernel"] == ("embed", "vocab")


@pytest.mark.parametrize("tied", [False, True])
def test_model_flops_per_token_counts_every_matmul(tied):
  cfg = llm.make_config(**TINY, tie_word_embeddings=tied)
  _, params = llm.abstract_model(cfg)
  kernels = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(params) if p[-1] == "kernel")
  head = cfg.hidden_size * cfg.vocab_size if tied else 0
  seq = 128
  attn = cfg.num_layers * 2 * seq * cfg.num_heads * cfg.head_dim  # causal: half of 4*S*H*D
  assert llm.model_flops_per_token(cfg, seq) == 2 * (kernels + head) + attn
  assert llm.model_flops_per_token(cfg, seq, training=True) == 3 * (2 * (kernels + head) + attn)
  assert llm.model_flops_per_example(cfg, seq) == seq * (2 * (kernels + head) + attn)


def test_from_hf_config_fields_and_errors():
  base = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
              rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5e5, eos_token_id=[2, 3])
  cfg = llm.from_hf_config(base)
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta) == (8, 2, 5e5)
  assert cfg.rope_scaling["factor"] == 2.0 and cfg.tie_word_embeddings and not cfg.qkv_bias
  assert list(cfg.eos_token_id) == [2, 3]
  qwen = llm.from_hf_config({**base, "architectures": ["Qwen2ForCausalLM"]})
  assert qwen.qkv_bias and not qwen.o_bias
  with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
    llm.from_hf_config({**base, "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="use_sliding_window"):
    llm.from_hf_config({**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True})
  with pytest.raises(ValueError, match="unsupported RoPE scaling type 'yarn'"):
    llm.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
    llm.make_config(**{**TINY, "num_kv_heads": 3})


def test_attention_auto_falls_back_to_xla_when_cudnn_refuses(monkeypatch, rng):
  from medcg.model import layers
  q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.bfloat16)
  k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.bfloat16)
  mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
  want = layers.attention(q, k, k, mask, "xla")
  monkeypatch.setattr(layers, "_cudnn_fits", lambda q, k: True)  # CPU: cuDNN raises, XLA runs
  np.testing.assert_array_equal(layers.attention(q, k, k, mask), want)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    layers.attention(q, k, k, mask, "flash")
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    llm.make_config(**TINY, attention_impl="flash")
