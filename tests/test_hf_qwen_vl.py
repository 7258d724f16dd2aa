"""HF Qwen2-VL / Qwen2.5-VL import: parity with transformers (PyTorch, CPU, float32) on tiny random checkpoints.

Preprocessing, merged vision features, M-RoPE ids, logits, greedy generation (alone and batched with padding on
either side), sharded checkpoints, refused checkpoints, and no torch / transformers under medcg/.
The reference side lives in tests/qwen_hf_reference.py (the only place that runs transformers).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from medcg.data import pipeline
from medcg.model import hf, mrope, qwen_vl
from medcg.model import vlm as vlm_lib

from tests import qwen_hf_reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(3, 5), (6, 2)]  # text ids before / after the image, per example
TOL = 1e-4


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module", params=R.FAMILIES)
def family(request):
  return request.param


@pytest.fixture(scope="module")
def ckpt(family, tmp_path_factory):
  return R.make_checkpoint(tmp_path_factory.mktemp(family), family, seed=0)


@pytest.fixture(scope="module")
def images_uint8():
  return R.random_images(len(SHAPES), seed=1)


@pytest.fixture(scope="module")
def rows():
  return R.prompt_rows(SHAPES, seed=2)


@pytest.fixture(scope="module")
def ref(ckpt, family, images_uint8, rows):
  return R.reference(ckpt, family, images_uint8, rows)


@pytest.fixture(scope="module")
def model(ckpt):
  return vlm_lib.load_hf(ckpt, image_size=R.IMAGE_SIDE)


# ------------------------------------------------------------------------------------------------------ setup

def test_reference_is_not_degenerate(ref, family, ckpt):
  """The tiny models' attention is far from uniform, and (Qwen2.5-VL) window attention changes the features."""
  print(f"{family}: text attention max prob {float(ref['attention_max_prob']):.3f}; "
        f"min greedy margin {ref['greedy_margin'].min():.2e}")
  assert ref["attention_max_prob"] > 0.3
  assert ref["merged"].std() > 0.1 and ref["logits"].std() > 0.1
  if family == "qwen2_5_vl":
    full = R.merged_full_attention(ckpt, family, ref["pixel_values"], ref["image_grid_thw"])
    diff = _max_diff(full, ref["merged"])
    print(f"window vs full attention: merged features differ by {diff:.3g}")
    assert diff > 1000 * TOL


def test_loaded_config(model, family):
  assert isinstance(model, qwen_vl.QwenVLM)
  assert model.cfg.vision.image_size == R.IMAGE_SIDE
  assert model.cfg.generation == family
  assert model.image_token_id == R.IMAGE_TOKEN_ID
  assert model.num_image_tokens == R.NUM_IMAGE_TOKENS
  assert list(model.cfg.llm.mrope_section) == R.MROPE_SECTION
  assert model.cfg.vision_start_token_id == R.VISION_START_ID and model.cfg.vision_end_token_id == R.VISION_END_ID


# ------------------------------------------------------------------------------------------------------ parity

def test_preprocessing_matches_the_hf_image_processor(ref, images_uint8):
  ours = pipeline.normalize_images(list(images_uint8))
  assert ours.dtype == np.float32 and ours.shape == images_uint8.shape
  diff = _max_diff(ours, ref["normalized"])
  patch_diff = _max_diff(R.hf_patchify(ours), ref["pixel_values"])
  print(f"normalised images: max diff {diff:.2e}; pixel_values (HF-patchified medcg images): {patch_diff:.2e}")
  assert diff <= 1e-5 and patch_diff <= 1e-5


def test_merged_features_match(model, ref):
  feats, slot_mask = model.image_features(jnp.asarray(ref["normalized"]))
  assert slot_mask is None
  assert feats.shape == ref["merged"].shape == (len(SHAPES), R.NUM_IMAGE_TOKENS, R.HIDDEN)
  scale = max(1.0, float(np.abs(ref["merged"]).max()))
  diff = _max_diff(feats, ref["merged"])
  print(f"merged features: max diff {diff:.2e} (max |value| {scale:.2f})")
  assert diff <= TOL * scale


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_rope_index_matches_get_rope_index(ref, ckpt, family, rows, left):
  ids, mask = R.pad_rows(rows, left=left, length=max(map(len, rows)) + 3)
  expected = R.rope_index(ckpt, family, ids, mask)
  if not left:
    real = ref["attention_mask"].astype(bool)
    np.testing.assert_array_equal(expected[:, :, :real.shape[1]][:, real], ref["rope_index"][:, real])
  got = np.asarray(mrope.rope_index(jnp.asarray(ids), jnp.asarray(mask), image_token_id=R.IMAGE_TOKEN_ID,
                                    grid=(R.GRID, R.GRID)))
  assert got.shape == (3, *ids.shape)
  real = mask.astype(bool)
  np.testing.assert_array_equal(got[:, real], expected[:, real])


def test_logits_match_on_real_positions(model, ref):
  logits = np.asarray(model(jnp.asarray(ref["normalized"]), jnp.asarray(ref["input_ids"]),
                            jnp.asarray(ref["attention_mask"])))
  assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
  real = ref["attention_mask"].astype(bool)
  diff = _max_diff(logits[real], ref["logits"][real])
  print(f"logits: max diff {diff:.2e} on {real.sum()} real positions (max |logit| "
        f"{np.abs(ref['logits'][real]).max():.2f})")
  assert diff <= TOL


def _generate(model, images, rows, left=None):
  if left is None:  # one example, unpadded
    ids, mask = R.pad_rows(rows)
  else:
    ids, mask = R.pad_rows(rows, left=left, length=max(map(len, rows)) + 2)
  tokens, lengths = vlm_lib.generate(model, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask),
                                     max_new_tokens=R.NEW_TOKENS, eos_ids=())
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  assert tokens.shape == (len(rows), R.NEW_TOKENS)
  np.testing.assert_array_equal(lengths, R.NEW_TOKENS)
  return tokens


def _explain(got, expected, margin) -> str:
  bad = np.flatnonzero(got != expected)
  if not bad.size:
    return ""
  step = int(bad[0])
  return (f"first divergence at step {step}: medcg {got[step]} vs HF {expected[step]} "
          f"(HF top-1 minus top-2 logit there: {margin[step]:.2e})\nmedcg {got.tolist()}\nHF    {expected.tolist()}")


@pytest.fixture(scope="module")
def greedy_alone(model, ref, rows):
  return np.concatenate([_generate(model, ref["normalized"][i:i + 1], [row]) for i, row in enumerate(rows)])


def test_greedy_matches_transformers(greedy_alone, ref):
  for i in range(len(SHAPES)):
    assert np.array_equal(greedy_alone[i], ref["greedy"][i]), _explain(greedy_alone[i], ref["greedy"][i],
                                                                       ref["greedy_margin"][i])


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_batched_greedy_with_padding_matches_unbatched(model, ref, rows, greedy_alone, left):
  tokens = _generate(model, ref["normalized"], rows, left=left)
  for i in range(len(SHAPES)):
    assert np.array_equal(tokens[i], greedy_alone[i]), _explain(tokens[i], greedy_alone[i], ref["greedy_margin"][i])


# ------------------------------------------------------------------------------------------------ checkpoints

def _params(model):
  from flax import nnx
  return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_sharded_checkpoint_gives_the_same_model(model, family, ref, tmp_path_factory):
  path = R.make_checkpoint(tmp_path_factory.mktemp(f"{family}-sharded"), family, seed=0, sharded=True)
  sharded = vlm_lib.load_hf(path, image_size=R.IMAGE_SIDE)
  ours, theirs = _params(model), _params(sharded)
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)
  args = [jnp.asarray(ref[k]) for k in ("normalized", "input_ids", "attention_mask")]
  np.testing.assert_array_equal(np.asarray(sharded(*args)), np.asarray(model(*args)))


@pytest.fixture
def broken(ckpt, tmp_path):
  """A writable copy of the checkpoint."""
  path = str(tmp_path / "ckpt")
  shutil.copytree(ckpt, path)
  return path


def _edit_config(path, edit):
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  edit(cfg)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


def _load_error(path) -> str:
  with pytest.raises((hf.CheckpointError, ValueError)) as info:
    vlm_lib.load_hf(path, image_size=R.IMAGE_SIDE)
  print(f"{type(info.value).__name__}: {info.value}")
  return str(info.value)


def test_missing_merger_tensor_is_named(broken):
  file = os.path.join(broken, "model.safetensors")
  tensors = load_file(file)
  (name,) = [k for k in tensors if k.endswith("merger.mlp.0.weight")]
  del tensors[name]
  save_file(tensors, file, metadata={"format": "pt"})
  assert name in _load_error(broken)


def test_wrong_mrope_section_is_refused(broken):
  def edit(cfg):
    rope = cfg["text_config"]["rope_parameters"]
    assert rope["mrope_section"] == R.MROPE_SECTION
    rope["mrope_section"] = [2, 3, 4]  # sums to 9 != head_dim / 2 = 8
  _edit_config(broken, edit)
  assert "mrope_section" in _load_error(broken)


def test_unsupported_architecture_is_named(broken):
  def edit(cfg):
    cfg["architectures"] = ["Qwen3VLForConditionalGeneration"]
    cfg["model_type"] = "qwen3_vl"
  _edit_config(broken, edit)
  message = _load_error(broken)
  for name in ("Qwen3VLForConditionalGeneration", *R.ARCHITECTURES.values()):
    assert name in message
  with pytest.raises((hf.CheckpointError, ValueError), match="Qwen3VLForConditionalGeneration"):
    qwen_vl.load_qwen_vl(broken, image_size=R.IMAGE_SIDE)


def test_pickle_only_checkpoint_is_refused(ckpt, family, tmp_path):
  path = str(tmp_path / "pickle")
  os.makedirs(path)
  shutil.copy(os.path.join(ckpt, "config.json"), path)
  torch.save({k: torch.zeros(1) for k in ("lm_head.weight",)}, os.path.join(path, "pytorch_model.bin"))
  message = _load_error(path)
  assert re.search("pickle", message, re.I) and ".bin" in message
  assert re.search("safetensors|safe_serialization", message)


# ---------------------------------------------------------------------------------------------- import hygiene

def test_medcg_does_not_import_torch_or_transformers(ckpt):
  """Loading a Qwen-VL checkpoint (and importing the model modules) pulls in neither torch nor transformers."""
  body = textwrap.dedent(f"""
      import sys
      from medcg.model import hf, mrope, qwen_vision, qwen_vl, vlm
      from medcg.data import pipeline
      model = vlm.load_hf({ckpt!r}, image_size={R.IMAGE_SIDE})
      assert type(model).__name__ == "QwenVLM"
      loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
      assert not loaded, f"imported: {{loaded[:5]}}"
      print("NO_TORCH_OK")
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", body], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and "NO_TORCH_OK" in result.stdout, result.stdout + result.stderr


def test_load_onto_a_mesh_reads_slices_and_matches(ckpt, model, ref):
  """With a mesh every param is created sharded by the logical rules (each host reads its slices only), and the
  sharded model computes the same logits."""
  import jax
  from medcg.train import sharding as shd
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = vlm_lib.load_hf(ckpt, image_size=R.IMAGE_SIDE, mesh=mesh)
  qkv = sharded.vision.blocks.attn.qkv.kernel[...]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
  assert qkv.addressable_shards[0].data.shape[1] == qkv.shape[1] // 2
  q = sharded.llm.layers.attn.q.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  forward = jax.jit(lambda m, *a: m(*a))
  args = (jnp.asarray(ref["normalized"]), jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]))
  with shd.use_mesh(mesh):
    got = forward(sharded, *args)
  real = ref["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(forward(model, *args))[real], atol=1e-5)


# The released config.json files (Hub layout: flat decoder keys, rope_scaling "mrope") of the three presets.
_QWEN2_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
                 "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2}
_QWEN25_VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                  "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                  "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                  "temporal_patch_size": 2}
_RELEASED = {
    "qwen2-vl-7b": dict(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", hidden_size=3584,
                        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        max_position_embeddings=32768, vocab_size=152064, tie_word_embeddings=False,
                        vision_config=_QWEN2_VISION),
    "qwen2.5-vl-7b": dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                          hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, max_position_embeddings=128000, vocab_size=152064,
                          tie_word_embeddings=False, vision_config=dict(_QWEN25_VISION, out_hidden_size=3584)),
    "qwen2.5-vl-3b": dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                          hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2, max_position_embeddings=128000, vocab_size=151936,
                          tie_word_embeddings=True, vision_config=dict(_QWEN25_VISION, out_hidden_size=2048)),
}
_COMMON = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
               image_token_id=151655, video_token_id=151656, hidden_act="silu", rms_norm_eps=1e-6,
               rope_theta=1000000.0, use_sliding_window=False, rope_scaling={"type": "mrope",
                                                                            "mrope_section": [16, 24, 24]})


@pytest.mark.parametrize("preset", sorted(_RELEASED))
def test_presets_equal_the_released_configs(preset):
  from configs import models
  got = qwen_vl.config_from_hf(dict(_COMMON, **_RELEASED[preset]))
  want = models.get(preset)
  keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
          "rope_theta", "tie_word_embeddings", "qkv_bias", "mrope_section", "rms_norm_eps", "eos_token_id")
  assert {k: got.llm[k] for k in keys} == {k: want.llm[k] for k in keys}
  skip = ("dtype", "param_dtype", "remat")
  assert {k: v for k, v in got.vision.items() if k not in skip} == {k: v for k, v in want.vision.items()
                                                                     if k not in skip}
  assert got.image_token_id == want.image_token_id == 151655 and got.family == want.family == "qwen2_vl"
