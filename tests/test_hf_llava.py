"""HF LlavaForConditionalGeneration import: logits and greedy generation parity, layouts, TRIM weights, errors."""
import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from medcg.model import clip, hf, llm
from medcg.model import vlm as vlm_lib
from medcg.train import sharding as shd

IMG, VOCAB, N_IMG = 110, 120, 16
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
              num_attention_heads=4)
TOL = 1e-4


@pytest.fixture
def rng():
  seed = int(os.environ.get("MEDCG_TEST_SEED", random.randrange(2**31)))
  print(f"seed={seed}")
  return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
  cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION), text_config=text,
                                 image_token_index=IMG, image_seq_length=N_IMG)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  path = tmp_path_factory.mktemp("llava")
  model.save_pretrained(path, safe_serialization=True)
  return model, str(path), vlm_lib.load_hf(str(path))


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
  """A CLIPModel whose vision tower has the LLaVA tower's shapes (TRIM takes text tower + projection from it)."""
  text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=20, eos_token_id=98, bos_token_id=97, pad_token_id=0)
  torch.manual_seed(1)
  model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION,
                                                         projection_dim=16)).eval()
  path = tmp_path_factory.mktemp("clip")
  model.save_pretrained(path, safe_serialization=True)
  return model, str(path)


def _prompts(rng, shapes, length, left=False):
  """Rows `[bos] text <image>*16 text` padded (right, or left) to `length`; returns ids, mask (int64)."""
  ids = np.zeros((len(shapes), length), np.int64)
  mask = np.zeros_like(ids)
  for row, (before, after) in enumerate(shapes):
    toks = [1, *rng.integers(3, 100, before), *[IMG] * N_IMG, *rng.integers(3, 100, after)]
    sl = slice(length - len(toks), length) if left else slice(0, len(toks))
    ids[row, sl], mask[row, sl] = toks, 1
  return ids, mask


def _nchw(images):
  return torch.tensor(images.transpose(0, 3, 1, 2))


def test_logits_match_transformers_for_prompts_of_different_lengths(llava, rng):
  ref, _, model = llava
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids, mask = _prompts(rng, [(2, 6), (5, 1)], 26)
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids), pixel_values=_nchw(images),
                   attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(jax.jit(lambda m, *a: m(*a))(model, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  diff = np.abs(ours[real] - expected[real]).max()
  assert diff <= TOL, f"max abs logit diff {diff}"


def test_greedy_generation_matches_transformers(llava, rng):
  ref, _, model = llava
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  left_ids, left_mask = _prompts(rng, [(1, 4), (3, 7)], 28, left=True)  # transformers generates left-padded
  # Both stop at eos (id 2, which a random model may well pick) and pad with 0 after it.
  with torch.no_grad():
    out = ref.generate(input_ids=torch.tensor(left_ids), attention_mask=torch.tensor(left_mask),
                       pixel_values=_nchw(images), max_new_tokens=16, do_sample=False, pad_token_id=0,
                       eos_token_id=2)
  expected = out[:, left_ids.shape[1]:].numpy()
  expected = np.pad(expected, ((0, 0), (0, 16 - expected.shape[1])))  # HF stops early when every row ended
  expected_len = [int(np.argmax(r == 2)) + 1 if (r == 2).any() else 16 for r in expected]
  # Ours takes the pipeline's right padding and converts.
  right_ids = np.zeros_like(left_ids)
  right_mask = np.zeros_like(left_mask)
  for row in range(2):
    real = left_ids[row][left_mask[row] == 1]
    right_ids[row, :len(real)], right_mask[row, :len(real)] = real, 1
  tokens, lengths = vlm_lib.generate(model, images, right_ids, right_mask, max_new_tokens=16, eos_ids=(2,),
                                     pad_id=0)
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  np.testing.assert_array_equal(np.asarray(lengths), expected_len)


def test_option_scores_match_transformers_log_probs(llava, rng):
  ref, _, model = llava
  images = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)
  ids, mask = _prompts(rng, [(2, 3)], 22)
  options = np.asarray([[[5, 6, 7], [8, 9, 0]]])
  option_mask = np.asarray([[[1, 1, 1], [1, 1, 0]]])
  total, mean = vlm_lib.score_options(model, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask),
                                      jnp.asarray(options), jnp.asarray(option_mask))
  for o in range(2):
    opt = options[0, o][option_mask[0, o] == 1]
    full = np.concatenate([ids[0], opt])[None]
    with torch.no_grad():
      logits = ref(input_ids=torch.tensor(full), pixel_values=_nchw(images)).logits[0]
    logp = torch.log_softmax(logits, -1).numpy()
    expected = sum(logp[len(ids[0]) - 1 + j, t] for j, t in enumerate(opt))
    np.testing.assert_allclose(float(total[0, o]), expected, atol=1e-3)
    np.testing.assert_allclose(float(mean[0, o]), expected / len(opt), atol=1e-3)


def _relayout(src: str, dst: str, rename) -> str:
  os.makedirs(dst, exist_ok=True)
  shutil.copy(os.path.join(src, "config.json"), dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  save_file({rename(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
  return dst


def _hub_layout(k):       # llava-hf on the Hub (transformers < 4.52)
  return k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k


def _v452_layout(k):      # transformers 4.52 - 4.x save_pretrained
  if k.startswith("vision_tower."):
    return "model.vision_tower.vision_model." + k[len("vision_tower."):]
  if k.startswith("multi_modal_projector."):
    return "model." + k
  if k.startswith("language_model.model."):
    return "model.language_model." + k[len("language_model.model."):]
  return k.replace("language_model.lm_head.", "lm_head.")


@pytest.mark.parametrize("rename", [_hub_layout, _v452_layout], ids=["hub", "transformers-4.52"])
def test_other_checkpoint_layouts_load_identically(llava, tmp_path, rng, rename):
  _, path, model = llava
  other = vlm_lib.load_hf(_relayout(path, str(tmp_path / "x"), rename))
  images = jnp.asarray(rng.standard_normal((1, 32, 32, 3)), jnp.float32)
  ids, mask = _prompts(rng, [(2, 2)], 21)
  np.testing.assert_array_equal(np.asarray(other(images, jnp.asarray(ids), jnp.asarray(mask))),
                                np.asarray(model(images, jnp.asarray(ids), jnp.asarray(mask))))


def test_trim_takes_text_tower_and_projection_from_clip(llava, clip_path, rng):
  _, path, _ = llava
  clip_ref, cpath = clip_path
  trim = ml_collections.ConfigDict(dict(enabled=True, k_max=6, mode="iqr_batch", impl="xla"))
  with pytest.raises(ValueError, match="clip_path"):
    vlm_lib.load_llava(path, trim=trim)
  model = vlm_lib.load_llava(path, clip_path=cpath, trim=trim)
  assert model.num_image_tokens == 7
  np.testing.assert_array_equal(np.asarray(model.vision.visual_projection.kernel[...]),
                                clip_ref.visual_projection.weight.detach().numpy().T)
  text_ids = np.asarray([[97, 5, 6, 98, 0], [97, 7, 8, 9, 98]])
  with torch.no_grad():
    expected = clip_ref.get_text_features(input_ids=torch.tensor(text_ids))
  expected = getattr(expected, "pooler_output", expected).numpy()
  np.testing.assert_allclose(np.asarray(model.text(jnp.asarray(text_ids))), expected, atol=TOL)
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids = np.asarray([[1, 4, *[IMG] * 7, 5, 6], [1, *[IMG] * 7, 9, 8, 7]])
  logits = jax.jit(lambda m, *a: m(*a))(model, images, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
                                        jnp.asarray(text_ids))
  assert logits.shape == (2, 11, VOCAB) and np.isfinite(np.asarray(logits)).all()
  # Without TRIM the CLIP checkpoint still supplies visual_projection (for scoring patches) and nothing else.
  plain = vlm_lib.load_llava(path, clip_path=cpath)
  assert plain.text is None and plain.vision.visual_projection is not None


def test_load_hf_dispatches_by_architecture(llava, clip_path, tmp_path):
  _, cpath = clip_path
  vision, text = vlm_lib.load_hf(cpath)
  assert isinstance(vision, clip.CLIPVisionTower) and isinstance(text, clip.CLIPTextTower)
  torch.manual_seed(0)
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
  lm.save_pretrained(tmp_path / "llama", safe_serialization=True)
  assert isinstance(vlm_lib.load_hf(str(tmp_path / "llama")), llm.LLM)
  _, path, _ = llava
  config = json.load(open(os.path.join(path, "config.json")))
  config["architectures"] = ["Blip2ForConditionalGeneration"]
  bad = tmp_path / "blip"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(config))
  shutil.copy(os.path.join(path, "model.safetensors"), bad)
  with pytest.raises(hf.CheckpointError, match="unsupported architecture 'Blip2ForConditionalGeneration'; "
                                               "supported: LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration, "
                                                 "Qwen2_5_VLForConditionalGeneration, CLIPModel, "
                                               "LlamaForCausalLM, Qwen2ForCausalLM"):
    vlm_lib.load_hf(str(bad))


def _edited(path: str, dst, edit) -> str:
  os.makedirs(dst, exist_ok=True)
  shutil.copy(os.path.join(path, "config.json"), dst)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_bad_checkpoints_fail_with_clear_messages(llava, tmp_path):
  _, path, _ = llava
  proj = "multi_modal_projector.linear_2.weight"
  missing = _edited(path, tmp_path / "missing", lambda t: t.pop(proj))
  with pytest.raises(hf.CheckpointError, match=r"missing HF tensors \(1\): " + proj.replace(".", r"\.")):
    vlm_lib.load_hf(missing)

  def reshape(t):
    t["multi_modal_projector.linear_1.weight"] = np.zeros((64, 30), np.float32)
  wrong = _edited(path, tmp_path / "wrong", reshape)
  with pytest.raises(hf.CheckpointError, match=r"(?s)shape mismatches.*multi_modal_projector\.linear_1\.weight"):
    vlm_lib.load_hf(wrong)

  extra = _edited(path, tmp_path / "extra", lambda t: t.update({"language_model.model.extra.weight": t[proj]}))
  with pytest.raises(hf.CheckpointError, match=r"unexpected HF tensors \(1\): language_model\.model\.extra"):
    vlm_lib.load_hf(extra)

  with pytest.raises(TypeError, match=r"unknown override\(s\) \['remat_policy'\]"):
    vlm_lib.load_hf(path, remat_policy="full")

  pickles = tmp_path / "pickle"
  pickles.mkdir()
  shutil.copy(os.path.join(path, "config.json"), pickles)
  (pickles / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(hf.CheckpointError, match="only pickle weights.*never unpickles"):
    vlm_lib.load_hf(str(pickles))

  config = json.load(open(os.path.join(path, "config.json")))
  config["text_config"]["model_type"] = "mistral"
  config["text_config"].pop("architectures", None)
  odd = tmp_path / "mistral"
  odd.mkdir()
  (odd / "config.json").write_text(json.dumps(config))
  shutil.copy(os.path.join(path, "model.safetensors"), odd)
  with pytest.raises(hf.CheckpointError, match="language model type 'mistral' is not supported"):
    vlm_lib.load_hf(str(odd))


def test_sharded_load_reads_slices_and_matches(llava, rng):
  _, path, model = llava
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = vlm_lib.load_hf(path, mesh=mesh)
  q = sharded.llm.layers.attn.q.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len({s.data.shape for s in q.addressable_shards}) == 1 and q.addressable_shards[0].data.shape[1] == 32
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids, mask = _prompts(rng, [(2, 2), (3, 1)], 21)
  forward = jax.jit(lambda m, *a: m(*a))
  with shd.use_mesh(mesh):
    got = forward(sharded, images, jnp.asarray(ids), jnp.asarray(mask))
  expected = forward(model, images, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
