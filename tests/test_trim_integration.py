"""TRIM end to end: the VLM forward against a hand-pruned sequence, the pipeline's CLIP text, the train step and
trainer with TRIM on, and generation. A micro model (16 patches, width 64) keeps compiles short."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medcg.data import pipeline
from medcg.data import prompt as prompt_lib
from medcg.data import tokenizer as tok_lib
from medcg.model import vlm as vlm_lib
from medcg.train import step as step_lib
from medcg.train import trainer
from test_train import micro_config, micro_model

BOS, EOS, PAD, IMAGE = 257, 258, 256, 259
ANSWER_SUFFIX = b"\nAnswer:"  # the "plain" template's text after the question


@pytest.fixture
def rng():
  seed = int(os.environ.get("MEDCG_TEST_SEED", np.random.SeedSequence().entropy % (2 ** 31)))
  print(f"seed={seed} (MEDCG_TEST_SEED={seed} repeats it)")
  return np.random.default_rng(seed)


def trim_micro_model():
  m = micro_model()
  m.text.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     projection_dim=m.vision.projection_dim))
  return m


def trim_section(mode: str, k_max: int, ratio: float = 0.0) -> dict:
  return dict(enabled=True, mode=mode, k_max=k_max, ratio=ratio, impl="xla", text_source="conversation",
              eval_text_source="question")


def prompts(rng, batch: int, slots: int, length: int, pad: bool = True):
  """[bos] head <image>*slots tail [pad]: random byte text of random lengths (equal lengths when not pad)."""
  ids = np.full((batch, length), PAD, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for b in range(batch):
    head = rng.integers(0, 256, int(rng.integers(1, 4))).tolist()
    n_tail = int(rng.integers(2, length - slots - len(head))) if pad else length - slots - len(head) - 1
    row = [BOS] + head + [IMAGE] * slots + rng.integers(0, 256, n_tail).tolist()
    ids[b, :len(row)] = row
    mask[b, :len(row)] = 1
  return ids, mask


def random_text_ids(rng, batch: int):
  tok = prompt_lib.ClipByteTokenizer(77)
  texts = ["".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(5, 60)))) for _ in range(batch)]
  return jnp.asarray(tok(texts)[0])


def numpy_trim_selection(p: np.ndarray, mode: str, k_max: int, ratio: float) -> list[np.ndarray]:
  """Kept patch indices per example, in raster order, from TRIM's description (reference/trim.md §1.3)."""
  b, n = p.shape
  if mode == "ratio":
    k = [int(n * ratio)] * b
  else:
    assert mode == "iqr_batch"
    q1, q3 = np.percentile(p.astype(np.float64).ravel(), [25, 75])
    above = int(np.sum(p > q3 + 1.5 * (q3 - q1)))
    k = [above // b] * b
  return [np.sort(np.argsort(-p[i], kind="stable")[:min(k[i], k_max)]) for i in range(b)]


# ----------------------------------------------------------------------------------------------------------
# (a) the acceptance test: jitted, static shapes, logits == the explicitly pruned sequence
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,k_max,ratio", [("ratio", 12, 0.5), ("ratio", 5, 0.5), ("iqr_batch", 10, 0.0)])
def test_trim_forward_equals_explicitly_pruned_sequence(rng, mode, k_max, ratio):
  cfg = trim_micro_model()
  model = vlm_lib.VLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))), trim=trim_section(mode, k_max, ratio))
  slots = k_max + 1
  assert model.num_image_tokens == slots
  batch, length = 3, slots + 24
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  ids, mask = prompts(rng, batch, slots, length)
  text_ids = random_text_ids(rng, batch)

  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def forward(state, images, ids, mask, text_ids):
    traces.append(1)
    return nnx.merge(graphdef, state)(images, ids, mask, text_ids)

  logits = np.asarray(forward(state, images, jnp.asarray(ids), jnp.asarray(mask), text_ids))
  assert logits.shape == (batch, length, cfg.llm.vocab_size)
  # Another text (so other counts) reuses the compiled forward: the shapes do not depend on the selection.
  forward(state, images, jnp.asarray(ids), jnp.asarray(mask), random_text_ids(rng, batch))
  assert len(traces) == 1

  # The pruned sequence, built by hand: CLIP scores -> kept patches (raster order) + mean of the rest.
  patches = np.asarray(model.vision(images, layer=cfg.vision_select_layer))[:, 1:]
  scores = np.einsum("bne,be->bn", np.asarray(model.vision.project_patches(jnp.asarray(patches))),
                     np.asarray(model.text(text_ids)))
  p = np.asarray(jax.nn.softmax(-jnp.asarray(scores), axis=-1))
  kept = numpy_trim_selection(p, mode, k_max, ratio)
  if mode == "ratio":
    assert len(kept[0]) == min(int(patches.shape[1] * ratio), k_max)
  for b in range(batch):
    rest = np.setdiff1d(np.arange(patches.shape[1]), kept[b])
    mean = patches[b, rest].mean(axis=0) if rest.size else np.zeros(patches.shape[-1], np.float32)
    image_rows = model.projector(jnp.asarray(np.concatenate([patches[b, kept[b]], mean[None]])))
    real = ids[b, :mask[b].sum()]
    start = int(np.argmax(real == IMAGE))
    before = model.llm.embed(jnp.asarray(real[:start]))
    after = model.llm.embed(jnp.asarray(real[start + slots:]))
    embeds = jnp.concatenate([before, image_rows.astype(before.dtype), after])[None]
    ref, _ = model.llm(inputs_embeds=embeds, attention_mask=jnp.ones(embeds.shape[:2], jnp.int32))
    ref = np.asarray(ref[0])
    used = len(kept[b]) + 1
    # Text before the image, the used image slots, the text after it (shifted by the unused slots).
    np.testing.assert_allclose(logits[b, :start + used], ref[:start + used], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(logits[b, start + slots:len(real)], ref[start + used:], rtol=2e-4, atol=2e-4)


def test_trim_forward_without_text_ids_says_how_to_get_them():
  model = vlm_lib.VLM(trim_micro_model(), rngs=nnx.Rngs(0), trim=trim_section("ratio", 4, 0.25))
  ids = np.array([[BOS] + [IMAGE] * 5 + [65, 66]], np.int32)
  with pytest.raises(ValueError, match="data.clip_text.enabled"):
    model(jnp.zeros((1, 32, 32, 3)), jnp.asarray(ids), jnp.ones_like(ids))


@pytest.fixture(scope="module")
def tiny_trim_state():
  """The tiny preset with TRIM (iqr_example, k_max 8): config, section and params, built once (eager init
  compiles every initializer apart: seconds on 2 cores)."""
  from configs import models
  cfg = models.get("tiny")
  section = trim_section("iqr_example", 8)
  return cfg, section, nnx.state(vlm_lib.VLM(cfg, rngs=nnx.Rngs(0), trim=section))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_trim_kernel_forward_on_the_8_device_mesh(rng, tiny_trim_state, backend):
  # The trainer's setting: params and batch sharded on a (data, fsdp) mesh, the model traced under use_mesh, the
  # Pallas TRIM (interpret mode on CPU) run per batch shard by trim.trim's shard_map. iqr_example decides per
  # example, so the logits equal those of the XLA reference (same params, no mesh: GSPMD partitions it).
  from medcg.train import sharding as shd
  cfg, section, state = tiny_trim_state
  k_max, batch = section["k_max"], 8
  graphdef = lambda trim: nnx.graphdef(nnx.eval_shape(lambda: vlm_lib.VLM(cfg, rngs=nnx.Rngs(0), trim=trim)))
  mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  state = jax.device_put(state, shd.param_shardings(state, mesh))
  length = k_max + 1 + 24
  ids, mask = prompts(rng, batch, k_max + 1, length)
  host = (rng.normal(size=(batch, 32, 32, 3)).astype(np.float32), ids, mask, np.asarray(random_text_ids(rng, batch)))
  inputs = [jax.device_put(x, shd.batch_sharding(mesh, ndim=x.ndim)) for x in host]
  forward = jax.jit(lambda graphdef, state, *inputs: nnx.merge(graphdef, state)(*inputs), static_argnums=0)

  kernel = graphdef(dict(section, impl=f"pallas_{backend}", interpret=True))
  with shd.use_mesh(mesh):
    # Wait for it here: TPU interpret mode runs jnp inside io_callbacks on every device thread, and work
    # dispatched meanwhile from this thread can deadlock with them on a 2-core host.
    logits = jax.block_until_ready(forward(kernel, state, *inputs))
  assert logits.shape == (batch, length, cfg.llm.vocab_size)
  assert logits.sharding.spec[0] == ("data", "fsdp"), logits.sharding
  # The same parameters in the XLA-reference model (the TRIM section is static, part of the graphdef).
  want = forward(graphdef(section), state, *inputs)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------------------------------------
# (b) the pipeline's text_ids
# ----------------------------------------------------------------------------------------------------------
def test_clip_byte_tokenizer_layout_and_truncation():
  tok = prompt_lib.ClipByteTokenizer(8)
  ids, mask = tok(["ab", "abcdefghij", ""])
  assert ids.dtype == np.int32 and ids.shape == (3, 8)
  np.testing.assert_array_equal(ids[0], [BOS, 97, 98, EOS, PAD, PAD, PAD, PAD])
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(ids[1], [BOS, 97, 98, 99, 100, 101, 102, EOS])  # eos survives truncation
  np.testing.assert_array_equal(ids[2][:3], [BOS, EOS, PAD])
  with pytest.raises(ValueError, match="max_len"):
    prompt_lib.ClipByteTokenizer(2)


def test_clip_text_sources():
  record = {"question": "Which <image> finding?", "options": ["Cyst", "Tumor"], "answer": "B"}
  qc = "Which   finding?\nA: Cyst\nB: Tumor\n" + prompt_lib.CHOICE_INSTRUCTION
  assert prompt_lib.clip_text(record, "question", "plain") == qc
  assert prompt_lib.clip_text(record, "conversation", "plain") == " \n" + qc + "\nAnswer: B"
  assert prompt_lib.clip_text(record, "conversation", "plain", include_answer=False) == " \n" + qc + "\nAnswer:"
  conv = prompt_lib.clip_text(record, "conversation", "llava_v1")
  assert conv.startswith(prompt_lib.LLAVA_V1_SYSTEM) and conv.endswith("ASSISTANT: B") and "<image>" not in conv
  with pytest.raises(ValueError, match="data.clip_text.source"):
    prompt_lib.clip_text(record, "caption")


def test_clip_text_config_errors():
  cfg = pipeline.default_data_config().clip_text
  cfg.enabled = True
  cfg.source = "answer"
  with pytest.raises(ValueError, match="data.clip_text.source"):
    prompt_lib.ClipTextEncoder(cfg, "plain")
  cfg.source = "question"
  cfg.tokenizer.kind = "sentencepiece"
  with pytest.raises(ValueError, match="data.clip_text.tokenizer.kind"):
    prompt_lib.ClipTextEncoder(cfg, "plain")
  cfg.tokenizer.kind = "clip"
  with pytest.raises(ValueError, match="data.clip_text.tokenizer.path"):
    prompt_lib.ClipTextEncoder(cfg, "plain")


def test_with_clip_text_follows_trim():
  data = pipeline.default_data_config()
  trim = trim_section("iqr_batch", 8)
  train_cfg = pipeline.with_clip_text(data, trim, training=True)
  eval_cfg = pipeline.with_clip_text(data, trim, training=False)
  assert train_cfg.clip_text.enabled and train_cfg.clip_text.source == "conversation"
  assert eval_cfg.clip_text.enabled and eval_cfg.clip_text.source == "question"
  assert not pipeline.with_clip_text(data, None, training=True).clip_text.enabled
  assert not pipeline.with_clip_text(data, dict(trim, enabled=False), training=True).clip_text.enabled
  assert not data.clip_text.enabled  # the input is not modified


def _question_bytes(input_ids, slots: int) -> bytes:
  """The Question-choice text of a byte-tokenized "plain" prompt: after `<image>*slots` and its newline."""
  row = [int(i) for i in input_ids]
  start = row.index(IMAGE) + slots + 1
  end = len(row) - row[::-1].index(ord(":")) - len(ANSWER_SUFFIX) + 1
  return bytes(row[start:end])


@pytest.mark.parametrize("source,training", [("question", False), ("conversation", True),
                                             ("conversation", False)])
def test_pipeline_emits_text_ids_of_the_source(synth_shards, source, training):
  data = pipeline.default_data_config()
  data.update(dict(shards_dir=synth_shards, mixture=[(3, "test", 4), (5, "train", 4)], image_size=32,
                   seq_len=256, num_image_tokens=9, chat_template="plain", batch_size=4, num_epochs=1))
  data.clip_text.update(dict(enabled=True, source=source, max_len=77))
  tokenizer = tok_lib.ByteTokenizer()
  if training:
    batches = list(pipeline.make_train_dataset(data, tokenizer, process_index=0, process_count=1))
  else:
    batches = list(pipeline.make_eval_dataset(data, tokenizer, include_answer=False, process_index=0,
                                              process_count=1))
  assert len(batches) == 2
  for batch in batches:
    assert batch["text_ids"].dtype == np.int32 and batch["text_ids"].shape == (4, 77)
    for row, ids, prompt_len, answer in zip(batch["text_ids"], batch["input_ids"], batch["prompt_len"],
                                            batch["answer"]):
      question = _question_bytes(ids[:prompt_len], 9)
      if source == "question":
        text = question
      else:
        text = b" \n" + question + ANSWER_SUFFIX + (f" {answer}".encode() if training else b"")
      body = text[:75]
      expected = [BOS] + list(body) + [EOS] + [PAD] * (75 - len(body))
      np.testing.assert_array_equal(row, expected)
  # The TRIM text stays out of batches when clip_text is off.
  data.clip_text.enabled = False
  plain = next(iter(pipeline.make_eval_dataset(data, tokenizer, process_index=0, process_count=1)))
  assert "text_ids" not in plain


# ----------------------------------------------------------------------------------------------------------
# (c) training and the eval hook with TRIM on
# ----------------------------------------------------------------------------------------------------------
def test_model_batch_passes_text_ids_when_present():
  batch = {"image": 1, "input_ids": 2, "attention_mask": 3, "loss_mask": 4, "answer_idx": 5}
  assert set(step_lib.model_batch(batch)) == {"image", "input_ids", "attention_mask", "loss_mask"}
  assert "text_ids" in step_lib.model_batch(dict(batch, text_ids=6))
  with pytest.raises(KeyError, match="loss_mask"):
    step_lib.model_batch({"image": 1, "input_ids": 2, "attention_mask": 3})


@pytest.mark.parametrize("mode,ratio", [("iqr_batch", 0.0), ("ratio", 0.5)])
def test_trainer_trains_and_evaluates_with_trim(synth_shards, tmp_path, mode, ratio):
  c = micro_config(synth_shards, steps=2, log_batches=False)
  c.model = trim_micro_model()
  c.trim.update(trim_section(mode, 8, ratio))
  # The trainer's pipeline_config copies config.data; with_clip_text sets clip_text from trim there once the
  # trainer calls it. Setting it here keeps this test independent of that wiring.
  c.data = pipeline.with_clip_text(c.data, c.trim, training=True)
  result = trainer.train(c, str(tmp_path / mode))
  assert result.step == 2 and len(result.losses) == 2
  assert all(np.isfinite(result.losses))
  assert "eval/accuracy" in result.metrics, sorted(result.metrics)
  with open(tmp_path / mode / "results.json") as f:
    assert json.load(f)
  assert os.path.isdir(tmp_path / mode / "eval")


# ----------------------------------------------------------------------------------------------------------
# (d) generation with TRIM
# ----------------------------------------------------------------------------------------------------------
def test_generate_with_trim_equals_greedy_recomputation(rng):
  k_max = 6
  model = vlm_lib.VLM(trim_micro_model(), rngs=nnx.Rngs(int(rng.integers(1 << 30))),
                      trim=trim_section("iqr_batch", k_max))
  batch, new = 2, 4
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  ids, mask = prompts(rng, batch, k_max + 1, k_max + 16, pad=False)
  text_ids = random_text_ids(rng, batch)
  never = model.llm.cfg.vocab_size - 1  # a rarely drawn eos; rows are compared up to their own length
  tokens, lengths = vlm_lib.generate(model, images, ids, mask, text_ids=text_ids, max_new_tokens=new,
                                     eos_ids=never, pad_id=PAD)
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  seq = ids
  diverged = np.zeros(batch, bool)
  for t in range(new):
    logits = np.asarray(model(images, jnp.asarray(seq), jnp.ones_like(jnp.asarray(seq)), text_ids))
    greedy = logits[:, -1].argmax(-1).astype(np.int32)
    live = (t < lengths) & ~diverged
    np.testing.assert_array_equal(tokens[live, t], greedy[live])
    # A random model may emit the image placeholder; fed back, it would be one placeholder too many for the
    # forward pass, so such a row is compared no further (generation itself never re-reads its output as image).
    placeholder = greedy == model.image_token_id
    diverged |= placeholder
    seq = np.concatenate([seq, np.where(placeholder, PAD, greedy)[:, None]], axis=1)


def test_pipeline_clip_tokenizer_from_tokenizer_json(tmp_path):
  """kind="clip": a CLIP-style tokenizer.json (bos/eos template, eos padding) through clip.CLIPTokenizer."""
  import tokenizers
  from tokenizers import models, pre_tokenizers, processors
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "[UNK]": 2, "which": 3, "finding": 4, "?": 5, "a": 6}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
  tok.save(str(tmp_path / "tokenizer.json"))
  cfg = pipeline.default_data_config().clip_text
  cfg.update(dict(enabled=True, source="question", max_len=6))
  cfg.tokenizer.update(dict(kind="clip", path=str(tmp_path)))
  clip_tok = prompt_lib.make_clip_tokenizer(cfg)
  ids, _ = clip_tok(["which finding ?", "a a a a a a a a"])
  np.testing.assert_array_equal(ids, [[0, 3, 4, 5, 1, 1], [0, 6, 6, 6, 6, 1]])
