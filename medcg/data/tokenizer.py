"""Tokenizers behind one small protocol: bytes for from-scratch models, HF / sentencepiece files for pretrained.

The pipeline only needs `encode` (no special tokens), `decode` and five ids. `bos_id` may be None: some
families (Qwen2 / Qwen2-VL) have no BOS token, and a sequence then starts with the chat template's text.
The image token is a placeholder the VLM overwrites with projected image features; a pretrained vocabulary
rarely has one, so when the named image token is missing it gets the first id past the vocabulary
(`vocab_size` grows by one) and `encode` never produces it. All tokenizers pickle (grain worker processes
need that).
Tokenizer files may live on `gs://` (read whole through `medcg.fileio`, then parsed from memory).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import sentencepiece
import tokenizers

from medcg import fileio


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline and the evaluators need from a tokenizer."""
  vocab_size: int
  bos_id: int | None  # None: the tokenizer has no BOS (nothing is prepended)
  eos_id: int
  pad_id: int
  image_token_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos or any other special token."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens (bos, eos, pad, image) are dropped."""
    ...


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then pad, bos, eos, image; vocab padded to a multiple of 8."""

  def __init__(self, vocab_multiple: int = 8):
    self.pad_id, self.bos_id, self.eos_id, self.image_token_id = 256, 257, 258, 259
    self.vocab_size = _round_up(260, vocab_multiple)

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return f"ByteTokenizer(vocab_size={self.vocab_size})"


# A `bos` of "" means "no BOS token" to both file tokenizers (an empty string is never a token).
NO_BOS = ""


def _resolve(token: int | str | None, lookup) -> int | None:
  """An id given as int, or as a token string looked up in the vocabulary (None if absent)."""
  if token is None or isinstance(token, int):
    return token
  return lookup(token)


def _specials(*ids: int | None) -> frozenset[int]:
  """The ids decode drops; a missing (None) bos is no id."""
  return frozenset(i for i in ids if i is not None)


class HFTokenizer:
  """A Hugging Face `tokenizers` JSON file (`tokenizer.json`) with named or numbered special tokens.

  bos/eos must exist in the vocabulary, except `bos=None` (or "") for a tokenizer without one (Qwen2):
  then `bos_id` is None. pad falls back to eos (padding is masked anyway); a missing image token gets
  the first id past the vocabulary.
  """

  def __init__(self, tokenizer_json_path: str | os.PathLike, *, bos: int | str | None = "<s>",
               eos: int | str = "</s>", pad: int | str | None = None, image: int | str = "<image>"):
    self.path = os.fspath(tokenizer_json_path)
    remote = fileio.is_remote(self.path)
    if not (fileio.path(self.path).is_file() if remote else os.path.isfile(self.path)):
      raise FileNotFoundError(f"HFTokenizer: tokenizer file not found: {self.path}")
    try:
      if remote:
        self._tok = tokenizers.Tokenizer.from_str(fileio.read_text(self.path))
      else:
        self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file.
      raise ValueError(f"HFTokenizer: cannot read {self.path}: {e}") from e
    base_size = self._tok.get_vocab_size(with_added_tokens=True)
    lookup = self._tok.token_to_id
    self.bos_id = None if bos is None or bos == NO_BOS else self._required(bos, "bos")
    self.eos_id = self._required(eos, "eos")
    pad_id = _resolve(pad, lookup)
    if pad is not None and pad_id is None:
      raise ValueError(f"HFTokenizer: pad token {pad!r} not in the vocabulary of {self.path}")
    self.pad_id = self.eos_id if pad_id is None else pad_id
    image_id = _resolve(image, lookup)
    self.image_token_id = base_size if image_id is None else image_id
    self.vocab_size = max(base_size, self.image_token_id + 1)
    self._specials = _specials(self.bos_id, self.eos_id, self.pad_id, self.image_token_id)

  def _required(self, token: int | str, what: str) -> int:
    found = _resolve(token, self._tok.token_to_id)
    if found is None:
      raise ValueError(f"HFTokenizer: {what} token {token!r} not in the vocabulary of {self.path}")
    return found

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) not in self._specials], skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
  """A sentencepiece model file; bos/eos/pad come from the model unless given (pad falls back to eos).

  A model without a BOS piece (trained with bos_id=-1), or `bos=""`, gives `bos_id` None (no BOS).
  """

  def __init__(self, model_path: str | os.PathLike, *, bos: int | str | None = None,
               eos: int | str | None = None, pad: int | str | None = None, image: int | str = "<image>"):
    self.path = os.fspath(model_path)
    remote = fileio.is_remote(self.path)
    if not (fileio.path(self.path).is_file() if remote else os.path.isfile(self.path)):
      raise FileNotFoundError(f"SentencePieceTokenizer: model file not found: {self.path}")
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      if remote:
        self._sp.LoadFromSerializedProto(fileio.path(self.path).read_bytes())
      else:
        self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"SentencePieceTokenizer: cannot read {self.path}: {e}") from e
    size = self._sp.GetPieceSize()

    def lookup(piece: str) -> int | None:
      i = self._sp.PieceToId(piece)
      # PieceToId answers unk for unknown pieces; only the unk piece itself may map there.
      return i if (i != self._sp.unk_id() or piece == self._sp.IdToPiece(i)) else None

    def pick(token, default: int, what: str) -> int:
      if token is None:
        if default < 0:
          raise ValueError(f"SentencePieceTokenizer: {self.path} defines no {what} token; pass `{what}=`")
        return default
      found = _resolve(token, lookup)
      if found is None:
        raise ValueError(f"SentencePieceTokenizer: {what} token {token!r} not in {self.path}")
      return found

    no_bos = bos == NO_BOS or (bos is None and self._sp.bos_id() < 0)
    self.bos_id = None if no_bos else pick(bos, self._sp.bos_id(), "bos")
    self.eos_id = pick(eos, self._sp.eos_id(), "eos")
    self.pad_id = pick(pad, self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id, "pad")
    image_id = _resolve(image, lookup)
    self.image_token_id = size if image_id is None else image_id
    self.vocab_size = max(size, self.image_token_id + 1)
    self._specials = _specials(self.bos_id, self.eos_id, self.pad_id, self.image_token_id)
    self._size = size

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids if int(i) not in self._specials and 0 <= int(i) < self._size])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


# Qwen2 / Qwen2-VL special tokens (ids of the Qwen2-VL checkpoints' tokenizer.json): the chat turns end with
# <|im_end|> (151645, the Instruct models' eos), <|endoftext|> (151643) pads, <|image_pad|> (151655) is the
# image placeholder between <|vision_start|> (151652) and <|vision_end|> (151653). There is no BOS.
QWEN_SPECIALS = {"eos": "<|im_end|>", "pad": "<|endoftext|>", "image": "<|image_pad|>"}
# Tokens the "qwen2_vl" chat template writes as text: they must be single (added) tokens of the file.
QWEN_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def qwen_tokenizer(path: str | os.PathLike, *, bos: int | str | None = None, eos: int | str = QWEN_SPECIALS["eos"],
                   pad: int | str = QWEN_SPECIALS["pad"], image: int | str = QWEN_SPECIALS["image"]) -> HFTokenizer:
  """A Qwen2-VL checkpoint's tokenizer: its tokenizer.json (or the checkpoint directory holding it), no BOS.

  Checks the chat-template tokens exist, so the "qwen2_vl" template cannot silently tokenize
  "<|im_start|>" as plain text.
  """
  path = os.fspath(path)
  if fileio.path(path).is_dir() if fileio.is_remote(path) else os.path.isdir(path):
    path = fileio.join(path, "tokenizer.json")
  tok = HFTokenizer(path, bos=bos, eos=eos, pad=pad, image=image)
  missing = [t for t in QWEN_TEMPLATE_TOKENS if tok._tok.token_to_id(t) is None]
  if missing:
    raise ValueError(f"qwen_tokenizer: {path} lacks the Qwen chat tokens {missing} (not a Qwen2 tokenizer.json?)")
  return tok


TOKENIZER_KINDS = ("byte", "hf", "sentencepiece", "qwen")


def _config_bos(value: Any) -> int | str | None:
  """tokenizer.bos: None (unset) keeps the default; "" or "none" (any case) means no BOS (NO_BOS)."""
  if isinstance(value, str) and value.strip().lower() in ("", "none"):
    return NO_BOS
  return value


def make_tokenizer(cfg: Mapping[str, Any] | Any) -> Tokenizer:
  """Builds a tokenizer from a config section (a ConfigDict or a dict).

  Fields: `kind` ("byte" | "hf" | "sentencepiece" | "qwen"); for the file kinds `path` (the tokenizer.json
  or .model file; for "qwen" also the checkpoint directory holding tokenizer.json) and optional `bos`,
  `eos`, `pad`, `image` (token strings or ids; unset: the kind's defaults). `bos: ""` or `bos: "none"`
  means the tokenizer has no BOS (a ConfigDict cannot tell an unset key from None, so None is "default").
  "qwen" defaults to no BOS, eos <|im_end|>, pad <|endoftext|>, image <|image_pad|>.
  """
  get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
  kind = get("kind", "byte")
  if kind == "byte":
    return ByteTokenizer()
  if kind not in TOKENIZER_KINDS:
    raise ValueError(f"tokenizer.kind={kind!r}: expected one of {TOKENIZER_KINDS}")
  path = get("path", None)
  if not path:
    what = "the tokenizer.json or the checkpoint directory" if kind == "qwen" else "the tokenizer file"
    raise ValueError(f"tokenizer.kind={kind!r} needs tokenizer.path ({what})")
  specials = {k: get(k, None) for k in ("bos", "eos", "pad", "image")}
  specials = {k: v for k, v in specials.items() if v is not None}
  if "bos" in specials:
    specials["bos"] = _config_bos(specials["bos"])
  if kind == "qwen":
    return qwen_tokenizer(path, **specials)
  if kind == "hf":
    return HFTokenizer(path, **specials)
  return SentencePieceTokenizer(path, **specials)


# Special tokens of corpus tokenizers, in id order 0..3 (the tokenizers trainer puts them first).
CORPUS_SPECIALS = ("<pad>", "<s>", "</s>", "<image>")


def train_corpus_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> "HFTokenizer":
  """A byte-level BPE `tokenizer.json` trained on `texts` (e.g. every prompt of a SynthMAT release).

  From-scratch models on CPU use it instead of raw bytes: a Med-MAT prompt is ~220 bytes but ~40 tokens
  of a 512-token BPE, which makes the decoder several times cheaper. Written atomically (local or gs://).
  """
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CORPUS_SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  path = os.fspath(path)
  fileio.atomic_write_text(path, tok.to_str(pretty=True))  # the bytes `tok.save(path)` writes
  return HFTokenizer(path, bos="<s>", eos="</s>", pad="<pad>", image="<image>")
