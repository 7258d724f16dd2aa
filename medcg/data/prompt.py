"""Med-MAT prompts: the released `Question-choice` text inside a chat template, tokenized with a loss mask.

The question text is the release's `Question-choice` field (medmat.md §1.2): the instruction, then
"\\nA: opt\\nB: opt..." and "\\nAnswer with the option's letter from the given choices directly.".
A template puts it in a chat turn with one `<image>` placeholder, which expands to `num_image_tokens`
copies of the tokenizer's `image_token_id`; the answer is the letter (plus eos).

Token layout (DEVELOPING.md batch contract): `[bos] prompt... answer... eos pad...`; bos only when the
tokenizer has one (`bos_id` not None; Qwen2-VL has none). The answer's ids
are read off the tokenization of prompt+answer when it extends the prompt-only tokenization, so a
training sequence starts with exactly the ids a generation prompt has (LLaVA tokenizes the same way).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from medcg.data.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
QUESTION_FIELD = "{question}"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# `answer_format="text"`: the answer is the option's text (" COVID-19") instead of its letter (" B").
TEXT_INSTRUCTION = "Answer with the option's text from the given choices directly."
ANSWER_FORMATS = ("letter", "text")
LETTERS = "ABCD"

QWEN2_VL_SYSTEM = "You are a helpful assistant."
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """`prompt` holds one `<image>` and one `{question}`; `answer` holds `{letter}` (eos is added)."""
  name: str
  prompt: str
  answer: str = " {letter}"

  def __post_init__(self):
    for field in (IMAGE_PLACEHOLDER, QUESTION_FIELD):
      if self.prompt.count(field) != 1:
        raise ValueError(f"chat template {self.name!r}: prompt must contain {field!r} exactly once: {self.prompt!r}")
    if self.prompt.index(IMAGE_PLACEHOLDER) > self.prompt.index(QUESTION_FIELD):
      raise ValueError(f"chat template {self.name!r}: {IMAGE_PLACEHOLDER!r} must come before {QUESTION_FIELD!r}")
    if "{letter}" not in self.answer:
      raise ValueError(f"chat template {self.name!r}: answer must contain '{{letter}}': {self.answer!r}")


TEMPLATES = {
    # LLaVA-1.5 `conv_vicuna_v1` (sep " ", sep2 "</s>"), as Med-MAT trained LLaVA-v1.5.
    "llava_v1": ChatTemplate("llava_v1", LLAVA_V1_SYSTEM + " USER: <image>\n{question} ASSISTANT:"),
    # Qwen2-VL-Instruct's chat template (tokenizer_config.json) for one user turn [image, text] with
    # add_generation_prompt=True; `<image>` expands to <|image_pad|> ids, the answer has no leading space and
    # ends in the tokenizer's eos (<|im_end|> for medcg.data.tokenizer.qwen_tokenizer).
    "qwen2_vl": ChatTemplate(
        "qwen2_vl",
        f"<|im_start|>system\n{QWEN2_VL_SYSTEM}<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><image><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n",
        answer="{letter}"),
    # No chat scaffolding: for tiny from-scratch models.
    "plain": ChatTemplate("plain", "<image>\n{question}\nAnswer:"),
}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
  """A template by name (see TEMPLATES) or as given."""
  if isinstance(template, ChatTemplate):
    return template
  if template not in TEMPLATES:
    raise ValueError(f"data.chat_template={template!r}: expected one of {sorted(TEMPLATES)}")
  return TEMPLATES[template]


def question_choice(question: str, options: Sequence[str], answer_format: str = "letter") -> str:
  """The Med-MAT `Question-choice` text: question, lettered options, the answer instruction.

  A detection record has no options: its question (which asks for the box) is the whole text.
  """
  if not options:
    return question
  if not 2 <= len(options) <= len(LETTERS):
    raise ValueError(f"expected 2-4 options, got {len(options)}: {list(options)!r}")
  lines = [question] + [f"{letter}: {text}" for letter, text in zip(LETTERS, options)]
  return "\n".join(lines + [TEXT_INSTRUCTION if answer_format == "text" else CHOICE_INSTRUCTION])


def answer_text(record: Mapping[str, Any], answer_format: str = "letter") -> str:
  """What the model is trained to say: the answer letter, or the text of the option it names.

  A detection record (no options) answers with its box text either way.
  """
  if answer_format not in ANSWER_FORMATS:
    raise ValueError(f"data.answer_format={answer_format!r}: expected one of {ANSWER_FORMATS}")
  if answer_format == "letter" or not record["options"]:
    return record["answer"]
  return record["options"][LETTERS.index(record["answer"])].strip()


def format_record(record: Mapping[str, Any], template: str | ChatTemplate = "llava_v1") -> tuple[str, str]:
  """(prompt text with the `<image>` placeholder, answer text without eos) for a parsed shard record."""
  template = get_template(template)
  prompt = template.prompt.replace(QUESTION_FIELD, question_choice(record["question"], record["options"]))
  return prompt, template.answer.format(letter=record["answer"])


class PromptEncoder:
  """Turns parsed records into fixed-length token arrays with a loss mask on the answer and eos.

  truncation: "error" (default) raises when a sequence does not fit `seq_len`; "question" shortens
  the free-text instruction from its end, never the options, the image tokens or the answer.
  answer_format: "letter" (Med-MAT's, default) or "text" (the option's text; see `answer_text`).
  """

  def __init__(self, tokenizer: Tokenizer, template: str | ChatTemplate, *, num_image_tokens: int,
               seq_len: int, truncation: str = "error", answer_format: str = "letter"):
    if answer_format not in ANSWER_FORMATS:
      raise ValueError(f"data.answer_format={answer_format!r}: expected one of {ANSWER_FORMATS}")
    self.answer_format = answer_format
    if truncation not in ("error", "question"):
      raise ValueError(f"data.truncation={truncation!r}: expected 'error' or 'question'")
    if num_image_tokens < 1:
      raise ValueError(f"data.num_image_tokens={num_image_tokens}: must be >= 1")
    self.tokenizer = tokenizer
    self.template = get_template(template)
    self.num_image_tokens = num_image_tokens
    self.seq_len = seq_len
    self.truncation = truncation
    before_image, rest = self.template.prompt.split(IMAGE_PLACEHOLDER)
    self._after_image, self._after_question = rest.split(QUESTION_FIELD)
    # Constant head, tokenized once: bos (if the tokenizer has one), the text before the image, the image tokens.
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    self._head = bos + tokenizer.encode(before_image) + [tokenizer.image_token_id] * num_image_tokens

  def _tail_ids(self, question: str, options: Sequence[str], answer: str | None):
    """Ids of the prompt after the image and of the answer (None when not asked for)."""
    tail = self._after_image + question_choice(question, options, self.answer_format) + self._after_question
    prompt_ids = self.tokenizer.encode(tail)
    if answer is None:
      return prompt_ids, None
    answer_text = self.template.answer.format(letter=answer)
    full = self.tokenizer.encode(tail + answer_text)
    if len(full) > len(prompt_ids) and full[:len(prompt_ids)] == prompt_ids:
      answer_ids = full[len(prompt_ids):]
    else:  # the tokenizer merged across the boundary: tokenize the answer on its own
      answer_ids = self.tokenizer.encode(answer_text)
    return prompt_ids, answer_ids + [self.tokenizer.eos_id]

  def _fit_question(self, record: Mapping[str, Any], answer: str | None, excess: int):
    """Drops `excess` (or more) tokens from the end of the instruction so the sequence fits."""
    q_ids = self.tokenizer.encode(record["question"])
    while excess > 0:
      keep = len(q_ids) - excess
      if keep < 1:
        return None
      q_ids = q_ids[:keep]
      prompt_ids, answer_ids = self._tail_ids(self.tokenizer.decode(q_ids), record["options"], answer)
      excess = len(self._head) + len(prompt_ids) + len(answer_ids or ()) - self.seq_len
      if excess > 0:  # re-tokenization can differ by a token or two; cut at least one more
        excess = max(excess, 1)
    return prompt_ids, answer_ids

  def encode(self, record: Mapping[str, Any], include_answer: bool = True) -> dict[str, np.ndarray]:
    """input_ids, attention_mask (int32, L), loss_mask (float32, L) and prompt_len (int32 scalar)."""
    answer = answer_text(record, self.answer_format) if include_answer else None
    prompt_ids, answer_ids = self._tail_ids(record["question"], record["options"], answer)
    total = len(self._head) + len(prompt_ids) + len(answer_ids or ())
    if total > self.seq_len:
      fitted = self._fit_question(record, answer, total - self.seq_len) if self.truncation == "question" else None
      if fitted is None:
        raise ValueError(
            f"sample {record.get('sample_id', '?')!r}: {total} tokens (prompt {len(self._head) + len(prompt_ids)}, "
            f"answer {len(answer_ids or ())}) exceed data.seq_len={self.seq_len} with truncation="
            f"{self.truncation!r}; raise seq_len or set data.truncation='question'")
      prompt_ids, answer_ids = fitted
    ids = self._head + prompt_ids
    prompt_len = len(ids)
    if answer_ids:
      ids = ids + answer_ids
    input_ids = np.full((self.seq_len,), self.tokenizer.pad_id, np.int32)
    input_ids[:len(ids)] = ids
    attention_mask = np.zeros((self.seq_len,), np.int32)
    attention_mask[:len(ids)] = 1
    loss_mask = np.zeros((self.seq_len,), np.float32)
    loss_mask[prompt_len:len(ids)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "prompt_len": np.int32(prompt_len)}


# ------------------------------------------------------------------------------------------------------
# CLIP text for TRIM (reference/trim.md §1.2): the text TRIM scores the image patches against.
# ------------------------------------------------------------------------------------------------------
CLIP_TEXT_SOURCES = ("question", "conversation")


def clip_text(record: Mapping[str, Any], source: str, template: str | ChatTemplate = "llava_v1",
              include_answer: bool = True) -> str:
  """The text of one record for TRIM's CLIP text tower, with the image placeholder replaced by a space.

  "question": the Med-MAT Question-choice text (what TRIM's evaluation scores against: the benchmark's
  question, `cur_prompt.replace('<image>', ' ')`). "conversation": the whole formatted prompt plus the
  answer when `include_answer` (what TRIM's training scores against; the tokenizer truncates it to 77).
  """
  if source == "question":
    text = question_choice(record["question"], record["options"])
  elif source == "conversation":
    prompt, answer = format_record(record, template)
    text = prompt + (answer if include_answer else "")
  else:
    raise ValueError(f"data.clip_text.source={source!r}: expected one of {CLIP_TEXT_SOURCES}")
  return text.replace(IMAGE_PLACEHOLDER, " ")


class ClipByteTokenizer:
  """CLIP-style fixed-length byte ids for from-scratch text towers (the `tiny` preset: vocab 264, eos 258).

  `[bos] utf-8 bytes... [eos] pad...`, truncated so that eos is always the last real token (as CLIP's
  tokenizer truncates), padded to `max_length`. Ids match `ByteTokenizer` (pad 256, bos 257, eos 258).
  Same call signature as `medcg.model.clip.CLIPTokenizer`.
  """

  def __init__(self, max_length: int = 77, *, pad_id: int = 256, bos_id: int = 257, eos_id: int = 258):
    if max_length < 3:
      raise ValueError(f"data.clip_text.max_len={max_length}: must be >= 3 (bos, one byte, eos)")
    self.max_length, self.pad_id, self.bos_id, self.eos_id = max_length, pad_id, bos_id, eos_id

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids, attention_mask), both int32 (len(texts), max_length)."""
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_length), np.int32)
    for i, text in enumerate(texts):
      row = [self.bos_id] + list(text.encode("utf-8"))[:self.max_length - 2] + [self.eos_id]
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return ids, mask

  def __repr__(self) -> str:
    return f"ClipByteTokenizer(max_length={self.max_length}, eos_id={self.eos_id})"


def make_clip_tokenizer(clip_text_cfg: Mapping[str, Any]):
  """The CLIP tokenizer of a `data.clip_text` section: kind "byte" (tiny towers) or "clip" (a tokenizer.json)."""
  tok = clip_text_cfg["tokenizer"]
  max_len = int(clip_text_cfg["max_len"])
  kind = tok["kind"]
  if kind == "byte":
    return ClipByteTokenizer(max_len)
  if kind == "clip":
    if not tok.get("path"):
      raise ValueError("data.clip_text.tokenizer.kind='clip' needs data.clip_text.tokenizer.path (a CLIP "
                       "tokenizer.json or the directory holding it)")
    from medcg.model import clip  # the model package pulls in jax: only for pretrained CLIP towers
    return clip.CLIPTokenizer(tok["path"], max_length=max_len)
  raise ValueError(f"data.clip_text.tokenizer.kind={kind!r}: expected 'byte' or 'clip'")


class ClipTextEncoder:
  """Records -> `text_ids` int32 (max_len,): the CLIP-tokenized TRIM text of `source` (see `clip_text`)."""

  def __init__(self, clip_text_cfg: Mapping[str, Any], template: str | ChatTemplate):
    self.source = clip_text_cfg["source"]
    if self.source not in CLIP_TEXT_SOURCES:
      raise ValueError(f"data.clip_text.source={self.source!r}: expected one of {CLIP_TEXT_SOURCES}")
    self.template = get_template(template)
    self.tokenizer = make_clip_tokenizer(clip_text_cfg)

  def encode(self, record: Mapping[str, Any], include_answer: bool = True) -> np.ndarray:
    ids, _ = self.tokenizer([clip_text(record, self.source, self.template, include_answer)])
    return ids[0]
