"""VLM glue: splicing image features, mixed prompt lengths, TRIM slots, loss, presets, FLOPs, sharding."""
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import models
from medcg.model import vlm as vlm_lib
from medcg.train import sharding as shd

IMG = 259  # ByteTokenizer image placeholder id (the tiny preset's image_token_id)


@pytest.fixture
def rng():
  seed = random.randrange(2**31)
  print(f"seed={seed}")
  return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def tiny():
  cfg = models.get("tiny")
  return cfg, nnx.jit(lambda: vlm_lib.VLM(cfg, rngs=nnx.Rngs(0)))()


def _prompt(rng, before: int, after: int, n_img: int, length: int):
  """[bos] before-bytes <image>*n after-bytes, right-padded to `length`."""
  ids = [257, *rng.integers(32, 127, before), *([IMG] * n_img), *rng.integers(32, 127, after)]
  mask = [1] * len(ids) + [0] * (length - len(ids))
  return ids + [256] * (length - len(ids)), mask


def _batch(rng, shapes, n_img, length):
  rows = [_prompt(rng, b, a, n_img, length) for b, a in shapes]
  return (jnp.asarray([r[0] for r in rows], jnp.int32), jnp.asarray([r[1] for r in rows], jnp.int32))


def test_tiny_preset_shapes_and_splice_order(tiny, rng):
  cfg, model = tiny
  n = vlm_lib.num_image_tokens(cfg)
  assert n == model.num_image_tokens == 16  # 32 px / patch 8, class token dropped
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids, mask = _batch(rng, [(2, 5), (7, 1)], n, 32)  # the image sits at different offsets
  embeds, new_mask = jax.jit(lambda m, *a: m.embed_inputs(*a))(model, images, ids, mask)
  feats, slot_mask = model.image_features(images)
  assert slot_mask is None and feats.shape == (2, n, cfg.llm.hidden_size)
  text = model.llm.embed(jnp.where(ids == IMG, 0, ids))
  for row in range(2):
    where = np.flatnonzero(np.asarray(ids[row]) == IMG)
    np.testing.assert_allclose(embeds[row, where], feats[row], atol=1e-5)  # k-th slot -> k-th placeholder
    other = np.flatnonzero(np.asarray(ids[row]) != IMG)
    np.testing.assert_allclose(embeds[row, other], text[row, other], atol=1e-6)
  np.testing.assert_array_equal(new_mask, mask)
  logits = jax.jit(lambda m, *a: m(*a))(model, images, ids, mask)
  assert logits.shape == (2, 32, cfg.llm.vocab_size) and logits.dtype == jnp.float32


def test_batch_of_different_lengths_equals_rows_alone(tiny, rng):
  cfg, model = tiny
  n = model.num_image_tokens
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids, mask = _batch(rng, [(1, 3), (6, 8)], n, 40)
  forward = jax.jit(lambda m, *a: m(*a))
  batched = forward(model, images, ids, mask)
  for row in range(2):
    real = int(mask[row].sum())
    alone = forward(model, images[row:row + 1], ids[row:row + 1, :real], mask[row:row + 1, :real])
    np.testing.assert_allclose(batched[row, :real], alone[0], atol=2e-4, rtol=1e-4)


def test_score_options_runs_the_vision_tower_once_per_example(tiny, rng, monkeypatch):
  """Option scoring equals the full forward on prompt + option, with the image encoded for B rows, not B * O."""
  cfg, model = tiny
  n = model.num_image_tokens
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids, mask = _batch(rng, [(2, 4), (5, 1)], n, 30)
  options = jnp.asarray(rng.integers(32, 127, (2, 3, 4)), jnp.int32)
  option_mask = jnp.asarray([[[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 0], [0] * 4, [1, 1, 1, 1]]],
                            jnp.int32)
  seen = []
  real_features = vlm_lib.VLM.image_features
  monkeypatch.setattr(vlm_lib.VLM, "image_features", lambda self, x, t=None: seen.append(x.shape[0])
                      or real_features(self, x, t))
  total, mean = vlm_lib.score_options(model, images, ids, mask, options, option_mask)
  assert seen == [2], f"the vision tower saw batches of {seen}"
  for b in range(2):
    real = int(mask[b].sum())
    for o in range(3):
      opt = np.asarray(options[b, o])[np.asarray(option_mask[b, o]) == 1]
      if not opt.size:
        assert float(total[b, o]) == 0.0
        continue
      full = jnp.asarray(np.concatenate([np.asarray(ids[b, :real]), opt])[None], jnp.int32)
      logp = jax.nn.log_softmax(model(images[b:b + 1], full, jnp.ones_like(full))[0], -1)
      expected = sum(float(logp[real - 1 + j, t]) for j, t in enumerate(opt))
      np.testing.assert_allclose(float(total[b, o]), expected, atol=2e-4, rtol=1e-4)
      np.testing.assert_allclose(float(mean[b, o]), expected / len(opt), atol=2e-4, rtol=1e-4)


def test_placeholder_count_is_checked(tiny, rng):
  _, model = tiny
  images = jnp.zeros((1, 32, 32, 3))
  ids, mask = _batch(rng, [(2, 2)], 15, 24)
  with pytest.raises(ValueError, match=r"rows \[0\] hold \[15\] image placeholders.*exactly 16"):
    model(images, ids, mask)


def _trim_cfg(**kw):
  return ml_collections.ConfigDict({**dict(enabled=True, k_max=6, mode="ratio", ratio=0.25, impl="xla"), **kw})


def test_trim_masks_unused_slots_like_a_compacted_sequence(rng):
  cfg, trim = models.get("tiny"), _trim_cfg()
  model = nnx.jit(lambda: vlm_lib.VLM(cfg, rngs=nnx.Rngs(1), trim=trim))()
  assert model.num_image_tokens == vlm_lib.num_image_tokens(cfg, trim) == 7
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids, mask = _batch(rng, [(3, 4), (5, 2)], 7, 20)
  text_ids = jnp.asarray([[257, *b"is it normal", 258] + [256] * 4] * 2, jnp.int32)

  @jax.jit
  def run(m, images, ids, mask, text_ids):
    embeds, eff_mask = m.embed_inputs(images, ids, mask, text_ids)
    return m(images, ids, mask, text_ids), embeds, eff_mask

  logits, embeds, eff_mask = run(model, images, ids, mask, text_ids)
  # ratio 0.25 of 16 patches keeps 4 tokens + the mean token: 5 of the 7 slots are used.
  img_pos = np.asarray(ids) == IMG
  np.testing.assert_array_equal(np.asarray(eff_mask)[img_pos].reshape(2, 7).sum(1), [5, 5])
  np.testing.assert_array_equal(np.asarray(eff_mask)[~img_pos], np.asarray(mask)[~img_pos])
  decoder = jax.jit(lambda m, e: m.llm(inputs_embeds=e)[0])
  for row in range(2):
    keep = np.flatnonzero(np.asarray(eff_mask[row]))
    compact = decoder(model, embeds[row:row + 1, keep])
    np.testing.assert_allclose(logits[row, keep], compact[0], atol=2e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="text_ids"):
    model(images, ids, mask)


def test_trim_config_errors():
  with pytest.raises(ValueError, match="k_max=99"):
    vlm_lib.validate_config(models.get("tiny"), ml_collections.ConfigDict(dict(enabled=True, k_max=99)))
  no_text = models.get("tiny")
  no_text.text = None
  with pytest.raises(ValueError, match="model.text"):
    vlm_lib.validate_config(no_text, _trim_cfg())
  bad_layer = models.get("tiny")
  bad_layer.vision_select_layer = 9
  with pytest.raises(ValueError, match="vision_select_layer=9"):
    vlm_lib.validate_config(bad_layer)


def test_answer_loss_counts_only_answer_tokens(rng):
  logits = jnp.asarray(rng.standard_normal((2, 6, 10)), jnp.float32)
  ids = jnp.asarray([[1, 2, 99, 3, 4, 5], [1, 99, 7, 8, 0, 0]], jnp.int32)  # 99: placeholder past the vocab
  loss_mask = jnp.asarray([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0]], jnp.float32)
  loss, stats = vlm_lib.answer_loss(logits, ids, loss_mask)
  logp = jax.nn.log_softmax(logits, -1)
  expected = -(logp[0, 3, 4] + logp[0, 4, 5] + logp[1, 2, 8]) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(stats["tokens"]) == 3 and np.isfinite(float(loss))


def test_tiny_preset_trains(tiny, rng):
  cfg, model = tiny
  model = nnx.clone(model)
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids, mask = _batch(rng, [(2, 6), (4, 3)], 16, 32)
  loss_mask = (mask * (jnp.arange(32)[None] >= 22)).astype(jnp.float32)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return vlm_lib.answer_loss(m(images, ids, mask), ids, loss_mask)[0]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(8)]
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name,low,high", [("llava-1.5-7b", 7.0e9, 7.1e9), ("llava-1.5-13b", 13.3e9, 13.4e9),
                                           ("bench-1b", 1.40e9, 1.45e9), ("tiny", 5e5, 5e6)])
def test_presets_random_init_shapes(name, low, high):
  cfg = models.get(name)
  abstract = nnx.eval_shape(lambda: vlm_lib.VLM(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert low < count < high, count
  if name != "tiny":
    assert abstract.num_image_tokens == 576
    q = abstract.vision.encoder.layers.self_attn.q_proj.kernel
    assert q.get_value().shape == (24, 1024, 16, 64)
    assert abstract.llm.embed.embedding.get_value().dtype == jnp.float32  # f32 master weights
    assert cfg.llm.dtype == "bfloat16"
  with_trim = nnx.eval_shape(lambda: vlm_lib.VLM(cfg, rngs=nnx.Rngs(0), trim=_trim_cfg(k_max=8)))
  assert with_trim.text is not None and with_trim.num_image_tokens == 9


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown model preset 'llava-2'.*bench-1b"):
    models.get("llava-2")
  assert models.get("tiny", dtype="bfloat16").vision.dtype == "bfloat16"


def test_model_flops():
  cfg = models.get("bench-1b")
  fwd = vlm_lib.model_flops(cfg, 1024)
  train = vlm_lib.model_flops(cfg, 1024, training=True)
  train_all = vlm_lib.model_flops(cfg, 1024, training=True, train_vision=True)
  # Roughly 2 FLOPs per param per token for the decoder, plus a 23-of-24-layer ViT-L over 577 tokens.
  llm_params = 1.1e9 - 32000 * 2048
  assert 2 * llm_params * 1024 < fwd < 2.2 * (llm_params * 1024 + 0.3e9 * 577)
  vision = fwd - 1024 * vlm_lib.llm_lib.model_flops_per_token(cfg.llm, 1024) - 2 * 576 * (1024 + 2048) * 2048
  assert train == pytest.approx(3 * fwd - 2 * vision, rel=1e-9)        # frozen tower: forward only
  assert train_all == pytest.approx(3 * fwd, rel=1e-9)
  # TRIM: the projector sees 129 slots instead of 576; CLIP's text tower and per-patch projection are added.
  trimmed = vlm_lib.model_flops(cfg, 1024, trim=_trim_cfg(k_max=128))
  text = vlm_lib._encoder_flops(77, 12, 768, 3072, causal=True) + 2 * 768 * 768 + 2 * 576 * 1024 * 768
  assert trimmed == pytest.approx(fwd - 2 * (576 - 129) * (1024 + 2048) * 2048 + text, rel=1e-9)


def test_params_shard_on_a_mesh_and_forward_matches(tiny, rng):
  cfg, model = tiny
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(model)
  shardings = shd.param_shardings(state, mesh)
  specs = shd.describe(shardings)
  # (layers, embed, heads, head_dim): embed over fsdp, heads over tensor.
  assert specs["vision/encoder/layers/self_attn/q_proj/kernel"] == str(jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None))
  assert specs["projector/linear_1/kernel"] == str(jax.sharding.PartitionSpec("fsdp", "tensor"))
  images = jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32)
  ids, mask = _batch(rng, [(2, 3)] * 4, 16, 24)
  expected = jax.jit(lambda m, *a: m(*a))(model, images, ids, mask)
  with shd.use_mesh(mesh):
    placed = jax.device_put(state, shardings)
    got = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(placed, images, ids, mask)
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def test_bf16_compute_with_f32_params_tracks_f32(tiny, rng):
  cfg, model = tiny
  bf16 = models.get("tiny", dtype="bfloat16")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: vlm_lib.VLM(bf16, rngs=nnx.Rngs(0))))
  model_bf16 = nnx.merge(graphdef, nnx.state(model))  # same float32 master weights
  assert model_bf16.llm.embed.embedding[...].dtype == jnp.float32
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids, mask = _batch(rng, [(2, 5), (4, 3)], 16, 28)
  forward = jax.jit(lambda m, *a: m(*a))
  ref, low = forward(model, images, ids, mask), forward(model_bf16, images, ids, mask)
  assert low.dtype == jnp.float32  # logits come back in float32 for the loss
  err = float(jnp.max(jnp.abs(low - ref)) / jnp.max(jnp.abs(ref)))
  assert 0 < err < 0.05, err
