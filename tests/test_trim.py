"""TRIM: the XLA reference against a NumPy port of the released code, the Pallas kernels (interpret
mode) against the reference, edge cases, gradients, jit and the model-facing helper.

Inputs are fresh random draws each run; every assertion message carries the seed. Reproduce a
failure with TRIM_TEST_SEED=<seed>.
"""
import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medcg.kernels import trim as trim_lib
from medcg.kernels import trim_common

MODES = (("iqr_batch", None), ("iqr_example", None), ("ratio", 0.2))


@pytest.fixture
def seed():
  value = int(os.environ.get("TRIM_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
  print(f"TRIM test seed: {value}")
  return value


# ----------------------------------------------------------------------------- NumPy port

def numpy_trim(hidden, image_embeds, text_embeds, k_max, mode, ratio=None):
  """TRIM as the released code computes it (reference/trim.md §1.3), in NumPy float32.

  Returns tokens, count and (p, upper bounds) so tests can tell whether a draw sits within float
  rounding of a decision boundary.
  """
  b, n, d = hidden.shape
  s = np.einsum("bne,be->bn", image_embeds.astype(np.float32), text_embeds.astype(np.float32))
  neg = -s
  ex = np.exp(neg - neg.max(axis=-1, keepdims=True))
  p = ex / ex.sum(axis=-1, keepdims=True)
  if mode == "iqr_batch":
    q1, q3 = np.percentile(p, 25), np.percentile(p, 75)
    ub = np.full((b,), q3 + 1.5 * (q3 - q1))
    ks = [int(n * (np.sum(p > ub[0]) / (b * n)))] * b
  elif mode == "iqr_example":
    q1, q3 = np.percentile(p, 25, axis=-1), np.percentile(p, 75, axis=-1)
    ub = q3 + 1.5 * (q3 - q1)
    ks = [int(n * (np.sum(p[i] > ub[i]) / n)) for i in range(b)]
  else:
    ub = None
    ks = [int(n * ratio)] * b
  tokens = np.zeros((b, k_max + 1, d), np.float32)
  count = np.zeros((b,), np.int32)
  for i in range(b):
    k = min(ks[i], k_max)
    top = np.argsort(-p[i], kind="stable")[:k]  # ties: lowest index first
    keep = np.zeros((n,), bool)
    keep[top] = True
    tokens[i, :k] = hidden[i][keep]               # boolean-mask gather: raster order
    if k < n:
      tokens[i, k] = hidden[i][~keep].astype(np.float32).mean(axis=0)
    count[i] = k + 1
  return tokens, count, (p, ub)


def well_separated(p, ub, count, rel=1e-4):
  """False if a p sits within float rounding of the threshold or of the top-K cut."""
  for i in range(p.shape[0]):
    row = np.sort(p[i])[::-1]
    if ub is not None and np.min(np.abs(row - ub[i])) <= rel * abs(ub[i]):
      return False
    k = count[i] - 1
    if 0 < k < len(row) and row[k - 1] - row[k] <= rel * row[k - 1]:
      return False
  return True


def draw(seed, b, n, d, e, k_max, mode, ratio, dtype=np.float32):
  """Random inputs whose TRIM decisions are not at the mercy of float rounding."""
  for attempt in range(50):
    rng = np.random.default_rng(seed + attempt)
    scale = rng.uniform(0.1, 0.6)  # spread of the scores: sparse to dense outlier sets
    hidden = rng.normal(size=(b, n, d)).astype(dtype)
    image_embeds = (rng.normal(size=(b, n, e)) * scale).astype(np.float32)
    text_embeds = rng.normal(size=(b, e)).astype(np.float32)
    tokens, count, (p, ub) = numpy_trim(hidden.astype(np.float32), image_embeds, text_embeds,
                                        k_max, mode, ratio)
    if well_separated(p, ub, count):
      return (hidden, image_embeds, text_embeds), (tokens, count)
  raise AssertionError(f"seed={seed}: no well-separated draw in 50 attempts")


def assert_same(actual, expected, seed, what, atol=1e-6):
  tokens, count = actual
  exp_tokens, exp_count = expected
  np.testing.assert_array_equal(np.asarray(count), exp_count, err_msg=f"{what} count, seed={seed}")
  np.testing.assert_allclose(np.asarray(tokens, np.float32), exp_tokens, rtol=1e-6, atol=atol,
                             err_msg=f"{what} tokens, seed={seed}")


# ----------------------------------------------------------------------------- XLA vs NumPy

@pytest.mark.parametrize("mode,ratio", MODES)
@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("n", [16, 576])
def test_xla_matches_numpy_port(seed, mode, ratio, b, n):
  d, e = (8, 4) if n == 16 else (32, 16)
  for k_max in (n, 3):  # uncapped, and capped (K > k_max keeps the k_max highest p)
    inputs, expected = draw(seed, b, n, d, e, k_max, mode, ratio)
    got = trim_lib.trim(*map(jnp.asarray, inputs), k_max=k_max, mode=mode, ratio=ratio,
                        impl="xla")
    assert_same(got, expected, seed, f"xla {mode} b={b} n={n} k_max={k_max}")


def test_iqr_batch_shares_k_and_differs_from_per_example(seed):
  inputs, _ = draw(seed, 8, 64, 8, 4, 64, "iqr_batch", None)
  _, count_batch = trim_lib.trim(*map(jnp.asarray, inputs), k_max=64, impl="xla")
  assert len(set(np.asarray(count_batch).tolist())) == 1, f"seed={seed}"
  p = trim_common.probs(*map(jnp.asarray, inputs[1:]))
  # K = #above // B over the batch, against the per-example sum.
  ub = trim_common.iqr_upper_bound(p)
  assert int(count_batch[0]) - 1 == int(jnp.sum(p > ub)) // 8, f"seed={seed}"


# ----------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("mode,ratio", MODES)
@pytest.mark.parametrize("b,n", [(3, 16), (2, 576)])
def test_pallas_interpret_matches_xla(seed, backend, mode, ratio, b, n):
  d, e = (8, 4) if n == 16 else (32, 16)
  k_max = n // 4  # caps some iqr draws and the ratio draws with n=16
  inputs, _ = draw(seed, b, n, d, e, k_max, mode, ratio)
  args = list(map(jnp.asarray, inputs))
  want = trim_lib.trim(*args, k_max=k_max, mode=mode, ratio=ratio, impl="xla")
  got = trim_lib.trim(*args, k_max=k_max, mode=mode, ratio=ratio, impl=f"pallas_{backend}",
                      interpret=True)
  assert_same(got, tuple(map(np.asarray, want)), seed, f"{backend} {mode} b={b} n={n}")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_pallas_bf16_hidden_and_odd_sizes(seed, backend):
  # N=24 (not a power of two), D=48, E=12, k_max+1=7: exercises the chunk / tail paths.
  inputs, _ = draw(seed, 2, 24, 48, 12, 6, "iqr_example", None)
  hidden = jnp.asarray(inputs[0], jnp.bfloat16)
  args = (hidden, *map(jnp.asarray, inputs[1:]))
  want = trim_lib.trim(*args, k_max=6, mode="iqr_example", impl="xla")
  got = trim_lib.trim(*args, k_max=6, mode="iqr_example", impl=f"pallas_{backend}",
                      interpret=True)
  assert got[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]), err_msg=f"seed={seed}")
  np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                             rtol=1e-2, atol=1e-2, err_msg=f"seed={seed}")


# ----------------------------------------------------------------------------- edge cases

def _all_impls(args, **kw):
  yield "xla", trim_lib.trim(*args, impl="xla", **kw)
  for backend in ("gpu", "tpu"):
    yield backend, trim_lib.trim(*args, impl=f"pallas_{backend}", interpret=True, **kw)


def _fixed_inputs(seed, b, n, d, image_embeds, text_embeds):
  hidden = np.random.default_rng(seed).normal(size=(b, n, d)).astype(np.float32)
  return hidden, np.asarray(image_embeds, np.float32), np.asarray(text_embeds, np.float32)


@pytest.mark.parametrize("mode", ["iqr_batch", "iqr_example"])
def test_all_equal_scores_keep_nothing(seed, mode):
  # Uniform p: IQR = 0 and nothing lies above Q3, so K = 0: only the mean of every token.
  b, n, d = 2, 16, 8
  hidden, emb, text = _fixed_inputs(seed, b, n, d, np.ones((b, n, 4)), np.zeros((b, 4)))
  for name, (tokens, count) in _all_impls((hidden, emb, text), k_max=4, mode=mode):
    np.testing.assert_array_equal(np.asarray(count), [1, 1], err_msg=name)
    np.testing.assert_allclose(np.asarray(tokens[:, 0]), hidden.mean(axis=1), rtol=1e-6,
                               atol=1e-6, err_msg=f"{name} seed={seed}")
    assert not np.any(np.asarray(tokens[:, 1:])), name


def test_ratio_zero_is_k_zero_and_ratio_one_keeps_all(seed):
  b, n, d = 1, 16, 8
  rng = np.random.default_rng(seed)
  hidden, emb, text = _fixed_inputs(seed, b, n, d, rng.normal(size=(b, n, 4)),
                                    rng.normal(size=(b, 4)))
  for name, (tokens, count) in _all_impls((hidden, emb, text), k_max=n, mode="ratio", ratio=0.0):
    assert int(count[0]) == 1, name
    np.testing.assert_allclose(np.asarray(tokens[0, 0]), hidden[0].mean(0), atol=1e-6, rtol=1e-6)
  for name, (tokens, count) in _all_impls((hidden, emb, text), k_max=n, mode="ratio", ratio=1.0):
    assert int(count[0]) == n + 1, name
    np.testing.assert_array_equal(np.asarray(tokens[0, :n]), hidden[0], err_msg=name)
    assert not np.any(np.asarray(tokens[0, n])), f"{name}: mean of nothing must be zeros"


def test_ties_lowest_index_first(seed):
  # Integer embeddings make s exact: tokens 2, 5, 9, 12 share the lowest score (largest p),
  # tokens 0, 7 the next. With K = 5: the four tied leaders, then token 0 (before 7).
  b, n, d = 1, 16, 8
  raw = np.full((n,), 3.0)
  raw[[2, 5, 9, 12]] = 0.0
  raw[[0, 7]] = 1.0
  emb = np.zeros((b, n, 4))
  emb[0, :, 0] = raw
  text = np.array([[1.0, 0.0, 0.0, 0.0]])
  hidden, emb, text = _fixed_inputs(seed, b, n, d, emb, text)
  kept = [0, 2, 5, 9, 12]
  rest = [i for i in range(n) if i not in kept]
  for name, (tokens, count) in _all_impls((hidden, emb, text), k_max=8, mode="ratio",
                                          ratio=5 / 16):
    assert int(count[0]) == 6, name
    np.testing.assert_array_equal(np.asarray(tokens[0, :5]), hidden[0, kept], err_msg=name)
    np.testing.assert_allclose(np.asarray(tokens[0, 5]), hidden[0, rest].mean(0), atol=1e-6,
                               rtol=1e-6, err_msg=name)
  # All-equal scores with a ratio: the first K tokens in raster order.
  hidden, emb, text = _fixed_inputs(seed, b, n, d, np.ones((b, n, 4)), np.ones((b, 4)))
  for name, (tokens, count) in _all_impls((hidden, emb, text), k_max=8, mode="ratio", ratio=0.25):
    np.testing.assert_array_equal(np.asarray(tokens[0, :4]), hidden[0, :4], err_msg=name)


def test_k_above_k_max_keeps_highest_p(seed):
  b, n, d = 1, 16, 8
  raw = np.arange(n, dtype=np.float64)[::-1].copy()  # token 15 has the lowest score
  emb = np.zeros((b, n, 4))
  emb[0, :, 0] = raw
  hidden, emb, text = _fixed_inputs(seed, b, n, d, emb, np.array([[1.0, 0, 0, 0]]))
  for name, (tokens, count) in _all_impls((hidden, emb, text), k_max=3, mode="ratio", ratio=0.5):
    assert int(count[0]) == 4, name
    np.testing.assert_array_equal(np.asarray(tokens[0, :3]), hidden[0, [13, 14, 15]], err_msg=name)
    np.testing.assert_allclose(np.asarray(tokens[0, 3]), hidden[0, :13].mean(0), atol=1e-6,
                               rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- gradients, jit

def numpy_equivalent_jnp(hidden, keep_masks, k_max):
  """Plain jnp transcription of the NumPy port's output, given the port's keep masks."""
  rows = []
  for i, keep in enumerate(keep_masks):
    kept = hidden[i][np.flatnonzero(keep)]
    rest = hidden[i][np.flatnonzero(~keep)]
    mean = rest.mean(axis=0, keepdims=True) if len(rest) else jnp.zeros((1, hidden.shape[2]))
    pad = jnp.zeros((k_max - len(kept), hidden.shape[2]))
    rows.append(jnp.concatenate([kept, mean, pad]))
  return jnp.stack(rows)


@pytest.mark.parametrize("mode,ratio", MODES)
def test_gradients_match_numpy_equivalent(seed, mode, ratio):
  b, n, d, e, k_max = 3, 16, 8, 4, 4
  inputs, (exp_tokens, exp_count) = draw(seed, b, n, d, e, k_max, mode, ratio)
  hidden, emb, text = map(jnp.asarray, inputs)
  weights = jnp.asarray(np.random.default_rng(seed).normal(size=exp_tokens.shape), jnp.float32)
  # Keep masks from the NumPy port: kept rows are exactly those appearing before the mean slot.
  keep_masks = []
  for i in range(b):
    k = exp_count[i] - 1
    match = (inputs[0][i][None, :, :] == exp_tokens[i, :k, None, :]).all(-1)
    keep_masks.append(match.any(0))
  want = jax.grad(lambda h: jnp.sum(numpy_equivalent_jnp(h, keep_masks, k_max) * weights))(hidden)
  for impl in ("xla", "pallas_gpu", "pallas_tpu"):
    def loss(h, emb, text, impl=impl):
      tokens, _ = trim_lib.trim(h, emb, text, k_max=k_max, mode=mode, ratio=ratio, impl=impl,
                                interpret=impl != "xla")
      return jnp.sum(tokens * weights)
    got, d_emb, d_text = jax.grad(loss, argnums=(0, 1, 2))(hidden, emb, text)
    assert np.all(np.isfinite(np.asarray(got))), f"{impl} seed={seed}"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6,
                               err_msg=f"{impl} seed={seed}")
    assert not np.any(np.asarray(d_emb)) and not np.any(np.asarray(d_text)), impl


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_jit_static_shapes(seed, impl):
  b, n, d, e, k_max = 2, 16, 8, 4, 5
  fn = jax.jit(functools.partial(trim_lib.trim, k_max=k_max, mode="iqr_example", impl=impl,
                                 interpret=impl != "xla"))
  for offset in range(2):  # different data (and K), same compiled shapes
    inputs, expected = draw(seed + 100 * offset, b, n, d, e, k_max, "iqr_example", None)
    tokens, count = fn(*map(jnp.asarray, inputs))
    assert tokens.shape == (b, k_max + 1, d) and count.shape == (b,) and count.dtype == jnp.int32
    assert_same((tokens, count), expected, seed, f"jit {impl}")
  assert fn._cache_size() == 1


# ----------------------------------------------------------------------------- API

def test_auto_falls_back_to_xla_on_cpu_and_logs_once(caplog):
  trim_lib._log_fallback_once.cache_clear()
  with caplog.at_level(logging.INFO):
    assert trim_lib.resolve_impl("auto") == "xla"
    assert trim_lib.resolve_impl("auto") == "xla"
  assert sum("XLA reference" in r.getMessage() for r in caplog.records) == 1
  assert trim_lib.resolve_impl("pallas_tpu") == "pallas_tpu"


@pytest.mark.parametrize("kwargs,match", [
    (dict(k_max=17), "k_max"),
    (dict(k_max=4, mode="topk"), "mode"),
    (dict(k_max=4, mode="ratio"), "ratio"),
    (dict(k_max=4, mode="ratio", ratio=1.5), "ratio"),
    (dict(k_max=4, ratio=0.3), "ratio"),
    (dict(k_max=4, impl="cuda"), "impl"),
])
def test_bad_arguments_raise(kwargs, match):
  x = jnp.zeros((1, 16, 8)), jnp.zeros((1, 16, 4)), jnp.zeros((1, 4))
  with pytest.raises(ValueError, match=match):
    trim_lib.trim(*x, **kwargs)
  with pytest.raises(ValueError, match="shape"):
    trim_lib.trim(x[0], x[1], jnp.zeros((2, 4)), k_max=4)


def test_trim_features_reads_config_and_masks_slots(seed):
  inputs, (exp_tokens, exp_count) = draw(seed, 3, 16, 8, 4, 6, "ratio", 0.25)
  cfg = ml_collections.ConfigDict(dict(enabled=True, mode="ratio", k_max=6, ratio=0.25,
                                       impl="xla", text_source="question"))
  tokens, count, mask = trim_lib.trim_features(cfg, *map(jnp.asarray, inputs))
  assert_same((tokens, count), (exp_tokens, exp_count), seed, "trim_features")
  np.testing.assert_array_equal(np.asarray(mask), np.arange(7)[None] < exp_count[:, None])
  with pytest.raises(ValueError, match="trim.k_max"):
    trim_lib.trim_features(dict(mode="ratio"), *map(jnp.asarray, inputs))


# ----------------------------------------------------------------------------- real lowering

# Cross-lowering on a CPU host runs the Pallas -> Triton IR and Pallas -> Mosaic lowerings, which
# reject unsupported primitives (sort, gather, ...) and Triton's non-power-of-two arrays. It does not
# run the Triton / Mosaic compilers behind them, so layouts and resources are still unchecked.
_TARGETS = {"gpu": ("cuda", "NVIDIA H100 80GB HBM3", "gpu"), "tpu": ("tpu", "TPU v5 lite", "tpu")}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("mode,ratio", MODES)
def test_kernels_lower_for_their_backend(backend, mode, ratio):
  lowering_platform, device_kind, platform = _TARGETS[backend]
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform=platform)
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  b, n, d, e = 2, 576, 1024, 768  # LLaVA-1.5 shapes: N and E are not powers of two
  args = (jnp.zeros((b, n, d), jnp.bfloat16), jnp.zeros((b, n, e)), jnp.zeros((b, e)))
  fn = jax.jit(functools.partial(trim_lib.trim, k_max=256, mode=mode, ratio=ratio,
                                 impl=f"pallas_{backend}"))
  with jax.sharding.use_abstract_mesh(mesh):
    text = fn.trace(*args).lower(lowering_platforms=(lowering_platform,)).as_text()
  marker = "triton" if backend == "gpu" else "tpu_custom_call"
  kernels = [line for line in text.splitlines() if "custom_call" in line and marker in line]
  # GPU: scores + select; TPU: one fused kernel, or probs + select for the batch-wide quantile.
  assert len(kernels) == (2 if backend == "gpu" or mode == "iqr_batch" else 1), len(kernels)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_shard_map_over_batch_pools_each_shard(seed, impl):
  # With a batch-sharded input the kernels run per shard under shard_map; iqr_batch then pools
  # each shard's batch (what the released per-device training did).
  shards, per_shard, n, d, e, k_max = 4, 2, 16, 8, 4, 6
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:shards]), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  fn = functools.partial(trim_lib.trim, k_max=k_max, mode="iqr_batch", impl=impl,
                         interpret=impl != "xla")
  # check_vma=False: interpret mode's internal scan trips the varying-axes check (jax asks for
  # this workaround); compiled kernels declare their outputs' varying axes (_out_struct).
  sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec),
                                  out_specs=(spec, spec), check_vma=impl == "xla"))
  parts = [draw(seed + 1000 * s, per_shard, n, d, e, k_max, "iqr_batch", None)
           for s in range(shards)]
  inputs = [np.concatenate([p[0][i] for p in parts]) for i in range(3)]
  expected = tuple(np.concatenate([p[1][i] for p in parts]) for i in range(2))
  assert_same(sharded(*map(jnp.asarray, inputs)), expected, seed, f"shard_map {impl}")


# ----------------------------------------------------------------------------- under a mesh

def _data_fsdp_mesh():
  from medcg.train import sharding as shd
  return shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernels_under_mesh_run_per_shard_forward_and_grad(seed, backend):
  # Batch sharded over (data, fsdp) = 8 shards under use_mesh: trim wraps the kernel in shard_map,
  # so iqr_batch pools each shard and the result (and its gradient) is the per-shard reference.
  from medcg.train import sharding as shd
  mesh = _data_fsdp_mesh()
  shards, per_shard, n, d, e, k_max = 8, 2, 16, 8, 4, 6
  parts = [draw(seed + 1000 * s, per_shard, n, d, e, k_max, "iqr_batch", None)
           for s in range(shards)]
  inputs = [np.concatenate([p[0][i] for p in parts]) for i in range(3)]
  expected = tuple(np.concatenate([p[1][i] for p in parts]) for i in range(2))
  weights = np.random.default_rng(seed).normal(size=expected[0].shape).astype(np.float32)
  args = [jax.device_put(x, shd.batch_sharding(mesh, ndim=x.ndim)) for x in inputs]

  def loss(h, emb, text, impl):
    tokens, _ = trim_lib.trim(h, emb, text, k_max=k_max, mode="iqr_batch", impl=impl,
                              interpret=impl != "xla")
    return jnp.sum(tokens * weights[:h.shape[0]])

  impl = f"pallas_{backend}"
  with shd.use_mesh(mesh):
    fwd = jax.jit(functools.partial(trim_lib.trim, k_max=k_max, mode="iqr_batch", impl=impl,
                                    interpret=True))
    # Each result is waited for: TPU interpret mode runs jnp inside io_callbacks on all 8 device
    # threads, and work dispatched from here meanwhile can deadlock with them.
    tokens, count = jax.block_until_ready(fwd(*args))
    grads = jax.block_until_ready(
        jax.jit(jax.grad(functools.partial(loss, impl=impl), argnums=(0, 1, 2)))(*args))
  assert tokens.sharding.spec[0] == ("data", "fsdp"), tokens.sharding
  assert_same((tokens, count), expected, seed, f"{backend} under mesh")
  # Reference gradient: the XLA path on each shard alone.
  want = []
  for s in range(shards):
    rows = slice(s * per_shard, (s + 1) * per_shard)
    w = weights[rows]
    want.append(jax.grad(lambda h, i=rows, w=w: jnp.sum(trim_lib.trim(
        h, jnp.asarray(inputs[1][i]), jnp.asarray(inputs[2][i]), k_max=k_max,
        impl="xla")[0] * w))(jnp.asarray(inputs[0][rows])))
  np.testing.assert_allclose(np.asarray(grads[0]), np.concatenate(want), rtol=1e-6, atol=1e-6,
                             err_msg=f"{backend} grad under mesh, seed={seed}")
  assert not np.any(np.asarray(grads[1])) and not np.any(np.asarray(grads[2])), backend


def test_batch_axes_follow_the_act_batch_rule():
  from medcg.train import sharding as shd
  mesh = _data_fsdp_mesh().abstract_mesh
  assert trim_lib.batch_axes(mesh, 16) == ("data", "fsdp")
  assert trim_lib.batch_axes(mesh, 6) == ("data",)    # fsdp=4 does not divide what data leaves
  assert trim_lib.batch_axes(mesh, 3) == ()
  with shd.use_mesh(_data_fsdp_mesh(), rules=(("act_batch", "fsdp"),) + tuple(shd.RULES)):
    assert trim_lib.batch_axes(mesh, 16) == ("fsdp",)  # the current rules, not the defaults


@pytest.mark.parametrize("platform,expected", [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu"),
                                               ("cpu", "xla")])
def test_auto_follows_the_mesh_platform(platform, expected):
  # The mesh's devices decide, not jax.default_backend() (CPU here): an AOT compile on a CPU
  # host for a TPU / GPU mesh must take that target's kernel.
  device = jax.sharding.AbstractDevice(device_kind=f"fake {platform}", num_cores=1,
                                       platform=platform)
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    assert trim_lib.resolve_impl("auto") == expected
  assert trim_lib.resolve_impl("auto") == "xla"        # no mesh: the default backend (CPU)


def test_every_pallas_call_carries_a_cost_estimate():
  from jax.experimental import pallas as pl
  args = (jnp.zeros((2, 16, 8)), jnp.zeros((2, 16, 4)), jnp.zeros((2, 4)))
  for backend in ("gpu", "tpu"):
    for mode, ratio in MODES:
      fn = functools.partial(trim_lib.trim, k_max=5, mode=mode, ratio=ratio,
                             impl=f"pallas_{backend}", interpret=True)
      jaxpr = jax.make_jaxpr(fn)(*args)
      calls = [eqn for eqn in _eqns(jaxpr.jaxpr) if eqn.primitive.name == "pallas_call"]
      assert calls, (backend, mode)
      costs = []
      for eqn in calls:
        found = [v for v in eqn.params.values() if isinstance(v, pl.CostEstimate)]
        assert found and found[0].flops > 0 and found[0].bytes_accessed > 0, (backend, mode)
        costs.append(found[0])
      # The Mosaic kernels take the softmax (one exp per token); on GPU XLA does.
      assert sum(c.transcendentals for c in costs) == (2 * 16 if backend == "tpu" else 0), costs


def _eqns(jaxpr):
  """Equations of a jaxpr and of the jaxprs its equations call (jit, custom_vjp, shard_map)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      inner = getattr(v, "jaxpr", v)  # a ClosedJaxpr's jaxpr, or a Jaxpr itself
      if hasattr(inner, "eqns"):
        yield from _eqns(inner)
