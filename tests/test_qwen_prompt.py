"""Qwen2-VL data side: a BOS-less tokenizer, the "qwen2_vl" chat template, and the prompt layout it gives."""
import importlib.util
import re
import types

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from medcg.data import pipeline
from medcg.data import prompt as prompt_lib
from medcg.data.tokenizer import HFTokenizer, make_tokenizer, qwen_tokenizer

from test_tokenizer import CORPUS as TOKENIZER_CORPUS, RECORD

# Qwen2's pre-tokenizer split (tokenizer.json of the Qwen2 / Qwen2-VL checkpoints), then byte-level.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>"]
# Qwen2-VL-2B/7B-Instruct tokenizer_config.json `chat_template`, verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

# test_tokenizer's corpus and record, plus the words of the Qwen system turn.
CORPUS = TOKENIZER_CORPUS + ["You are a helpful assistant.", "system user assistant"] * 10
N_IMG = 4


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  """A tiny Qwen2-style tokenizer.json: byte-level BPE with the Qwen special tokens as added special tokens."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
  d = tmp_path_factory.mktemp("qwen2-vl")
  tok.save(str(d / "tokenizer.json"))
  return d


def _ids(path):
  raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
  return {t: raw.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}


def test_qwen_tokenizer_has_no_bos(qwen_dir):
  ids = _ids(qwen_dir)
  for path in (qwen_dir, qwen_dir / "tokenizer.json"):
    tok = qwen_tokenizer(path)
    assert tok.bos_id is None
    expected = (ids["<|im_end|>"], ids["<|endoftext|>"], ids["<|image_pad|>"])
    assert (tok.eos_id, tok.pad_id, tok.image_token_id) == expected
    assert tok.vocab_size == len(tokenizers.Tokenizer.from_file(str(qwen_dir / "tokenizer.json")).get_vocab())
  assert tok.decode(tok.encode("B") + [tok.eos_id, tok.pad_id, tok.image_token_id]) == "B"
  assert None not in tok._specials


def test_qwen_tokenizer_rejects_non_qwen_file(tmp_path):
  tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "<|im_end|>": 1, "<|endoftext|>": 2}, unk_token="a"))
  tok.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match=re.escape("lacks the Qwen chat tokens ['<|im_start|>'")):
    qwen_tokenizer(tmp_path)


def test_make_tokenizer_no_bos_and_qwen_kind(qwen_dir):
  p = str(qwen_dir / "tokenizer.json")
  for bos in ("", "none", "None", "NONE"):
    tok = make_tokenizer({"kind": "hf", "path": p, "bos": bos, "eos": "<|im_end|>", "image": "<|image_pad|>"})
    assert isinstance(tok, HFTokenizer) and tok.bos_id is None and tok.eos_id == _ids(qwen_dir)["<|im_end|>"]
  with pytest.raises(ValueError, match="bos token '<s>' not in the vocabulary"):  # unset bos keeps the "<s>" default
    make_tokenizer({"kind": "hf", "path": p, "bos": None, "eos": "<|im_end|>"})
  cfg = pipeline.default_data_config().tokenizer  # the ConfigDict section configs carry (bos=None there)
  cfg.update(kind="qwen", path=str(qwen_dir))
  tok = make_tokenizer(cfg)
  assert tok.bos_id is None and tok.image_token_id == _ids(qwen_dir)["<|image_pad|>"]
  cfg.update(bos="none", eos="<|endoftext|>")  # overrides still apply to kind "qwen"
  assert make_tokenizer(cfg).eos_id == _ids(qwen_dir)["<|endoftext|>"]
  with pytest.raises(ValueError, match=r"tokenizer.kind='qwen' needs tokenizer.path"):
    make_tokenizer({"kind": "qwen"})


def test_qwen2_vl_prompt_layout(qwen_dir):
  tok, ids = qwen_tokenizer(qwen_dir), _ids(qwen_dir)
  enc = prompt_lib.PromptEncoder(tok, "qwen2_vl", num_image_tokens=N_IMG, seq_len=256)
  out = enc.encode(RECORD)
  seq, loss = out["input_ids"], out["loss_mask"]
  n, p = int(out["attention_mask"].sum()), int(out["prompt_len"])
  assert seq[0] == ids["<|im_start|>"]  # no bos
  start, end = np.flatnonzero(seq == ids["<|vision_start|>"]), np.flatnonzero(seq == ids["<|vision_end|>"])
  assert len(start) == len(end) == 1
  assert (seq[start[0] + 1:end[0]] == tok.image_token_id).all() and end[0] - start[0] - 1 == N_IMG
  assert (seq == tok.image_token_id).sum() == N_IMG
  # Loss exactly on the answer letter and the <|im_end|> eos closing the assistant turn.
  assert (np.flatnonzero(loss) == np.arange(p, n)).all()
  assert seq[n - 1] == ids["<|im_end|>"] and tok.decode(seq[p:n]) == "B"
  assert (seq[n:] == tok.pad_id).all()
  # The ids are the tokenization of the rendered text with the image pads expanded (what Qwen2-VL's processor
  # feeds the model), and the prompt decodes to the text without the special tokens.
  prompt, answer = prompt_lib.format_record(RECORD, "qwen2_vl")
  assert answer == "B"
  expanded = prompt.replace(prompt_lib.IMAGE_PLACEHOLDER, "<|image_pad|>" * N_IMG)
  assert list(seq[:p]) == tok.encode(expanded) and list(seq[:n - 1]) == tok.encode(expanded + answer)
  question = prompt_lib.question_choice(RECORD["question"], RECORD["options"])
  assert tok.decode(seq[:p]) == f"system\n{prompt_lib.QWEN2_VL_SYSTEM}\nuser\n{question}\nassistant\n"
  gen = enc.encode(RECORD, include_answer=False)
  assert int(gen["prompt_len"]) == p and (gen["input_ids"][:p] == seq[:p]).all()
  # The CLIP text of the conversation drops the placeholder like the LLaVA templates do.
  assert "<image>" not in prompt_lib.clip_text(RECORD, "conversation", "qwen2_vl")


def test_hf_tokenizer_without_bos_in_llava_template(qwen_dir):
  """bos=None works with any template: nothing is prepended."""
  tok = HFTokenizer(qwen_dir / "tokenizer.json", bos=None, eos="<|im_end|>", image="<|image_pad|>")
  out = prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=2, seq_len=128).encode(RECORD)
  assert list(out["input_ids"][:2]) == [tok.image_token_id] * 2


def test_vlm_judge_head_without_bos(qwen_dir):
  """The local judge's prompt head skips a None bos and matches the training prompt's head."""
  local = pytest.importorskip("medcg.judge.local")
  tok = qwen_tokenizer(qwen_dir)
  model = types.SimpleNamespace(num_image_tokens=N_IMG, llm=types.SimpleNamespace(cfg=types.SimpleNamespace(
      eos_token_id=None)))
  gen = local.VLMGenerator(model, tok, image_size=16, template="qwen2_vl")
  text = prompt_lib.question_choice(RECORD["question"], RECORD["options"])
  enc = prompt_lib.PromptEncoder(tok, "qwen2_vl", num_image_tokens=N_IMG, seq_len=256).encode(RECORD, False)
  assert gen._encode(text) == list(enc["input_ids"][:int(enc["prompt_len"])])
  assert gen.eos_ids == (tok.eos_id,)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_qwen2_vl_template_matches_transformers_render(qwen_dir):
  """The template text is what Qwen2-VL-Instruct's own chat template renders for [image, text] + generation prompt."""
  import transformers
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(qwen_dir / "tokenizer.json"))
  question = prompt_lib.question_choice(RECORD["question"], RECORD["options"])
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
  rendered = hf_tok.apply_chat_template(messages, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False,
                                        add_generation_prompt=True)
  prompt, _ = prompt_lib.format_record(RECORD, "qwen2_vl")
  assert rendered == prompt.replace(prompt_lib.IMAGE_PLACEHOLDER, "<|image_pad|>")
  # With the assistant's answer, the turn is closed by <|im_end|>: the eos the loss covers.
  full = hf_tok.apply_chat_template(messages + [{"role": "assistant", "content": "B"}],
                                    chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False)
  assert full == rendered + "B<|im_end|>\n"
