"""Hugging Face safetensors checkpoints -> sharded NNX params, by mapping tables.

Stable API (other model modules build on it):

  ckpt = open_checkpoint(path)          # dir with config.json + model.safetensors[.index.json]
  ckpt.config                           # dict from config.json
  ckpt.architecture                     # config["architectures"][0]
  ckpt.keys(), ckpt.shape(name), ckpt.get(name, index=None)   # lazy numpy reads

  table = MappingTable([Rule(param_path, hf_template, transform), ...], ignore=(regex, ...))
  table = named_table([(param_path, hf_template, transform), ...], ignore=[regex, ...])
  table.prefixed("llm.", {"model.": "model.language_model."})   # a sub-model's table
  state = load_params(abstract_state, ckpt, table, shardings=None)   # -> nnx.State
  check_architecture(ckpt, supported)   # CheckpointError naming an unsupported architecture

  llm_table(cfg)                        # LlamaForCausalLM / Qwen2ForCausalLM -> medcg.model.llm.LLM

A `Rule` maps one NNX param (dotted path in the state, e.g. "layers.attn.q.kernel") to one HF tensor
name. When `hf_template` holds `{i}` and the param path does not, the param is a scanned stack: HF
tensors `{i}=0..n-1` are stacked along the param's leading `layers` axis. When both hold `{i}`, the
rule expands over every matching param (unscanned layer lists).

Transforms say how a torch tensor becomes the NNX array: `IDENTITY`, `LINEAR` (torch Linear
`[out, in]` -> `[in, out]`), `CONV` (torch `(O, I, H, W)` -> `(H, W, I, O)`), `CONV3D` (`(O, I, T, H, W)` ->
`(I, T, H, W, O)`). After the permutation
each axis may be split into consecutive target axes (heads: `[H*D, E]` -> `[E, H, D]`); the target
shape comes from the abstract state, so one `LINEAR` rule covers q/k/v/o projections of any layout.

`load_params` builds every array with `jax.make_array_from_callback` on its target sharding; the
callback reads only the slice that device holds (whole heads / rows of the torch tensor), so a host
reads only what it holds. All problems (missing HF tensors, unused HF tensors, shape mismatches,
params without a rule) are collected and raised together in one `CheckpointError`.

Only safetensors are read. A directory with only pickle files (`.bin`, `.pt`, ...) is refused:
unpickling runs arbitrary code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# numpy has no bfloat16/float8; safetensors reads those through its flax backend (ml_dtypes arrays).
_NON_NUMPY_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the model."""


# ------------------------------------------------------------------------------------------------
# Checkpoint directory
# ------------------------------------------------------------------------------------------------


class Checkpoint:
  """A local HF checkpoint directory read lazily (tensors are read on `get`)."""

  def __init__(self, path: str, config: dict, key_to_file: Mapping[str, str]):
    self.path = path
    self.config = config
    self._key_to_file = dict(key_to_file)
    self._handles: dict[tuple[str, str], Any] = {}

  @property
  def architecture(self) -> str:
    archs = self.config.get("architectures") or []
    if not archs:
      raise CheckpointError(f"{self.path}/config.json has no 'architectures' entry")
    return archs[0]

  def keys(self) -> list[str]:
    return sorted(self._key_to_file)

  def __contains__(self, name: str) -> bool:
    return name in self._key_to_file

  def _handle(self, name: str, framework: str = "numpy"):
    if name not in self._key_to_file:
      raise KeyError(f"tensor {name!r} not in checkpoint {self.path}")
    file = self._key_to_file[name]
    key = (file, framework)
    if key not in self._handles:
      self._handles[key] = safe_open(os.path.join(self.path, file), framework=framework)
    return self._handles[key]

  def _slice(self, name: str):
    s = self._handle(name).get_slice(name)
    if s.get_dtype() in _NON_NUMPY_DTYPES:
      s = self._handle(name, "flax").get_slice(name)
    return s

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The safetensors dtype string, e.g. 'F32', 'BF16'."""
    return self._handle(name).get_slice(name).get_dtype()

  def get(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Reads tensor `name` (only `index`, a tuple of slices, when given) as a numpy array."""
    s = self._slice(name)
    if index is None:
      index = tuple(slice(None) for _ in s.get_shape())
    if not index:  # a 0-d tensor: slicing needs at least one axis
      return np.asarray(self._handle(name, "flax").get_tensor(name))
    return np.asarray(s[index])

  def close(self):
    """Drops the open file handles (they are reopened on the next read)."""
    self._handles.clear()


def open_checkpoint(path: str) -> Checkpoint:
  """Opens a local HF checkpoint dir: `config.json` + `model.safetensors` or a sharded index."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path!r} does not exist")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise CheckpointError(f"{path} has no config.json")
  try:
    with open(config_file) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e

  files = sorted(os.listdir(path))
  index_file = os.path.join(path, "model.safetensors.index.json")
  single_file = os.path.join(path, "model.safetensors")
  if os.path.isfile(index_file):
    with open(index_file) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index_file} has no 'weight_map'")
    missing = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(path, v))})
    if missing:
      raise CheckpointError(f"{index_file} names shard files that are missing: {missing}")
    key_to_file = weight_map
  elif os.path.isfile(single_file):
    with safe_open(single_file, framework="numpy") as f:
      key_to_file = {k: "model.safetensors" for k in f.keys()}
  else:
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickles:
      raise CheckpointError(
          f"{path} holds only pickle weights {pickles}; medcg never unpickles (it runs arbitrary "
          "code). Convert once with transformers: "
          "`AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`.")
    raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
  return Checkpoint(path, config, key_to_file)


# ------------------------------------------------------------------------------------------------
# Mapping tables
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
  """torch tensor -> NNX array: permute axes, then split axes into the target's axes."""
  name: str
  permutation: tuple[int, ...] | None = None

  def permuted_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    if self.permutation is None:
      return tuple(shape)
    if len(self.permutation) != len(shape):
      raise ValueError(
          f"{self.name} expects a {len(self.permutation)}-d tensor, got {tuple(shape)}")
    return tuple(shape[p] for p in self.permutation)


IDENTITY = Transform("identity")
LINEAR = Transform("linear", (1, 0))
CONV = Transform("conv", (2, 3, 1, 0))
CONV3D = Transform("conv3d", (1, 2, 3, 4, 0))  # torch Conv3d (O, I, T, H, W) -> (I, T, H, W, O)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One NNX param <- one HF tensor (a stack of them over `{i}` for scanned layers)."""
  param: str
  hf: str
  transform: Transform = IDENTITY


@dataclasses.dataclass(frozen=True)
class MappingTable:
  """The rules of one architecture, plus regexes of HF tensors that are deliberately not loaded."""
  rules: tuple[Rule, ...]
  ignore: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    object.__setattr__(self, "ignore", tuple(self.ignore))

  def prefixed(self, param_prefix: str = "", hf_prefixes: Mapping[str, str] | None = None
               ) -> "MappingTable":
    """The table for a sub-model: params under `param_prefix`, HF names with prefixes replaced.

    `hf_prefixes` maps a leading HF name prefix to its replacement, longest match first, e.g.
    `{"model.": "model.language_model.", "lm_head.": "lm_head."}` for LLaVA's language model.
    """
    hf_prefixes = dict(hf_prefixes or {})
    order = sorted(hf_prefixes, key=len, reverse=True)

    def rename(name: str) -> str:
      for p in order:
        if name.startswith(p):
          return hf_prefixes[p] + name[len(p):]
      return name

    def rename_regex(rx: str) -> str:
      for p in order:
        if rx.startswith(re.escape(p)):
          return re.escape(hf_prefixes[p]) + rx[len(re.escape(p)):]
      return rx

    rules = [Rule(param_prefix + r.param, rename(r.hf), r.transform) for r in self.rules]
    return MappingTable(tuple(rules), tuple(rename_regex(rx) for rx in self.ignore))

  def __add__(self, other: "MappingTable") -> "MappingTable":
    return MappingTable(self.rules + other.rules, self.ignore + other.ignore)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _split_groups(src: Sequence[int], dst: Sequence[int]) -> list[list[int]] | None:
  """Groups consecutive dst axes whose sizes multiply to each src axis; None if impossible."""
  groups, j = [], 0
  for size in src:
    if j >= len(dst):
      return None
    group, prod = [j], dst[j]
    j += 1
    while prod < size and j < len(dst):
      group.append(j)
      prod *= dst[j]
      j += 1
    if prod != size:
      return None
    groups.append(group)
  return groups if j == len(dst) else None


@dataclasses.dataclass
class _Plan:
  """How one target leaf is read: HF names (one per stacked layer, or one) and the transform."""
  hf_names: list[str]
  stacked: bool
  transform: Transform
  groups: list[list[int]]
  target_shape: tuple[int, ...]


def _read_block(ckpt: Checkpoint, name: str, plan: _Plan, index: tuple[slice, ...]) -> np.ndarray:
  """Reads the part of one HF tensor that lands in `index` of the (per-layer) target."""
  src_shape = ckpt.shape(name)
  perm = plan.transform.permutation or tuple(range(len(src_shape)))
  permuted = plan.transform.permuted_shape(src_shape)
  target = plan.target_shape[1:] if plan.stacked else plan.target_shape
  # For each permuted axis, read the rows covering the target slice of its first (outer) axis
  # when its inner axes are taken whole; otherwise read it whole and slice after reshaping.
  src_index, local_index, block_shape = [None] * len(src_shape), [], []
  for axis, group in enumerate(plan.groups):
    outer = index[group[0]].indices(target[group[0]])
    inner = int(np.prod([target[g] for g in group[1:]], dtype=np.int64))
    inner_whole = all(index[g].indices(target[g]) == (0, target[g], 1) for g in group[1:])
    if inner_whole and outer[2] == 1:
      src_index[perm[axis]] = slice(outer[0] * inner, outer[1] * inner)
      block_shape += [outer[1] - outer[0]] + [target[g] for g in group[1:]]
      local_index += [slice(None)] * len(group)
    else:
      src_index[perm[axis]] = slice(0, permuted[axis])
      block_shape += [target[g] for g in group]
      local_index += [index[g] for g in group]
  block = ckpt.get(name, tuple(src_index))
  if plan.transform.permutation is not None:
    block = np.transpose(block, plan.transform.permutation)
  return block.reshape(block_shape)[tuple(local_index)]


def _flat_params(state: nnx.State) -> list[tuple[str, Any]]:
  return [(".".join(str(k) for k in path), leaf) for path, leaf in nnx.to_flat_state(state)]


def _leaf_struct(leaf) -> jax.ShapeDtypeStruct:
  """The ShapeDtypeStruct inside an abstract Variable (or the leaf itself)."""
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def load_params(abstract_state: nnx.State, checkpoint: Checkpoint, table: MappingTable, *,
                shardings: Any = None) -> nnx.State:
  """Fills every leaf of `abstract_state` from `checkpoint` following `table`.

  `abstract_state`: the `nnx.State` (usually of `nnx.Param`s) of an `nnx.eval_shape`d model; leaves
  hold `jax.ShapeDtypeStruct`s, optionally with a sharding (`nnx.get_abstract_model`).
  `shardings`: optional pytree of `jax.sharding.Sharding` matching `abstract_state` (e.g.
  `nnx.get_named_sharding(state, mesh)`); else each leaf's own sharding, else the default device.
  Values are cast to the abstract dtype. Raises `CheckpointError` listing every problem by name.
  """
  flat = _flat_params(abstract_state)
  flat_shardings = None
  if shardings is not None:
    flat_shardings = dict(_flat_params(shardings))
  by_path = dict(flat)

  plans: dict[str, _Plan] = {}
  used: set[str] = set()
  covered: set[str] = set()
  missing, mismatched = [], []
  for rule in table.rules:
    param_has_i = "{i}" in rule.param
    if param_has_i:
      rx = re.compile("^" + re.escape(rule.param).replace(re.escape("{i}"), r"(\d+)") + "$")
      targets = [(p, m.group(1)) for p in by_path if (m := rx.match(p))]
    else:
      targets = [(rule.param, None)] if rule.param in by_path else []
    if not targets:
      mismatched.append(f"{rule.param}: no such param in the model (rule for {rule.hf})")
      continue
    for path, i in targets:
      covered.add(path)
      struct = _leaf_struct(by_path[path])
      target_shape = tuple(struct.shape)
      stacked = "{i}" in rule.hf and not param_has_i
      if stacked:
        names = [rule.hf.format(i=k) for k in range(target_shape[0])]
      else:
        names = [rule.hf.format(i=i) if i is not None else rule.hf]
      absent = [n for n in names if n not in checkpoint]
      missing += absent
      used.update(names)
      if absent:
        continue
      per_layer = target_shape[1:] if stacked else target_shape
      bad = None
      for n in names:
        try:
          permuted = rule.transform.permuted_shape(checkpoint.shape(n))
        except ValueError as e:
          bad = f"{n}: {e}"
          break
        groups = _split_groups(permuted, per_layer)
        if groups is None:
          bad = (f"{n}: checkpoint shape {checkpoint.shape(n)} ({rule.transform.name}) does not "
                 f"fit param {path} of shape {per_layer}" + (" per layer" if stacked else ""))
          break
      if bad:
        mismatched.append(bad)
        continue
      plans[path] = _Plan(names, stacked, rule.transform, groups, target_shape)
  unmapped = [p for p, _ in flat if p not in covered]
  ignore = [re.compile(rx) for rx in table.ignore]
  unexpected = [k for k in checkpoint.keys()
                if k not in used and not any(rx.fullmatch(k) for rx in ignore)]
  if missing or unexpected or mismatched or unmapped:
    lines = [f"checkpoint {checkpoint.path} does not match the model:"]
    if missing:
      lines.append(f"  missing HF tensors ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      lines.append(f"  unexpected HF tensors ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
      lines.append(f"  shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched))
    if unmapped:
      lines.append(f"  params without a mapping rule ({len(unmapped)}): " + ", ".join(unmapped))
    raise CheckpointError("\n".join(lines))

  def build(path: str, leaf) -> jax.Array:
    plan = plans[path]
    struct = _leaf_struct(leaf)
    sharding = (flat_shardings[path] if flat_shardings is not None
                else getattr(struct, "sharding", None))
    if isinstance(sharding, nnx.Variable):
      sharding = sharding.get_value()
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    dtype = struct.dtype

    read: dict[tuple, np.ndarray] = {}  # replicated shards on one host are read once

    def callback(index: tuple[slice, ...]) -> np.ndarray:
      index = tuple(index) + (slice(None),) * (len(plan.target_shape) - len(index))
      key = tuple(sl.indices(n) for sl, n in zip(index, plan.target_shape))
      if key not in read:
        if plan.stacked:
          layers = range(*index[0].indices(plan.target_shape[0]))
          blocks = [_read_block(checkpoint, plan.hf_names[k], plan, index[1:]) for k in layers]
          read[key] = np.stack(blocks).astype(dtype)
        else:
          read[key] = _read_block(checkpoint, plan.hf_names[0], plan, index).astype(dtype)
      return read[key]

    return jax.make_array_from_callback(plan.target_shape, sharding, callback)

  out = []
  for path_tuple, leaf in nnx.to_flat_state(abstract_state):
    path = ".".join(str(k) for k in path_tuple)
    array = build(path, leaf)
    out.append((path_tuple, leaf.replace(array) if isinstance(leaf, nnx.Variable) else array))
  return nnx.from_flat_state(out)


def unique_prefix(checkpoint: Checkpoint, suffix: str, what: str) -> str:
  """The one name prefix under which `checkpoint` holds a tensor named `*suffix` (where a sub-model lives, e.g.
  "model.visual." for "patch_embed.proj.weight"); raises naming `what` when there is none or several."""
  hits = sorted({k[:-len(suffix)] for k in checkpoint.keys() if k.endswith(suffix)})
  if len(hits) != 1:
    raise CheckpointError(f"{checkpoint.path}: cannot locate the {what} (expected exactly one tensor named "
                          f"'*{suffix}', found {len(hits)}: {hits})")
  return hits[0]


def check_architecture(checkpoint: Checkpoint, supported: Iterable[str]) -> str:
  """Returns the checkpoint's architecture, or raises naming it and the supported ones."""
  supported = tuple(supported)
  arch = checkpoint.architecture
  if arch not in supported:
    raise CheckpointError(
        f"{checkpoint.path}: unsupported architecture {arch!r}; supported: {', '.join(supported)}")
  return arch


def named_table(entries: Iterable[tuple[str, str, Transform]], ignore: Iterable[str] = ()
                ) -> MappingTable:
  """Builds a `MappingTable` from (param path, HF template, transform) tuples."""
  return MappingTable(tuple(Rule(*e) for e in entries), tuple(ignore))


# ------------------------------------------------------------------------------------------------
# Decoder LLM tables (LlamaForCausalLM, Qwen2ForCausalLM); param paths are medcg.model.llm.LLM's.
# ------------------------------------------------------------------------------------------------

LLM_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def llm_table(cfg) -> MappingTable:
  """The mapping table of `medcg.model.llm.LLM` built from `cfg` (see `llm.from_hf_config`)."""
  layer = "model.layers.{i}."
  entries = [
      ("embed.embedding", "model.embed_tokens.weight", IDENTITY),
      ("layers.input_norm.scale", layer + "input_layernorm.weight", IDENTITY),
      ("layers.post_attn_norm.scale", layer + "post_attention_layernorm.weight", IDENTITY),
      ("final_norm.scale", "model.norm.weight", IDENTITY),
  ]
  for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
    entries.append((f"layers.attn.{ours}.kernel", layer + f"self_attn.{theirs}.weight", LINEAR))
    if (cfg.qkv_bias and ours != "o") or (cfg.o_bias and ours == "o"):
      entries.append((f"layers.attn.{ours}.bias", layer + f"self_attn.{theirs}.bias", IDENTITY))
  for name in ("gate", "up", "down"):
    entries.append((f"layers.mlp.{name}.kernel", layer + f"mlp.{name}_proj.weight", LINEAR))
    if cfg.mlp_bias:
      entries.append((f"layers.mlp.{name}.bias", layer + f"mlp.{name}_proj.bias", IDENTITY))
  # Old checkpoints store RoPE buffers; tied models may still carry a copy of the embedding.
  ignore = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
  if cfg.tie_word_embeddings:
    ignore.append(r"lm_head\.weight")
  else:
    entries.append(("lm_head.kernel", "lm_head.weight", LINEAR))
  return named_table(entries, ignore)


__all__ = [
    "CONV", "CONV3D", "Checkpoint", "CheckpointError", "IDENTITY", "LINEAR", "LLM_ARCHITECTURES",
    "MappingTable", "Rule", "llm_table", "unique_prefix",
    "Transform", "check_architecture", "load_params", "named_table", "open_checkpoint",
]
