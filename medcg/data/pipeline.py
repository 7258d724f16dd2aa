"""grain input pipeline: a mixture of Med-MAT subsets to host-local batches (DEVELOPING.md batch contract).

Training: every mixture entry `(subset, split, n_samples)` selects exactly `n_samples` records of that
subset (a seeded permutation of its indices, or a label-balanced round robin over its captions as the
paper caps training subsets at 3,000 label-balanced). The selections are concatenated into one
random-access source, then `MapDataset.seed(seed).shuffle().repeat(num_epochs)` gives a global shuffle
that differs per epoch, and `[process_index::process_count]` gives each host a disjoint slice of that
stream (MaxText's grain recipe). Decode (Pillow) -> resize -> CLIP normalisation -> prompt + tokenize
run per host on its own slice only; batches are formed in the MapDataset so the worker count
(`mp_prefetch`) never changes which samples a batch holds. The iterator is a grain `DatasetIterator`:
save / restore it with `grain.checkpoint.CheckpointSave/CheckpointRestore` inside orbax's
`ocp.args.Composite` and a resumed run sees exactly the batches it would have seen.

Evaluation: every selected sample exactly once, in mixture order (indices ascending within an entry),
per-host slices padded so all hosts run the same number of batches; padding rows carry `valid=False`
and a zero loss mask (big_vision's padding trick). `include_answer=False` emits prompt-only sequences.

The `data` config section (`default_data_config()` gives all fields with defaults):
  shards_dir        root written by `python -m medcg.data convert` (manifest.json + shards)
  mixture           list of (subset, split, n_samples); subset as 3 / "03" / "Subset--03"; n_samples
                    None or -1 takes every record of that subset and split
  balance_labels    select label-balanced (round robin over captions) instead of uniformly
  image_size        output side S; images are resized (bicubic) when the shard size differs
  seq_len           L, fixed sequence length (right padding)
  num_image_tokens  image placeholder tokens in the prompt (the vision tower's token count)
  chat_template     "llava_v1" | "qwen2_vl" | "plain" (medcg.data.prompt.TEMPLATES)
  answer_format     "letter" (Med-MAT's: " B") | "text" (the option's text: " COVID-19"; see prompt.answer_text)
  truncation        "error" | "question" (see medcg.data.prompt.PromptEncoder)
  batch_size        per-host batch size
  num_epochs        None repeats forever (training)
  worker_count      grain worker processes (0: in-process)
  worker_buffer_size  batches buffered per worker process
  read_threads      threads per process preparing batches (grain ReadOptions.num_threads)
  prefetch_batches  batches prefetched per process (grain ReadOptions.prefetch_buffer_size)
  seed              selection and shuffle seed
  tokenizer         section for medcg.data.tokenizer.make_tokenizer (kind, path, bos, eos, pad, image)
  clip_text         TRIM's text (medcg.data.prompt.ClipTextEncoder): enabled, source ("question" |
                    "conversation"), max_len (77), tokenizer {kind: "byte" | "clip", path}; when enabled
                    every batch carries `text_ids` int32 (B, max_len). `with_clip_text` sets it from `trim`.

No TensorFlow is imported on this path (tests/test_no_tensorflow.py).
"""
from __future__ import annotations

import dataclasses
import io
import math
import zlib
from typing import Any, Iterable, Protocol, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np
from PIL import Image

from medcg import mat
from medcg.data import features
from medcg.data.prompt import ClipTextEncoder, PromptEncoder
from medcg.data.tokenizer import Tokenizer

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# x_norm = (x / 255 - mean) / std folded into one multiply-add per pixel.
_PIXEL_SCALE = (1.0 / (255.0 * CLIP_STD)).astype(np.float32)
_PIXEL_OFFSET = (-CLIP_MEAN / CLIP_STD).astype(np.float32)

# Fields that stay on the host (dtype object); everything else is a numeric array.
HOST_KEYS = ("sample_id", "answer", "options")


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` config section with every field the pipeline reads (see the module docstring)."""
  cfg = ml_collections.ConfigDict()
  cfg.shards_dir = ""
  cfg.mixture = []
  cfg.balance_labels = False
  cfg.image_size = 336
  cfg.seq_len = 256
  cfg.num_image_tokens = 576
  cfg.chat_template = "llava_v1"
  cfg.answer_format = "letter"
  cfg.truncation = "error"
  cfg.batch_size = 8
  cfg.num_epochs = ml_collections.config_dict.placeholder(int)
  cfg.worker_count = 0
  cfg.worker_buffer_size = 2
  cfg.read_threads = 1
  cfg.prefetch_batches = 2
  cfg.seed = 0
  cfg.tokenizer = ml_collections.ConfigDict({"kind": "byte", "path": "", "bos": None, "eos": None,
                                             "pad": None, "image": None})
  cfg.clip_text = ml_collections.ConfigDict({
      "enabled": False, "source": "question", "max_len": 77,
      "tokenizer": ml_collections.ConfigDict({"kind": "byte", "path": ""})})
  return cfg


def with_clip_text(data_cfg, trim_cfg, *, training: bool) -> ml_collections.ConfigDict:
  """A copy of `data_cfg` whose `clip_text` follows the `trim` section (TRIM needs the text per example).

  Training scores against `trim.text_source`, evaluation against `trim.eval_text_source` (default
  "question"): the released TRIM trains on the whole conversation and evaluates on the question.
  """
  d = ml_collections.ConfigDict(data_cfg.to_dict())
  if "clip_text" not in d:
    d.clip_text = default_data_config().clip_text
  enabled = bool(trim_cfg is not None and trim_cfg.get("enabled", False))
  d.clip_text.enabled = enabled
  if enabled:
    key = "text_source" if training else "eval_text_source"
    d.clip_text.source = trim_cfg.get(key) or "question"
  return d


class ShardCatalog(Protocol):
  """Where the pipeline gets records: subsets present per split and a random-access source per subset."""

  def subsets(self, split: str) -> Sequence[int]:
    ...

  def source(self, subset: int, split: str) -> grain.sources.RandomAccessDataSource:
    ...


class _ManifestCatalog:
  """The shards written by `python -m medcg.data convert` (medcg.data.shards)."""

  def __init__(self, root: str):
    from medcg.data import shards  # the shard layer is only needed when reading real shards
    self._shards = shards
    self.root = root
    self.manifest = shards.Manifest.load(root)

  def subsets(self, split: str) -> Sequence[int]:
    return self.manifest.subsets(split)

  def source(self, subset: int, split: str):
    return self._shards.subset_source(self.manifest, subset, split)


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  subset: int
  split: str
  n_samples: int | None


def parse_mixture(mixture: Iterable[Sequence[Any]]) -> list[MixtureEntry]:
  """Validates `data.mixture` entries (subset, split, n_samples) and normalises subset ids."""
  entries = []
  for i, entry in enumerate(mixture):
    if len(entry) != 3:
      raise ValueError(f"data.mixture[{i}]={entry!r}: expected (subset, split, n_samples)")
    subset, split, n = entry
    try:
      subset_id = mat.get(subset).id
    except KeyError as e:
      raise ValueError(f"data.mixture[{i}]={tuple(entry)!r}: unknown subset {subset!r}") from e
    if n is not None and n != -1 and (not isinstance(n, (int, np.integer)) or n < 1):
      raise ValueError(f"data.mixture[{i}]={tuple(entry)!r}: n_samples must be a positive int, None or -1")
    entries.append(MixtureEntry(subset_id, str(split), None if n in (None, -1) else int(n)))
  if not entries:
    raise ValueError("data.mixture is empty")
  return entries


def _entry_rng(seed: int, entry: MixtureEntry) -> np.random.Generator:
  # Independent of the entry's position, so editing one entry leaves the others' selections alone.
  return np.random.default_rng([seed, entry.subset, zlib.crc32(entry.split.encode())])


def _balanced_pick(labels: Sequence[str], n: int, rng: np.random.Generator) -> np.ndarray:
  """n indices spread as evenly as the label counts allow: round robin over labels, seeded within each."""
  by_label: dict[str, list[int]] = {}
  for i, label in enumerate(labels):
    by_label.setdefault(label, []).append(i)
  queues = [rng.permutation(np.asarray(by_label[k])) for k in sorted(by_label)]
  picked: list[int] = []
  depth = 0
  while len(picked) < n:
    for q in queues:
      if depth < len(q) and len(picked) < n:
        picked.append(int(q[depth]))
    depth += 1
  return np.asarray(picked, np.int64)


def select_indices(source, entry: MixtureEntry, *, seed: int, balance_labels: bool,
                   where: str) -> np.ndarray:
  """The record indices of `entry` (exactly n_samples; all of them when n_samples is None)."""
  available = len(source)
  n = available if entry.n_samples is None else entry.n_samples
  if n > available:
    raise ValueError(f"{where}: asks for {n} samples but subset {entry.subset:02d} split "
                     f"{entry.split!r} has only {available}")
  rng = _entry_rng(seed, entry)
  if balance_labels and n < available:
    labels = [features.parse_example(source[i], f"{where} record {i}")["caption"] for i in range(available)]
    return _balanced_pick(labels, n, rng)
  return rng.permutation(available)[:n].astype(np.int64)


class MixtureSource(grain.sources.RandomAccessDataSource):
  """The concatenated selections: index -> (serialized record, a name for error messages)."""

  def __init__(self, sources: Sequence[Any], entries: Sequence[MixtureEntry], indices: Sequence[np.ndarray]):
    self._sources = list(sources)
    self._entries = list(entries)
    self._indices = [np.asarray(ix, np.int64) for ix in indices]
    self._offsets = np.cumsum([0] + [len(ix) for ix in self._indices])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def locate(self, index: int) -> tuple[int, int]:
    """(entry position, record index in its subset) of a mixture index."""
    if not 0 <= index < len(self):
      raise IndexError(f"mixture index {index} out of range [0, {len(self)})")
    k = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return k, int(self._indices[k][index - self._offsets[k]])

  def __getitem__(self, index: int) -> tuple[bytes, str]:
    k, record = self.locate(int(index))
    entry = self._entries[k]
    return self._sources[k][record], f"subset {entry.subset:02d} split {entry.split!r} record {record}"

  def fixed_order(self) -> np.ndarray:
    """Mixture indices in evaluation order: entries in mixture order, record indices ascending."""
    return np.concatenate([off + np.argsort(ix, kind="stable")
                           for off, ix in zip(self._offsets[:-1], self._indices)])

  def __repr__(self) -> str:
    parts = ", ".join(f"{e.subset:02d}/{e.split}:{len(ix)}" for e, ix in zip(self._entries, self._indices))
    return f"MixtureSource({parts})"


def build_mixture(data_cfg, *, seed: int, catalog: ShardCatalog | None = None) -> MixtureSource:
  """Opens every mixture entry's shards and selects its samples (errors name the entry)."""
  entries = parse_mixture(data_cfg.mixture)
  catalog = catalog if catalog is not None else _ManifestCatalog(data_cfg.shards_dir)
  sources, indices = [], []
  for i, entry in enumerate(entries):
    where = f"data.mixture[{i}]=({entry.subset:02d}, {entry.split!r}, {entry.n_samples})"
    present = catalog.subsets(entry.split)
    if entry.subset not in present:
      raise ValueError(f"{where}: subset {entry.subset:02d} split {entry.split!r} is not in the shards "
                       f"at {data_cfg.shards_dir!r} (present: {sorted(present)})")
    source = catalog.source(entry.subset, entry.split)
    sources.append(source)
    indices.append(select_indices(source, entry, seed=seed, balance_labels=data_cfg.balance_labels,
                                  where=where))
  return MixtureSource(sources, entries, indices)


def decode_image(png: bytes, image_size: int, where: str) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 (S, S, 3) RGB. Resizes (bicubic) only when the stored size differs."""
  try:
    with Image.open(io.BytesIO(png)) as img:
      if img.size != (image_size, image_size):
        # JPEG can decode at a reduced scale directly; a no-op for PNG.
        img.draft("RGB", (image_size, image_size))
      if img.mode != "RGB":
        img = img.convert("RGB")
      if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC,
                         reducing_gap=3.0 if min(img.size) >= 3 * image_size else None)
      pixels = np.asarray(img)
  except (OSError, ValueError) as e:
    raise ValueError(f"{where}: cannot decode the image ({e})") from e
  return pixels


def normalize_images(images: Sequence[np.ndarray]) -> np.ndarray:
  """uint8 (S, S, 3) images -> float32 (N, S, S, 3), CLIP mean/std normalised.

  Works on rows of S*3 values with the per-channel constants tiled along them: broadcasting a (3,)
  array over a last axis of 3 gives numpy an inner loop of length 3, about 5x slower.
  """
  n, (height, width, channels) = len(images), images[0].shape
  out = np.empty((n, height, width, channels), np.float32)
  rows = out.reshape(n, height, width * channels)
  for i, image in enumerate(images):
    rows[i] = image.reshape(height, width * channels)  # the uint8 -> float32 cast
  rows *= np.tile(_PIXEL_SCALE, width)
  rows += np.tile(_PIXEL_OFFSET, width)
  return out


class Preprocess(grain.transforms.Map):
  """One record -> one example dict (numeric arrays plus host-only fields; the image stays uint8)."""

  def __init__(self, encoder: PromptEncoder, image_size: int, include_answer: bool = True,
               clip_encoder: ClipTextEncoder | None = None):
    self.encoder = encoder
    self.image_size = image_size
    self.include_answer = include_answer
    self.clip_encoder = clip_encoder

  def map(self, element: tuple[bytes, str] | tuple[bytes, str, bool]) -> dict[str, Any]:
    """element: (serialized record, its name for errors[, valid: False marks an eval padding row])."""
    raw, where = element[0], element[1]
    valid = bool(element[2]) if len(element) > 2 else True
    record = features.parse_example(raw, where)
    try:
      tokens = self.encoder.encode(record, include_answer=self.include_answer)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
    if not valid:
      tokens["loss_mask"] = np.zeros_like(tokens["loss_mask"])
    if self.clip_encoder is not None:
      tokens["text_ids"] = self.clip_encoder.encode(record, include_answer=self.include_answer)
    return {
        "image": decode_image(record["image"], self.image_size, where),  # normalised per batch
        **tokens,
        "answer_idx": np.int32(features.answer_index(record)),  # -1 / 0 options: a detection row
        "num_options": np.int32(len(record["options"])),
        "subset": np.int32(record["subset"]),
        "valid": np.bool_(valid),
        "sample_id": record["sample_id"] if valid else "",
        "answer": record["answer"],
        "options": tuple(record["options"]),
    }


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks numeric fields, normalises the uint8 images; host-only fields become object arrays (B,)."""
  batch = {}
  for key in examples[0]:
    if key == "image":
      batch[key] = normalize_images([ex[key] for ex in examples])
    elif key in HOST_KEYS:
      column = np.empty((len(examples),), dtype=object)
      column[:] = [ex[key] for ex in examples]  # slice assignment keeps tuples as elements
      batch[key] = column
    else:
      batch[key] = np.stack([ex[key] for ex in examples])
  return batch


def _read_options(data_cfg) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=data_cfg.prefetch_batches)


def _to_iter(ds: grain.MapDataset, data_cfg) -> grain.IterDataset:
  it_ds = ds.to_iter_dataset(_read_options(data_cfg))
  if data_cfg.worker_count > 0:
    # grain's worker processes read absl flags; outside absl.app.run (notebooks, pytest) nothing
    # parsed them, so use their defaults instead of failing in the worker.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=data_cfg.worker_count, per_worker_buffer_size=data_cfg.worker_buffer_size))
  return it_ds


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only when the caller does not say which host this is
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  return process_index, process_count


def make_encoder(data_cfg, tokenizer: Tokenizer) -> PromptEncoder:
  return PromptEncoder(tokenizer, data_cfg.chat_template, num_image_tokens=data_cfg.num_image_tokens,
                       seq_len=data_cfg.seq_len, truncation=data_cfg.truncation,
                       answer_format=data_cfg.get("answer_format", "letter"))


def make_clip_encoder(data_cfg) -> ClipTextEncoder | None:
  """TRIM's text encoder when `data.clip_text.enabled`, else None (no `text_ids` in the batches)."""
  clip_cfg = data_cfg.get("clip_text")
  if clip_cfg is None or not clip_cfg.get("enabled", False):
    return None
  return ClipTextEncoder(clip_cfg, data_cfg.chat_template)


def make_preprocess(data_cfg, tokenizer: Tokenizer, include_answer: bool = True) -> Preprocess:
  """The per-record transform for `data_cfg` (prompt tokens, image, and TRIM's text when enabled)."""
  return Preprocess(make_encoder(data_cfg, tokenizer), data_cfg.image_size, include_answer,
                    clip_encoder=make_clip_encoder(data_cfg))


def make_train_dataset(data_cfg, tokenizer: Tokenizer, *, seed: int | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       catalog: ShardCatalog | None = None) -> grain.IterDataset:
  """The training IterDataset of full batches (drop_remainder) for this host.

  seed defaults to `data_cfg.seed`; process_index/count default to jax's. `catalog` replaces the
  shards at `data_cfg.shards_dir` (any object with `subsets(split)` and `source(subset, split)`).
  """
  seed = data_cfg.seed if seed is None else seed
  process_index, process_count = _process(process_index, process_count)
  source = build_mixture(data_cfg, seed=seed, catalog=catalog)
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(data_cfg.num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.map(make_preprocess(data_cfg, tokenizer))
  ds = ds.batch(data_cfg.batch_size, drop_remainder=True, batch_fn=collate)
  return _to_iter(ds, data_cfg)


def make_train_iterator(data_cfg, tokenizer: Tokenizer, **kwargs) -> grain.DatasetIterator:
  """A checkpointable iterator over `make_train_dataset` batches (same keyword arguments)."""
  return iter(make_train_dataset(data_cfg, tokenizer, **kwargs))


class _EvalSource(grain.sources.RandomAccessDataSource):
  """This host's share of the mixture in fixed order, padded with a marked copy of record 0."""

  def __init__(self, mixture: MixtureSource, host_indices: np.ndarray, padded_len: int):
    self._mixture = mixture
    self._host_indices = host_indices
    self._padded_len = padded_len

  def __len__(self) -> int:
    return self._padded_len

  def __getitem__(self, index: int) -> tuple[bytes, str, bool]:
    if index < len(self._host_indices):
      return (*self._mixture[int(self._host_indices[index])], True)
    raw, where = self._mixture[0]
    return raw, f"{where} (padding)", False


def eval_num_batches(num_samples: int, batch_size: int, process_count: int) -> int:
  """Batches every host runs in evaluation: enough for the largest per-host slice."""
  return max(1, math.ceil(math.ceil(num_samples / process_count) / batch_size))


def make_eval_dataset(data_cfg, tokenizer: Tokenizer, *, include_answer: bool = True,
                      process_index: int | None = None, process_count: int | None = None,
                      catalog: ShardCatalog | None = None) -> grain.IterDataset:
  """Every selected sample once, mixture order, per-host slice padded to full batches (`valid` marks real rows)."""
  process_index, process_count = _process(process_index, process_count)
  mixture = build_mixture(data_cfg, seed=data_cfg.seed, catalog=catalog)
  host_indices = mixture.fixed_order()[process_index::process_count]
  num_batches = eval_num_batches(len(mixture), data_cfg.batch_size, process_count)
  source = _EvalSource(mixture, host_indices, num_batches * data_cfg.batch_size)
  ds = grain.MapDataset.source(source)
  ds = ds.map(make_preprocess(data_cfg, tokenizer, include_answer))
  ds = ds.batch(data_cfg.batch_size, drop_remainder=True, batch_fn=collate)
  return _to_iter(ds, data_cfg)


def eval_batch_count(data_cfg, *, process_count: int | None = None, catalog: ShardCatalog | None = None) -> int:
  """How many batches `make_eval_dataset` yields on every host (a progress bar's total)."""
  _, process_count = _process(0, process_count)
  mixture = build_mixture(data_cfg, seed=data_cfg.seed, catalog=catalog)
  return eval_num_batches(len(mixture), data_cfg.batch_size, process_count)


def make_eval_iterator(data_cfg, tokenizer: Tokenizer, **kwargs) -> grain.DatasetIterator:
  """An iterator over `make_eval_dataset` batches (same keyword arguments)."""
  return iter(make_eval_dataset(data_cfg, tokenizer, **kwargs))
