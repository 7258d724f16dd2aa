"""TRIM token reduction (arXiv 2409.10994): public function, XLA reference, dispatcher.

Scores, the IQR rule and the keep counts (`probs`, `iqr_upper_bound`, `keep_counts`, `MODES`) live in
`trim_common.py`, which the Pallas kernels (`trim_pallas.py`) import too.

TRIM keeps the image tokens whose CLIP patch embedding is *least* similar to the question (the
released code takes `softmax(-s)` and keeps its upper outliers) and appends the unweighted mean of
the dropped tokens. See `../shared/reference/trim.md` §1 for the released algorithm.

Contract (static shapes for `jax.jit`):

  trim(hidden, image_embeds, text_embeds, *, k_max, mode, ratio, impl) -> (tokens, count)

  hidden (B, N, D)        patch features that go to the projector (any float dtype)
  image_embeds (B, N, E)  visual_projection(post_layernorm(hidden)), scored in float32
  text_embeds (B, E)      CLIP text embeddings (not normalised)
  s = image_embeds . text (plain dot), p = softmax(-s) over N
  mode "iqr_batch"   Q1, Q3 of the whole batch's p (linear interpolation), ub = Q3 + 1.5 IQR,
                     K = #{p > ub} // B shared by the batch (the released code)
       "iqr_example" the same rule per example: K_b = #{p_b > ub_b}
       "ratio"       K = int(N * ratio)
  tokens (B, k_max+1, D)  rows 0..K'-1 kept tokens in raster order, row K' the mean of the other
                          N-K' tokens (zeros if none), rows after K' zero; K' = min(K, k_max)
  count (B,) int32        K' + 1

Selection: each example keeps its K' largest p. Ties in p are broken by the lowest token index
first (stable descending order), in this reference, the test's NumPy port and both kernels.

K uses exact integer arithmetic. The released code computes `int(N * (c / (B*N)))` in float64; that
equals `c // B` for N = 576 and every power-of-two N (checked for B <= 128), but is one lower for
some counts when N is e.g. 196 or 729. We keep the exact value.

Implementations (`impl`):
  "xla"         readable jnp reference (the oracle); differentiable everywhere.
  "pallas_gpu"  Triton kernels (`trim_pallas.py`), "pallas_tpu" Mosaic kernels; `interpret=True`
                runs either on CPU (the TPU one under `pltpu.InterpretParams`). Their backward
                pass is routed through the XLA reference (a custom_vjp that recomputes the
                selection with `trim_xla` and transposes it), so gradients reach `hidden` only;
                the selection is piecewise constant in the embeddings, whose gradient is zero
                (as in the XLA path).
  "auto"        the GPU kernel on GPU, the TPU kernel on TPU, otherwise "xla" (logged once). The
                platform is that of the current mesh's devices (`jax.set_mesh`, which
                `medcg.train.sharding.use_mesh` sets, or the enclosing `shard_map`), else
                `jax.default_backend()`: a CPU host compiling for a TPU topology's (or a deviceless
                GPU client's) mesh gets that target's kernel, not the XLA path.

Meshes: the Pallas calls are custom calls that XLA does not partition (Mosaic refuses sharded
operands; a Triton call makes XLA all-gather the batch so every device runs every example). So
when a kernel is taken and a mesh is current, `trim` runs it under `jax.shard_map` over the mesh
axes that the "act_batch" rule maps to (the rules of `sharding.use_mesh`, else `sharding.RULES`)
and that divide B; the other axes see the whole (local) batch. Axes already manual (inside a
caller's `shard_map`) are left alone. Interpret mode needs `check_vma=False` there; compiled
kernels declare their outputs' varying axes. The backward pass runs per shard as well.

Batch scope: "iqr_batch" pools whatever batch one call sees. On the kernel path under a mesh that
is each batch shard, as the released training did per device (a micro-batch of 4). The XLA path
is left to GSPMD and pools the global batch (call it inside `shard_map` to pool per shard).

`trim_features(cfg, ...)` is the helper the VLM calls: it reads a config section (`mode`, `k_max`,
`ratio`, `impl`, optional `interpret`) and also returns the (B, k_max+1) validity mask of the slots.
"""
from __future__ import annotations

import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from medcg.kernels import trim_common

IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu")


# ----------------------------------------------------------------------------- checks and slots
# (scores, the IQR rule and keep counts, shared with the kernels, are in trim_common)

def slot_mask(count: jax.Array, k_max: int) -> jax.Array:
  """(B, k_max+1) bool: True on the `count` leading slots that hold tokens."""
  return jnp.arange(k_max + 1)[None, :] < count[:, None]


def _check(hidden, image_embeds, text_embeds, k_max, mode, ratio, impl):
  if hidden.ndim != 3 or image_embeds.ndim != 3 or text_embeds.ndim != 2:
    raise ValueError(
        "trim: expected hidden (B,N,D), image_embeds (B,N,E), text_embeds (B,E); got "
        f"{hidden.shape}, {image_embeds.shape}, {text_embeds.shape}")
  b, n, _ = hidden.shape
  if image_embeds.shape[:2] != (b, n) or text_embeds.shape != (b, image_embeds.shape[2]):
    raise ValueError(
        f"trim: shape mismatch: hidden {hidden.shape}, image_embeds {image_embeds.shape}, "
        f"text_embeds {text_embeds.shape}")
  if mode not in trim_common.MODES:
    raise ValueError(f"trim: unknown mode {mode!r}; expected one of {trim_common.MODES}")
  if impl not in IMPLS:
    raise ValueError(f"trim: unknown impl {impl!r}; expected one of {IMPLS}")
  if not isinstance(k_max, int) or not 0 <= k_max <= n:
    raise ValueError(f"trim: k_max must be an int in [0, N={n}], got {k_max!r}")
  if mode == "ratio":
    if ratio is None or not 0.0 <= float(ratio) <= 1.0:
      raise ValueError(f"trim: mode='ratio' needs ratio in [0, 1], got {ratio!r}")
  elif ratio is not None:
    raise ValueError(f"trim: ratio={ratio!r} is only used with mode='ratio', not {mode!r}")


# ----------------------------------------------------------------------------- XLA reference

def select_and_pool(hidden: jax.Array, p: jax.Array, k: jax.Array, k_max: int):
  """Keeps the min(k, k_max) largest-p tokens of each example in raster order, then their mean.

  Args:
    hidden: (B, N, D) features.
    p: (B, N) float32 selection scores (larger = kept first; ties: lower index first).
    k: (B,) int32 wanted keep counts.
    k_max: static capacity.

  Returns:
    tokens (B, k_max+1, D) in hidden's dtype and count (B,) int32.
  """
  b, n, _ = hidden.shape
  k_eff = jnp.minimum(k, k_max).astype(jnp.int32)
  # Stable sort of -p: equal p keep raster order, so the lowest index ranks first.
  order = jnp.argsort(-p, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  keep = rank < k_eff[:, None]
  # Kept indices in raster order first (stable sort of ~keep), padded by the rest.
  kept_idx = jnp.argsort(~keep, axis=-1, stable=True)
  kept_idx = jnp.pad(kept_idx, ((0, 0), (0, max(0, k_max + 1 - n))))[:, :k_max + 1]
  gathered = jnp.take_along_axis(hidden.astype(jnp.float32), kept_idx[:, :, None], axis=1)
  rest = jnp.sum(jnp.where(keep[:, :, None], 0.0, hidden.astype(jnp.float32)), axis=1)
  n_rest = (n - k_eff).astype(jnp.float32)
  mean = jnp.where(n_rest[:, None] > 0, rest / jnp.maximum(n_rest, 1.0)[:, None], 0.0)
  slot = jnp.arange(k_max + 1)[None, :, None]
  tokens = jnp.where(slot < k_eff[:, None, None], gathered,
                     jnp.where(slot == k_eff[:, None, None], mean[:, None, :], 0.0))
  return tokens.astype(hidden.dtype), k_eff + 1


def trim_xla(hidden, image_embeds, text_embeds, *, k_max, mode="iqr_batch", ratio=None):
  """The jnp reference of `trim` (the oracle the kernels are tested against)."""
  p = trim_common.probs(image_embeds, text_embeds)
  return select_and_pool(hidden, p, trim_common.keep_counts(p, mode, ratio), k_max)


# ----------------------------------------------------------------------------- dispatch

@functools.cache
def _log_fallback_once(platform: str) -> None:
  logging.info("trim: impl='auto' on platform %r has no Pallas kernel; using the XLA reference",
               platform)


def current_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh in context (`jax.set_mesh`, `sharding.use_mesh`, inside `shard_map`), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def target_platform() -> str:
  """Platform the program is built for: the current mesh's devices, else the default backend."""
  mesh = current_mesh()
  device = getattr(mesh, "abstract_device", None) if mesh is not None else None
  return getattr(device, "platform", None) or jax.default_backend()


def resolve_impl(impl: str) -> str:
  """Maps 'auto' to the kernel for the target platform (`target_platform`), or to 'xla' (logged
  once)."""
  if impl != "auto":
    return impl
  platform = target_platform()
  if platform in ("gpu", "cuda", "rocm"):
    return "pallas_gpu"
  if platform == "tpu":
    return "pallas_tpu"
  _log_fallback_once(platform)
  return "xla"


def batch_axes(mesh: jax.sharding.AbstractMesh, batch: int) -> tuple[str, ...]:
  """Mesh axes that split a batch of `batch` examples: the "act_batch" rule's axes (current rules
  of `sharding.use_mesh`, else the defaults) that have size > 1, divide `batch` and are not
  already manual."""
  from medcg.train import sharding as shd  # pylint: disable=g-import-not-at-top
  # The rules use_mesh made current; a bare jax.set_mesh gets the defaults.
  ctx = getattr(shd, "_CTX", None)
  rules = ctx.rules if ctx is not None and ctx.mesh is not None else shd.RULES
  entry = shd.logical_to_spec(("act_batch",), (batch,), mesh, rules)[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  # Dropping axes keeps divisibility (a divisor of a divisor of B divides B).
  return tuple(a for a in axes if a not in mesh.manual_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _trim_pallas(hidden, image_embeds, text_embeds, k_max, mode, ratio, backend, interpret):
  from medcg.kernels import trim_pallas  # pylint: disable=g-import-not-at-top
  return trim_pallas.trim_pallas(hidden, image_embeds, text_embeds, k_max=k_max, mode=mode,
                                 ratio=ratio, backend=backend, interpret=interpret)


def _trim_pallas_fwd(hidden, image_embeds, text_embeds, k_max, mode, ratio, backend, interpret):
  out = _trim_pallas(hidden, image_embeds, text_embeds, k_max, mode, ratio, backend, interpret)
  return out, (hidden, image_embeds, text_embeds)


def _trim_pallas_bwd(k_max, mode, ratio, backend, interpret, residuals, cotangents):
  # The selection is piecewise constant in the embeddings, so only `hidden` gets a gradient; the
  # XLA reference recomputes the (identical) selection and applies its linear map's transpose.
  del backend, interpret
  hidden, image_embeds, text_embeds = residuals
  d_tokens, _ = cotangents
  _, vjp = jax.vjp(
      lambda h: trim_xla(h, image_embeds, text_embeds, k_max=k_max, mode=mode, ratio=ratio)[0],
      hidden)
  (d_hidden,) = vjp(d_tokens)
  return d_hidden, jnp.zeros_like(image_embeds), jnp.zeros_like(text_embeds)


_trim_pallas.defvjp(_trim_pallas_fwd, _trim_pallas_bwd)


def trim(hidden: jax.Array, image_embeds: jax.Array, text_embeds: jax.Array, *, k_max: int,
         mode: str = "iqr_batch", ratio: float | None = None, impl: str = "auto",
         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """TRIM token reduction; see the module docstring for the full contract.

  Args:
    hidden: (B, N, D) patch features.
    image_embeds: (B, N, E) projected patch embeddings used for scoring.
    text_embeds: (B, E) CLIP text embeddings.
    k_max: static capacity (0 <= k_max <= N); tokens has k_max + 1 rows.
    mode: "iqr_batch" (released code), "iqr_example" or "ratio".
    ratio: keep fraction for mode="ratio".
    impl: "auto", "xla", "pallas_gpu" or "pallas_tpu".
    interpret: run a Pallas kernel in interpret mode (CPU testing); ignored for "xla".

  Returns:
    tokens (B, k_max+1, D) in hidden's dtype and count (B,) int32.
  """
  _check(hidden, image_embeds, text_embeds, k_max, mode, ratio, impl)
  impl = resolve_impl(impl)
  if impl == "xla":
    return trim_xla(hidden, image_embeds, text_embeds, k_max=k_max, mode=mode, ratio=ratio)
  static = (k_max, mode, None if ratio is None else float(ratio), impl.removeprefix("pallas_"),
            bool(interpret))
  kernel = lambda h, i, t: _trim_pallas(h, i, t, *static)
  mesh = current_mesh()
  if mesh is None or all(mesh.shape[a] == 1 for a in mesh.axis_names if a not in mesh.manual_axes):
    return kernel(hidden, image_embeds, text_embeds)
  return _per_shard(kernel, mesh, hidden.shape[0], bool(interpret))(hidden, image_embeds,
                                                                     text_embeds)


def _per_shard(kernel, mesh: jax.sharding.AbstractMesh, batch: int, interpret: bool):
  """`kernel` under shard_map over the current mesh's non-manual axes: the batch split over
  `batch_axes`, the rest replicated (XLA cannot partition the custom calls itself)."""
  spec = jax.sharding.PartitionSpec(batch_axes(mesh, batch) or None)
  free = {a for a in mesh.axis_names if a not in mesh.manual_axes}
  # mesh=None: the context's mesh (concrete under jax.set_mesh, so eager calls work too).
  # check_vma=False in interpret mode: its internal scan trips the varying-axes check.
  return jax.shard_map(kernel, mesh=None, in_specs=(spec, spec, spec), out_specs=(spec, spec),
                       axis_names=free, check_vma=not interpret)


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def trim_features(cfg: Any, hidden: jax.Array, image_embeds: jax.Array, text_embeds: jax.Array):
  """Model-facing TRIM: reduces `hidden` as configured by the `trim` config section.

  Args:
    cfg: the `trim` section (ConfigDict, dict or object) with `k_max` (required), `mode`
      (default "iqr_batch"), `ratio` (mode "ratio"), `impl` (default "auto") and optionally
      `interpret` (default False: the Pallas kernels in interpret mode, for CPU tests). Keys
      that are not TRIM's (e.g. `enabled`, `text_source`) are ignored here.
    hidden, image_embeds, text_embeds: as in `trim`.

  Returns:
    tokens (B, k_max+1, D), count (B,) int32 and mask (B, k_max+1) bool, True on the `count`
    leading slots (kept tokens then the mean token); the VLM splices the k_max+1 slots and masks
    the rest out of attention.
  """
  k_max = _cfg_get(cfg, "k_max", None)
  if k_max is None:
    raise ValueError("trim_features: config key 'trim.k_max' is required")
  mode = _cfg_get(cfg, "mode", "iqr_batch")
  ratio = _cfg_get(cfg, "ratio", None) if mode == "ratio" else None
  tokens, count = trim(hidden, image_embeds, text_embeds, k_max=int(k_max), mode=mode,
                       ratio=ratio, impl=_cfg_get(cfg, "impl", "auto"),
                       interpret=bool(_cfg_get(cfg, "interpret", False)))
  return tokens, count, slot_mask(count, int(k_max))
