"""Tokenizers (byte, HF tokenizers JSON, sentencepiece) and the Med-MAT prompt encoder."""
import pickle
import random

import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from medcg.data import pipeline
from medcg.data import prompt as prompt_lib
from medcg.data.tokenizer import (TOKENIZER_KINDS, ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                  make_tokenizer)

CORPUS = [
    "Review this kidney CT scan and determine the possible condition it represents.",
    "A: Stone\nB: Cyst\nC: Normal\nD: Tumor",
    "Answer with the option's letter from the given choices directly.",
    "A chat between a curious human and an artificial intelligence assistant. USER: ASSISTANT:",
    "Please analyze this brain CT scan and determine if there is a hemorrhage.",
] * 20

RECORD = {"sample_id": "Subset--02-train-000001", "question": "Review this kidney CT scan.",
          "options": ["Stone", "Cyst", "Normal", "Tumor"], "answer": "B"}


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.decoder = tokenizers.decoders.ByteLevel()
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tok.save(str(path))
  return path


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  (d / "corpus.txt").write_text("\n".join(CORPUS))
  sentencepiece.SentencePieceTrainer.Train(
      input=str(d / "corpus.txt"), model_prefix=str(d / "tiny"), vocab_size=120, model_type="bpe",
      character_coverage=1.0, pad_id=3, user_defined_symbols=["<image>"], minloglevel=2)
  return d / "tiny.model"


def test_byte_tokenizer_roundtrip_and_specials():
  tok = ByteTokenizer()
  assert isinstance(tok, Tokenizer)
  text = "Fundus: ältere Läsion? B"
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8")) and max(ids) < 256
  assert tok.decode(ids + [tok.eos_id, tok.pad_id, tok.image_token_id]) == text
  specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id}
  assert len(specials) == 4 and min(specials) >= 256 and max(specials) < tok.vocab_size
  assert tok.vocab_size % 8 == 0


def test_hf_tokenizer(hf_path):
  tok = HFTokenizer(hf_path, bos="<s>", eos="</s>", pad="<pad>")
  text = "Review this kidney CT scan.\nA: Stone"
  assert tok.decode(tok.encode(text)) == text
  assert tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 3
  # "<image>" is not in the vocabulary: it gets the first id past it and is never produced by encode.
  base = tokenizers.Tokenizer.from_file(str(hf_path)).get_vocab_size()
  assert tok.image_token_id == base and tok.vocab_size == base + 1
  assert tok.image_token_id not in tok.encode("<image> " + text)
  assert tok.decode(tok.encode("B") + [tok.eos_id, tok.image_token_id]) == "B"
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(text) == tok.encode(text)
  assert HFTokenizer(hf_path, pad=None).pad_id == tok.eos_id  # pad falls back to eos


def test_hf_tokenizer_errors(hf_path, tmp_path):
  with pytest.raises(ValueError, match="bos token '<bos>' not in the vocabulary"):
    HFTokenizer(hf_path, bos="<bos>")
  with pytest.raises(FileNotFoundError, match="missing.json"):
    HFTokenizer(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    HFTokenizer(bad)


def test_tokenizers_without_bos(hf_path, sp_path, tmp_path):
  """bos=None (HF), bos="" (both) or a sentencepiece model without a BOS piece: bos_id is None."""
  for bos in (None, ""):
    tok = HFTokenizer(hf_path, bos=bos, eos="</s>", pad="<pad>")
    assert tok.bos_id is None and None not in tok._specials
    assert tok.decode(tok.encode("Stone") + [tok.eos_id]) == "Stone"
  assert SentencePieceTokenizer(sp_path, bos="").bos_id is None
  (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
  sentencepiece.SentencePieceTrainer.Train(
      input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "nobos"), vocab_size=120, model_type="bpe",
      character_coverage=1.0, bos_id=-1, pad_id=3, minloglevel=2)
  tok = SentencePieceTokenizer(tmp_path / "nobos.model")
  assert tok.bos_id is None and tok.decode(tok.encode("Cyst")) == "Cyst"
  out = prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=2, seq_len=200).encode(RECORD)
  assert list(out["input_ids"][:2]) == [tok.image_token_id] * 2  # nothing before the image


def test_sentencepiece_tokenizer(sp_path):
  tok = SentencePieceTokenizer(sp_path)
  sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), 3)
  assert tok.image_token_id == sp.PieceToId("<image>") and tok.vocab_size == sp.GetPieceSize()
  text = "Please analyze this brain CT scan."
  assert tok.decode(tok.encode(text)) == text
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(text) == tok.encode(text)
  with pytest.raises(ValueError, match="eos token '<nope>' not in"):
    SentencePieceTokenizer(sp_path, eos="<nope>")


def test_make_tokenizer(hf_path, sp_path):
  assert isinstance(make_tokenizer({"kind": "byte"}), ByteTokenizer)
  cfg = pipeline.default_data_config().tokenizer  # the ConfigDict section configs carry
  cfg.update(kind="hf", path=str(hf_path), pad="<pad>", image=7)
  tok = make_tokenizer(cfg)
  assert isinstance(tok, HFTokenizer) and tok.pad_id == 3 and tok.image_token_id == 7
  assert isinstance(make_tokenizer({"kind": "hf", "path": str(hf_path), "pad": "<pad>"}), HFTokenizer)
  assert isinstance(make_tokenizer({"kind": "sentencepiece", "path": str(sp_path)}), SentencePieceTokenizer)
  with pytest.raises(ValueError, match="tokenizer.kind='wordpiece'"):
    make_tokenizer({"kind": "wordpiece"})
  with pytest.raises(ValueError, match="needs tokenizer.path"):
    make_tokenizer({"kind": "hf"})
  cfg.update(bos="None")  # "" / "none" in a config: no BOS (None itself means "the default")
  assert make_tokenizer(cfg).bos_id is None
  assert make_tokenizer({"kind": "sentencepiece", "path": str(sp_path), "bos": ""}).bos_id is None
  assert "qwen" in TOKENIZER_KINDS


def test_question_choice_matches_release_format():
  # medmat.md §1.2, README example of Subset 02.
  q = "Review this kidney CT scan and determine the possible condition it represents."
  assert prompt_lib.question_choice(q, ["Stone", "Cyst", "Normal", "Tumor"]) == (
      q + "\nA: Stone\nB: Cyst\nC: Normal\nD: Tumor\n"
      "Answer with the option's letter from the given choices directly.")
  with pytest.raises(ValueError, match="2-4 options"):
    prompt_lib.question_choice(q, ["only"])


def test_format_record_llava_and_plain():
  prompt, answer = prompt_lib.format_record(RECORD, "llava_v1")
  assert prompt.startswith(prompt_lib.LLAVA_V1_SYSTEM + " USER: <image>\nReview this kidney CT scan.\nA: Stone")
  assert prompt.endswith("directly. ASSISTANT:") and answer == " B"
  prompt, answer = prompt_lib.format_record(RECORD, "plain")
  assert prompt.startswith("<image>\nReview") and prompt.endswith("\nAnswer:") and answer == " B"
  with pytest.raises(ValueError, match="chat_template='vicuna'"):
    prompt_lib.get_template("vicuna")
  with pytest.raises(ValueError, match="exactly once"):
    prompt_lib.ChatTemplate("bad", "{question}")


@pytest.mark.parametrize("kind", ["byte", "hf", "sp"])
def test_prompt_encoder_layout_and_loss_mask(kind, hf_path, sp_path):
  tok = {"byte": ByteTokenizer, "hf": lambda: HFTokenizer(hf_path, pad="<pad>"),
         "sp": lambda: SentencePieceTokenizer(sp_path)}[kind]()
  n_img, seq_len = 5, 600
  enc = prompt_lib.PromptEncoder(tok, "llava_v1", num_image_tokens=n_img, seq_len=seq_len)
  out = enc.encode(RECORD)
  ids, mask, loss = out["input_ids"], out["attention_mask"], out["loss_mask"]
  n_real, p = int(mask.sum()), int(out["prompt_len"])
  assert ids.dtype == np.int32 and loss.dtype == np.float32 and ids.shape == (seq_len,)
  assert ids[0] == tok.bos_id and (mask[:n_real] == 1).all() and (ids[n_real:] == tok.pad_id).all()
  img = np.flatnonzero(ids == tok.image_token_id)
  assert len(img) == n_img and (np.diff(img) == 1).all()
  # Loss exactly on answer tokens + eos; they decode to the letter.
  assert (np.flatnonzero(loss) == np.arange(p, n_real)).all()
  assert ids[n_real - 1] == tok.eos_id and tok.decode(ids[p:n_real]).strip() == "B"
  # The prompt of the training sequence is exactly the generation prompt.
  gen = enc.encode(RECORD, include_answer=False)
  assert int(gen["prompt_len"]) == p and int(gen["attention_mask"].sum()) == p
  assert (gen["input_ids"][:p] == ids[:p]).all() and not gen["loss_mask"].any()
  assert "Review this kidney CT scan." in tok.decode(ids[:p])


def test_prompt_encoder_truncation_never_cuts_answer():
  tok = ByteTokenizer()
  long_record = dict(RECORD, question="word " * 200)
  full = prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=4, seq_len=4096).encode(long_record)
  n_full = int(full["attention_mask"].sum())
  seq_len = n_full - random.randint(10, 500)
  with pytest.raises(ValueError, match=r"Subset--02-train-000001.*seq_len=%d" % seq_len):
    prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=4, seq_len=seq_len).encode(long_record)
  enc = prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=4, seq_len=seq_len, truncation="question")
  out = enc.encode(long_record)
  n, p = int(out["attention_mask"].sum()), int(out["prompt_len"])
  assert n <= seq_len
  text = tok.decode(out["input_ids"][:n])
  assert text.endswith("A: Stone\nB: Cyst\nC: Normal\nD: Tumor\n" + prompt_lib.CHOICE_INSTRUCTION + "\nAnswer: B")
  assert tok.decode(out["input_ids"][p:n]) == " B" and out["loss_mask"].sum() == n - p
  # Options + answer alone do not fit: an error, not a cut answer.
  with pytest.raises(ValueError, match="exceed data.seq_len=40"):
    prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=4, seq_len=40, truncation="question").encode(long_record)


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_prompt_encoder_text_answers(kind, hf_path):
  """answer_format="text": the loss covers the option's text (+ eos), the instruction asks for the text, and
  the prompt is the letter format's prompt except for that instruction line."""
  tok = ByteTokenizer() if kind == "byte" else HFTokenizer(hf_path, pad="<pad>")
  text_enc = prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=3, seq_len=400, answer_format="text")
  letter_enc = prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=3, seq_len=400)
  for answer, option in zip("ABCD", RECORD["options"]):
    rec = dict(RECORD, answer=answer)
    out = text_enc.encode(rec)
    n, p = int(out["attention_mask"].sum()), int(out["prompt_len"])
    assert tok.decode(out["input_ids"][p:n - 1]).strip() == option and out["input_ids"][n - 1] == tok.eos_id
    assert out["loss_mask"].sum() == n - p
    prompt = tok.decode(out["input_ids"][:p])
    assert prompt_lib.TEXT_INSTRUCTION in prompt and prompt_lib.CHOICE_INSTRUCTION not in prompt
    letter_prompt = tok.decode(letter_enc.encode(rec, include_answer=False)["input_ids"][:p + 20])
    assert prompt.replace(prompt_lib.TEXT_INSTRUCTION, prompt_lib.CHOICE_INSTRUCTION) in letter_prompt
  assert prompt_lib.answer_text(RECORD, "text") == "Cyst" and prompt_lib.answer_text(RECORD) == "B"
  with pytest.raises(ValueError, match="data.answer_format='word'"):
    prompt_lib.PromptEncoder(tok, "plain", num_image_tokens=3, seq_len=400, answer_format="word")
