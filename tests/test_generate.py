"""Generation (greedy, sampled, stop tokens, padding) and option log-likelihood scoring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medcg.model import generate as gen
from medcg.model import llm

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=64, eos_token_id=None,
            pad_token_id=0)


@pytest.fixture(scope="module")
def model():
  return llm.LLM(llm.make_config(**TINY), rngs=nnx.Rngs(0))


@jax.jit
def forward(model, ids):
  return model(ids)[0]


@pytest.fixture
def rng():
  seed = np.random.SeedSequence().entropy
  print(f"seed {seed}")
  return np.random.default_rng(seed)


def test_left_pad_moves_tokens_right():
  ids = jnp.asarray([[5, 6, 7, 0, 0], [1, 2, 3, 4, 9], [0, 0, 8, 9, 0]])
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
  out, out_mask = gen.left_pad(ids, mask, pad_id=0)
  assert out.tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 9], [0, 0, 0, 8, 9]]
  assert out_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_batched_generation_with_padding_equals_unbatched(model, rng):
  prompts = [rng.integers(1, 64, n).tolist() for n in (3, 7, 3)]
  singles = [np.asarray(gen.generate(model, [p], max_new_tokens=6)[0][0]) for p in prompts]
  width = 9
  right = np.zeros((3, width), np.int32)
  right_mask = np.zeros((3, width), np.int32)
  left, left_mask = right.copy(), right_mask.copy()
  for i, p in enumerate(prompts):
    right[i, :len(p)], right_mask[i, :len(p)] = p, 1
    left[i, width - len(p):], left_mask[i, width - len(p):] = p, 1
  for ids, mask in ((right, right_mask), (left, left_mask)):
    tokens, lengths = gen.generate(model, ids, mask, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(tokens), np.stack(singles))
    assert lengths.tolist() == [6, 6, 6]


def test_stop_tokens_pad_the_rest(model, rng):
  prompt = rng.integers(1, 64, (2, 4))
  free, _ = gen.generate(model, prompt, max_new_tokens=6)
  stop = int(free[0, 2])
  tokens, lengths = gen.generate(model, prompt, max_new_tokens=6, eos_ids=[stop], pad_id=0)
  tokens = np.asarray(tokens)
  for row in range(2):
    hits = np.flatnonzero(np.asarray(free[row]) == stop)
    n = int(hits[0]) + 1 if hits.size else 6
    assert lengths[row] == n
    np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
    assert (tokens[row, n:] == 0).all()


def test_sampling(model, rng):
  prompt = rng.integers(1, 64, (2, 4))
  greedy, _ = gen.generate(model, prompt, max_new_tokens=6)
  # A nucleus that keeps only the top token is greedy, whatever the temperature.
  nucleus, _ = gen.generate(model, prompt, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                            rng=jax.random.key(1))
  np.testing.assert_array_equal(nucleus, greedy)
  a, _ = gen.generate(model, prompt, max_new_tokens=6, temperature=5.0, rng=jax.random.key(2))
  b, _ = gen.generate(model, prompt, max_new_tokens=6, temperature=5.0, rng=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  draws = [gen.generate(model, prompt, max_new_tokens=6, temperature=5.0,
                        rng=jax.random.key(k))[0] for k in range(3, 6)]
  assert any(not np.array_equal(d, greedy) for d in draws)


def test_sample_token_top_p_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  seen = {int(gen.sample_token(logits, jax.random.key(k), temperature=1.0, top_p=0.75)[0])
          for k in range(200)}
  assert seen == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 >= 0.75 stops there


def test_score_options_matches_direct_log_probs(model, rng):
  prompts = [rng.integers(1, 64, n).tolist() for n in (4, 6)]
  options = [[rng.integers(1, 64, n).tolist() for n in (2, 3, 1)],
             [rng.integers(1, 64, n).tolist() for n in (3, 1, 2)]]
  p_ids = np.zeros((2, 6), np.int32)
  p_mask = np.zeros((2, 6), np.int32)
  o_ids = np.zeros((2, 3, 3), np.int32)
  o_mask = np.zeros((2, 3, 3), np.int32)
  for b in range(2):
    p_ids[b, :len(prompts[b])], p_mask[b, :len(prompts[b])] = prompts[b], 1  # right padded
    for o, opt in enumerate(options[b]):
      o_ids[b, o, :len(opt)], o_mask[b, o, :len(opt)] = opt, 1
  total, mean = gen.score_options_lm(model, p_ids, p_mask, o_ids, o_mask)
  # Reference: each prompt + option alone, unpadded; trailing filler cannot change earlier
  # logits (causal), so all six sequences share one width and one compile.
  pairs = [(b, o) for b in range(2) for o in range(3)]
  seqs = [prompts[b] + options[b][o] for b, o in pairs]
  batch = np.asarray([s + [1] * (9 - len(s)) for s in seqs], np.int32)
  logp = np.asarray(jax.nn.log_softmax(forward(model, jnp.asarray(batch)), axis=-1))
  for k, (b, o) in enumerate(pairs):
    opt = options[b][o]
    want = sum(logp[k, len(prompts[b]) - 1 + j, t] for j, t in enumerate(opt))
    np.testing.assert_allclose(total[b, o], want, atol=1e-4)
    np.testing.assert_allclose(mean[b, o], want / len(opt), atol=1e-4)


def test_greedy_generate_equals_transformers(tmp_path, rng):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 eos_token_id=2, pad_token_id=0)
  ref = transformers.LlamaForCausalLM(cfg).eval()
  ref.save_pretrained(str(tmp_path), safe_serialization=True)
  ours = llm.load_hf(str(tmp_path))
  prompt = rng.integers(3, 96, (1, 5))
  with torch.no_grad():
    out = ref.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False, eos_token_id=2,
                       pad_token_id=0).numpy()[0, 5:]
  want = np.zeros(16, np.int64)
  want[:len(out)] = out
  tokens, lengths = gen.generate(ours, prompt, max_new_tokens=16)
  np.testing.assert_array_equal(np.asarray(tokens[0]), want)
  hits = np.flatnonzero(out == 2)
  assert int(lengths[0]) == (int(hits[0]) + 1 if hits.size else 16)
