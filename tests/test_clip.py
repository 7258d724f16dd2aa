"""CLIP towers: parity with transformers' CLIPModel, layer selection, position interpolation, tokenizer."""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
from flax import nnx
from tokenizers import models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from medcg.model import clip, hf

TOL = 1e-4


@pytest.fixture
def rng():
  seed = random.randrange(2**31)
  print(f"seed={seed}")  # shown by pytest on failure
  return np.random.default_rng(seed)


def _hf_clip(eos_token_id=98):
  text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=20, eos_token_id=eos_token_id, bos_token_id=97, pad_token_id=0)
  vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                num_attention_heads=4)
  torch.manual_seed(0)
  return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
  model = _hf_clip()
  path = tmp_path_factory.mktemp("clip")
  model.save_pretrained(path)
  return model, str(path)


def _nchw(x):
  return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def test_vision_parity_layer_minus2_and_projected_patches(clip_ckpt, rng):
  ref, path = clip_ckpt
  vision, _ = clip.load_clip(path)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    out = ref.vision_model(pixel_values=_nchw(images), output_hidden_states=True)
    h2 = out.hidden_states[-2]
    proj = ref.visual_projection(ref.vision_model.post_layernorm(h2)).numpy()
    image_embeds = ref.visual_projection(out.pooler_output).numpy()
    all_hidden = np.stack([h.numpy() for h in out.hidden_states])
  ours = vision(jnp.asarray(images), layer=-2)
  np.testing.assert_allclose(np.asarray(ours), h2.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(vision.project_patches(ours)), proj, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(vision.image_embeds(jnp.asarray(images))), image_embeds, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(vision.all_hidden_states(jnp.asarray(images))), all_hidden, atol=TOL,
                             rtol=0)


@pytest.mark.parametrize("eos_token_id", [98, 2])
def test_text_embeds_parity_both_pooling_rules(tmp_path, rng, eos_token_id):
  # eos 2 is the pre-2023 config value: HF then pools at the argmax id instead of the first eos.
  ref = _hf_clip(eos_token_id)
  ref.save_pretrained(tmp_path)
  _, text = clip.load_clip(str(tmp_path))
  lengths = rng.integers(3, 12, size=3)
  ids = np.zeros((3, 12), np.int64)
  for row, n in enumerate(lengths):
    ids[row, 0] = 97
    ids[row, 1:n - 1] = rng.integers(3, 90, size=n - 2)
    ids[row, n - 1] = 98
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
  with torch.no_grad():
    expected = ref.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  expected = getattr(expected, "pooler_output", expected).numpy()
  ours = text(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)
  # Padding after the end-of-text token does not change the embedding (causal mask): no mask needed.
  np.testing.assert_allclose(np.asarray(text(jnp.asarray(ids))), expected, atol=TOL, rtol=0)


def test_position_interpolation_matches_hf_and_is_sane(clip_ckpt, rng):
  ref, path = clip_ckpt
  vision, _ = clip.load_clip(path)
  images = rng.standard_normal((1, 48, 40, 3)).astype(np.float32)  # 6 x 5 patches instead of 4 x 4
  with torch.no_grad():
    expected = ref.vision_model(pixel_values=_nchw(images), interpolate_pos_encoding=True).last_hidden_state
  np.testing.assert_allclose(np.asarray(vision(jnp.asarray(images))), expected.numpy(), atol=TOL, rtol=0)

  # Native size: untouched. Rows of the resampling matrix sum to one, so a constant field stays constant.
  pos = jnp.asarray(rng.standard_normal((17, 8)), jnp.float32)
  assert clip.interpolate_pos_embed(pos, 4, (4, 4)) is pos
  np.testing.assert_allclose(clip._cubic_weights(4, 7).sum(axis=1), 1.0, atol=1e-12)
  const = jnp.concatenate([pos[:1], jnp.full((16, 8), 3.0)])
  out = clip.interpolate_pos_embed(const, 4, (7, 3))
  assert out.shape == (1 + 21, 8)
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(pos[0]))
  np.testing.assert_allclose(np.asarray(out[1:]), 3.0, atol=1e-5)
  # Up then back down to the native grid lands close to where it started for a smooth field.
  grid = np.linspace(0, 1, 4)
  smooth = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(16, 2)
  smooth = jnp.asarray(np.concatenate([np.zeros((1, 2)), smooth]), jnp.float32)
  up = clip.interpolate_pos_embed(smooth, 4, (8, 8))
  down = clip.interpolate_pos_embed(up, 8, (4, 4))
  np.testing.assert_allclose(np.asarray(down), np.asarray(smooth), atol=0.05)


def test_layer_selection_runs_only_needed_layers(rng):
  cfg = clip.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=8)
  vision = clip.CLIPVisionTower(cfg, rngs=nnx.Rngs(1))
  images = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  layers = (0, 1, 2, 3, -1, -2, -4)

  @jax.jit
  def run(model, x):
    # The last layer is not run for layer -2: its params get no gradient.
    grads = nnx.grad(lambda m: jnp.sum(m(x, layer=-2) ** 2))(model)
    return model.all_hidden_states(x), [model(x, layer=k) for k in layers], grads

  every, selected, grads = run(vision, images)
  assert every.shape == (4, 2, 5, 32)
  for layer, got in zip(layers, selected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(every[layer]), atol=1e-5, rtol=0)
  fc1 = np.asarray(grads.encoder.layers.fc1.kernel[...])
  assert np.abs(fc1[:2]).sum() > 0 and np.abs(fc1[2]).sum() == 0
  with pytest.raises(ValueError, match="out of range"):
    vision(images, layer=4)


def test_remat_policy_same_values_and_grads(rng):
  base = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, projection_dim=8)
  images = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  loss = lambda m: jnp.sum(m.image_embeds(images) ** 2)
  plain = clip.CLIPVisionTower(clip.CLIPVisionConfig(**base), rngs=nnx.Rngs(3))
  remat = clip.CLIPVisionTower(clip.CLIPVisionConfig(**base, remat="full"), rngs=nnx.Rngs(3))
  g1, g2 = jax.jit(lambda a, b: (nnx.grad(loss)(a), nnx.grad(loss)(b)))(plain, remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  with pytest.raises(ValueError, match="remat"):
    clip.CLIPVisionTower(clip.CLIPVisionConfig(**base, remat="sometimes"), rngs=nnx.Rngs(0))


def test_params_carry_logical_axes():
  cfg = clip.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=8)
  state = nnx.state(nnx.eval_shape(lambda: clip.CLIPVisionTower(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.get_value().ndim, (path, names)
  q = state["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert tuple(q.get_metadata()["out_sharding"]) == ("layers", "embed", "heads", "head_dim")
  assert q.get_value().shape == (2, 32, 4, 8)


def test_configs_reject_unknown_keys():
  with pytest.raises(ValueError, match=r"model.vision: unknown key\(s\) \['hidden'\]"):
    clip.CLIPVisionConfig.from_dict({"hidden": 3})
  with pytest.raises(ValueError, match="hidden_act"):
    clip.activation("swish")


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
  """A tiny CLIP-style BPE: byte-level pieces, <|startoftext|> ... <|endoftext|> around every text."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<|endoftext|>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["a chest x-ray of the lung", "is there a fracture in this knee mri"] * 10, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>",
      special_tokens=[("<|startoftext|>", tok.token_to_id("<|startoftext|>")),
                      ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
  path = tmp_path_factory.mktemp("cliptok")
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
  return path


def test_tokenizer_truncates_pads_and_matches_transformers(clip_tokenizer_dir):
  tok = clip.CLIPTokenizer(str(clip_tokenizer_dir))
  texts = ["is there a fracture", "a chest x-ray of the lung " * 40]
  ids, mask = tok(texts)
  assert ids.shape == mask.shape == (2, 77) and ids.dtype == np.int32
  ref = PreTrainedTokenizerFast(tokenizer_file=str(clip_tokenizer_dir / "tokenizer.json"),
                                pad_token="<|endoftext|>")
  expected = ref(texts, padding="max_length", truncation=True, max_length=77)
  np.testing.assert_array_equal(ids, expected["input_ids"])
  np.testing.assert_array_equal(mask, expected["attention_mask"])
  assert mask[1].all() and ids[1, -1] == tok.eos_id          # truncated text still ends with end-of-text
  n = mask[0].sum()
  assert ids[0, n - 1] == tok.eos_id and (ids[0, n:] == tok.pad_id).all()


def test_tokenizer_errors(tmp_path, clip_tokenizer_dir):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    clip.CLIPTokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="cannot parse"):
    clip.CLIPTokenizer(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="pad token '<pad>'"):
    clip.CLIPTokenizer(str(clip_tokenizer_dir), pad_token="<pad>")


def test_import_rejects_other_architectures(clip_ckpt, tmp_path):
  _, path = clip_ckpt
  config = json.loads(open(f"{path}/config.json").read())
  config["architectures"] = ["SiglipModel"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  import shutil
  shutil.copy(f"{path}/model.safetensors", tmp_path / "model.safetensors")
  with pytest.raises(hf.CheckpointError, match="unsupported architecture 'SiglipModel'.*CLIPModel"):
    clip.load_clip(str(tmp_path))
