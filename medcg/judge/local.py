"""A medcg VLM as the judge: greedy decoding with a fixed seed, so medical images never leave the machine.

`VLMGenerator` is the `generate_fn(prompts, images) -> texts` a `LocalJudge` calls: it lays each judge
prompt out in a medcg chat template (`medcg.data.prompt`) with the image placeholders, resizes and
CLIP-normalises the image like the input pipeline and decodes with `medcg.model.vlm.generate` at
temperature 0 (greedy; the seed is fixed too, for the record). Batches are padded to `batch_size` rows and prompts to a
multiple of `length_multiple` tokens, so a run compiles a handful of shapes, not one per batch.

The judge identity is a fingerprint of the parameters, the model config, the tokenizer and the template,
so judgements of one checkpoint are never replayed for another.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from medcg import fileio
from medcg.data import pipeline
from medcg.data import prompt as prompt_lib
from medcg.judge.clients import LocalJudge
from medcg.model import vlm as vlm_lib


def model_fingerprint(model: nnx.Module, *extra: Any) -> str:
  """SHA-256 over every parameter (path, dtype, shape, bytes), the model config and `extra`.

  Reads every parameter to the host once: seconds for a 7B model, run once per judge run.
  """
  h = hashlib.sha256()
  state = nnx.state(model, nnx.Param)
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(state)[0], key=lambda kv: str(kv[0])):
    value = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  cfg = getattr(model, "cfg", None)
  h.update(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else str(cfg), sort_keys=True, default=str).encode())
  for e in extra:
    h.update(repr(e).encode())
  return h.hexdigest()


_PROBE = "Answer1\nunable to decide: situation two ~~~ Ünïcödé 123"


def tokenizer_signature(tokenizer) -> tuple:
  """What identifies a tokenizer's behaviour (not its file path): class, sizes, special ids, a probe's ids."""
  return (type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
          tokenizer.image_token_id, tuple(tokenizer.encode(_PROBE)))


class VLMGenerator:
  """`generate_fn(prompts, images) -> texts` for a medcg VLM: greedy, fixed seed, batched."""

  def __init__(self, model, tokenizer, *, image_size: int, template: str = "plain",
               max_new_tokens: int = 16, seed: int = 0, batch_size: int = 8, length_multiple: int = 256):
    if vlm_lib.trim_enabled(getattr(model, "trim_cfg", None)):
      raise ValueError("a VLM with TRIM on cannot judge: TRIM needs the CLIP-tokenized question, and a judge "
                       "prompt is far longer than CLIP's 77 tokens; load the judge with trim off")
    self.model, self.tokenizer = model, tokenizer
    self.image_size, self.max_new_tokens, self.seed = int(image_size), int(max_new_tokens), int(seed)
    self.template = prompt_lib.get_template(template)
    self.batch_size, self.length_multiple = int(batch_size), int(length_multiple)
    before, rest = self.template.prompt.split(prompt_lib.IMAGE_PLACEHOLDER)
    self._after_image, self._after_question = rest.split(prompt_lib.QUESTION_FIELD)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # Qwen2 tokenizers have no BOS
    self._head = bos + tokenizer.encode(before) + [tokenizer.image_token_id] * model.num_image_tokens
    eos = model.llm.cfg.eos_token_id
    eos = [tokenizer.eos_id] if eos is None else list(eos if isinstance(eos, (list, tuple)) else [eos])
    self.eos_ids = tuple(sorted({int(e) for e in eos} | {int(tokenizer.eos_id)}))

  @property
  def decoding(self) -> dict:
    return {"greedy": True, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
            "template": self.template.name, "image_size": self.image_size}

  def _encode(self, text: str) -> list[int]:
    return self._head + self.tokenizer.encode(self._after_image + text + self._after_question)

  def _image(self, image: np.ndarray) -> np.ndarray:
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    if img.size != (self.image_size, self.image_size):
      img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
    return np.asarray(img)

  def __call__(self, prompts: Sequence[str], images: Sequence[np.ndarray]) -> list[str]:
    if len(prompts) != len(images) or not 0 < len(prompts) <= self.batch_size:
      raise ValueError(f"{len(prompts)} prompts and {len(images)} images; expected 1..{self.batch_size} of each")
    ids = [self._encode(p) for p in prompts]
    images = list(images)
    pad_rows = self.batch_size - len(ids)  # repeat the last row: one compiled batch shape
    ids, images = ids + [ids[-1]] * pad_rows, images + [images[-1]] * pad_rows
    length = -(-max(len(i) for i in ids) // self.length_multiple) * self.length_multiple
    input_ids = np.full((len(ids), length), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for row, seq in enumerate(ids):
      input_ids[row, :len(seq)] = seq
      mask[row, :len(seq)] = 1
    pixels = pipeline.normalize_images([self._image(im) for im in images])
    tokens, lengths = vlm_lib.generate(self.model, pixels, input_ids, mask, max_new_tokens=self.max_new_tokens,
                                       eos_ids=self.eos_ids, pad_id=int(self.tokenizer.pad_id), temperature=0.0,
                                       rng=jax.random.key(self.seed))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [self.tokenizer.decode([t for t in tokens[i, :lengths[i]] if t not in self.eos_ids])
            for i in range(len(prompts))]


def vlm_judge(model, tokenizer, *, image_size: int, template: str = "plain", max_new_tokens: int = 16,
              seed: int = 0, batch_size: int = 8, name: str = "") -> LocalJudge:
  """A LocalJudge around a loaded medcg VLM; its identity fingerprints the weights and settings."""
  gen = VLMGenerator(model, tokenizer, image_size=image_size, template=template,
                     max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
  fp = model_fingerprint(model, tokenizer_signature(tokenizer), gen.template)
  identity = f"medcg:{name + '@' if name else ''}{fp[:16]}"
  return LocalJudge(gen, identity=identity, decoding=gen.decoding, batch_size=batch_size)


def medcg_judge(cfg: ml_collections.ConfigDict) -> LocalJudge:
  """The `judge.kind = "local"` judge: a local LLaVA-format safetensors checkpoint loaded as a medcg VLM.

  `cfg.checkpoint`: the checkpoint directory (config.json + *.safetensors, `LlavaForConditionalGeneration`);
  `cfg.tokenizer`: its tokenizer.json (default: the one in that directory); `cfg.chat_template`: a
  `medcg.data.prompt` template name; `cfg.dtype`: compute dtype. Images are resized to the vision tower's size.
  """
  from medcg.data import tokenizer as tok_lib
  from medcg.model import hf

  path = cfg.checkpoint
  if path and fileio.exists(fileio.join(path, "run.json")):  # a medcg.train workdir, local or gs://
    return _run_judge(cfg, path)
  if not path or not fileio.exists(fileio.join(path, "config.json")):
    raise ValueError(f"config judge.checkpoint={path!r}: expected a LLaVA / Qwen2-VL safetensors checkpoint directory "
                     "(with config.json) or a medcg.train workdir (with run.json)")
  arch = (hf.open_checkpoint(path).config.get("architectures") or ["?"])[0]
  tok_file = cfg.tokenizer or os.path.join(path, "tokenizer.json")
  is_qwen = arch in vlm_lib.qwen_vl.ARCHITECTURES
  tokenizer = tok_lib.qwen_tokenizer(tok_file) if is_qwen else tok_lib.HFTokenizer(tok_file)
  model = vlm_lib.load_vlm(path, dtype=cfg.dtype)
  if tokenizer.image_token_id != model.image_token_id:
    raise ValueError(f"config judge.tokenizer: its <image> id {tokenizer.image_token_id} differs from the "
                     f"checkpoint's image_token_index {model.image_token_id} ({path})")
  image_size = int(model.cfg.vision.image_size)
  template = "qwen2_vl" if is_qwen and cfg.chat_template == "llava_v1" else cfg.chat_template
  return vlm_judge(model, tokenizer, image_size=image_size, template=template,
                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                   name=os.path.basename(os.path.normpath(path)))


def _run_judge(cfg: ml_collections.ConfigDict, workdir: str) -> LocalJudge:
  """A medcg training run as judge: its latest checkpoint, tokenizer, image size and chat template."""
  from medcg.data import tokenizer as tok_lib
  from medcg.train import trainer
  model, run_cfg = trainer.load_model_from_workdir(workdir)
  tokenizer = tok_lib.make_tokenizer(run_cfg.data.tokenizer)
  return vlm_judge(model, tokenizer, image_size=run_cfg.data.image_size, template=run_cfg.data.chat_template,
                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                   name=os.path.basename(workdir.rstrip("/")))
