"""Pallas kernels for TRIM: Triton (GPU) and Mosaic (TPU).

Kernels, one program per image:

  GPU  1. scores s = image_embeds . text (grid over images x row tiles);
       2. select: ranks by pairwise counting (no sort / top_k), the per-example IQR threshold from
          exact order statistics (mode "iqr_example"), order-preserving compaction of the kept rows
          of `hidden` and the mean of the rest, written straight into the (k_max+1, D) output.
       Between them XLA takes the softmax of the (B, N) scores (so every chunk of p the select
       kernel reloads is bit-identical to the full row it compares against) and, for "iqr_batch",
       the batch-global quantile (`trim_common.keep_counts`).
  TPU  iqr_example / ratio: one fused kernel (scores, softmax, threshold, ranks, compaction, mean).
       iqr_batch: a small first kernel writes p, XLA takes the batch quantile, then the select
       kernel (same body, p read instead of computed) gets K by scalar prefetch.

`hidden`, the big input, is read once (by the select kernel); `image_embeds` once.

Every `pallas_call` carries a `pl.CostEstimate` from the shapes (XLA's cost analysis counts a
custom call as 0 FLOPs otherwise): matmul / einsum FLOPs exactly, each elementwise compare,
select or add of the rank and compaction passes as one FLOP (an estimate of work done, not of
useful arithmetic), one transcendental per softmax exp, and the bytes of every operand and result.
Under `shard_map` (`trim` on a mesh) the calls see per-shard shapes, and so do the estimates.

Tie rule (same as `trim.select_and_pool`): token i ranks ahead of j if p_i > p_j, or p_i == p_j and
i < j; each image keeps the tokens with rank < min(K, k_max).

Backend constraints honoured (see reference/trim.md §4):
  GPU / Triton: every loaded or computed array has a power-of-two size, so work is chunked by
    power-of-two divisors of N, E and D and p is padded to the next power of two; row gather
    uses `ref[int_vector]`; the prefix sum is `jnp.cumsum`. Triton is selected explicitly with
    `plt.CompilerParams` (jax 0.10.2 otherwise defaults to Mosaic GPU).
  TPU / Mosaic: full-array blocks (always legal), no sort / top_k / cumsum / reshape between
    (N, 1) and (1, N): the column copy of p is a diagonal extraction, counts are f32 sums, the
    prefix sum is a strictly-upper-triangular 0/1 matmul (exact with f32 accumulation) and the
    compaction a 0/1 selection matmul at precision HIGHEST so features are not rounded to bf16.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
import numpy as np

from medcg.kernels import trim_common

_HIGHEST = lax.Precision.HIGHEST


def _pow2_divisor(n: int, cap: int) -> int:
  """Largest power of two that divides n, at most cap."""
  return min(n & -n, cap)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
  """Output type varying over the same shard_map axes as `like` (needed with check_vma)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=getattr(jax.typeof(like), "mat", None))


def _nbytes(x, dtype=None) -> int:
  """Bytes of an array (or tracer), or of a shape and dtype."""
  shape, dtype = (x.shape, x.dtype) if dtype is None else (x, dtype)
  return int(np.prod(shape)) * jnp.dtype(dtype).itemsize


def _cost(flops: float, transcendentals: float, bytes_accessed: float) -> pl.CostEstimate:
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                         bytes_accessed=int(bytes_accessed))


def _quartile_terms(n: int, q: float):
  """(low index, high index, low weight, high weight) as jnp.percentile computes them in f32."""
  pos = np.float32(q / 100.0) * np.float32(n - 1)
  low = int(np.floor(pos))
  high = int(np.ceil(pos))
  high_w = np.float32(pos - np.float32(low))
  return low, high, float(np.float32(1.0) - high_w), float(high_w)


def _iqr_upper_bound(kth, n: int):
  """Q3 + 1.5 IQR from an order-statistic function kth(k) (k-th smallest, 0-based)."""
  def quantile(q):
    low, high, low_w, high_w = _quartile_terms(n, q)
    return kth(low) * low_w + kth(high) * high_w
  q1, q3 = quantile(25.0), quantile(75.0)
  return q3 + trim_common.IQR_FACTOR * (q3 - q1)


# ----------------------------------------------------------------------------- GPU (Triton)

def _gpu_scores_kernel(emb_ref, text_ref, s_ref, *, e_chunk):
  rows, e = emb_ref.shape

  def body(c, acc):
    e0 = pl.multiple_of(c * e_chunk, e_chunk)
    emb = emb_ref[:, pl.ds(e0, e_chunk)].astype(jnp.float32)
    text = text_ref[pl.ds(e0, e_chunk)].astype(jnp.float32)
    return acc + jnp.sum(emb * text[None, :], axis=1)

  s_ref[...] = lax.fori_loop(0, e // e_chunk, body, jnp.zeros((rows,), jnp.float32))


def _gpu_select_kernel(k_ref, p_ref, h_ref, tok_ref, cnt_ref, *, n, k_max, per_example_iqr,
                       cmp_chunk, row_chunk, out_chunk, d_chunk):
  n_pad = p_ref.shape[0]
  d = h_ref.shape[1]
  p = p_ref[...]                                    # (n_pad,), padding holds -1 (< every p)
  idx = lax.broadcasted_iota(jnp.int32, (n_pad,), 0)
  valid = idx < n

  def ahead_of(p_rows, rows_idx):
    # #{valid j ranked ahead of each row}: larger p, or equal p and lower index.
    pj, pi = p[None, :], p_rows[:, None]
    ahead = (pj > pi) | ((pj == pi) & (idx[None, :] < rows_idx[:, None]))
    return jnp.sum((ahead & valid[None, :]).astype(jnp.int32), axis=1)

  # Pass over column chunks: rank (ahead) of every i and, for the per-example quartiles,
  # le_count = #{j: p_j <= p_i}.
  def count_body(c, carry):
    j0 = pl.multiple_of(c * cmp_chunk, cmp_chunk)
    pj = p_ref[pl.ds(j0, cmp_chunk)][None, :]
    jj = j0 + lax.broadcasted_iota(jnp.int32, (cmp_chunk,), 0)
    vj = (jj < n)[None, :]
    pi = p[:, None]
    gt = ((pj > pi) | ((pj == pi) & (jj[None, :] < idx[:, None]))) & vj
    carry = (carry[0] + jnp.sum(gt.astype(jnp.int32), axis=1),) + carry[1:]
    if per_example_iqr:
      carry = carry[:1] + (carry[1] + jnp.sum(((pj <= pi) & vj).astype(jnp.int32), axis=1),)
    return carry

  zeros = jnp.zeros((n_pad,), jnp.int32)
  counts = lax.fori_loop(0, n_pad // cmp_chunk, count_body,
                         (zeros, zeros) if per_example_iqr else (zeros,))
  ahead = counts[0]

  if per_example_iqr:
    le_count = counts[1]

    def kth(k):  # k-th smallest valid p (ties-safe: the smallest p with more than k at or below)
      return jnp.min(jnp.where(valid & (le_count > k), p, jnp.inf))
    ub = _iqr_upper_bound(kth, n)
    k = jnp.sum((valid & (p > ub)).astype(jnp.int32))
  else:
    k = k_ref[0]
  k_eff = jnp.minimum(k, k_max)
  keep = valid & (ahead < k_eff)
  kept_upto = jnp.cumsum(keep.astype(jnp.int32))    # inclusive prefix count

  n_rest = n - k_eff
  for d0 in range(0, d, d_chunk):
    # Mean of the dropped rows; keep flags of a row chunk are recounted (no dynamic slicing of
    # values in Triton), which reproduces `ahead` bit for bit.
    def rest_body(c, acc, d0=d0):
      i0 = pl.multiple_of(c * row_chunk, row_chunk)
      rows_idx = i0 + lax.broadcasted_iota(jnp.int32, (row_chunk,), 0)
      drop = ahead_of(p_ref[pl.ds(i0, row_chunk)], rows_idx) >= k_eff
      h = h_ref[pl.ds(i0, row_chunk), pl.ds(d0, d_chunk)].astype(jnp.float32)
      return acc + jnp.sum(jnp.where(drop[:, None], h, 0.0), axis=0)

    rest = lax.fori_loop(0, n // row_chunk, rest_body, jnp.zeros((d_chunk,), jnp.float32))
    mean = jnp.where(n_rest > 0, rest / jnp.maximum(n_rest, 1).astype(jnp.float32), 0.0)

    def write_rows(m0, rows, d0=d0, mean=mean):
      slots = m0 + lax.broadcasted_iota(jnp.int32, (rows,), 0)
      # Source row of slot m = number of positions before the (m+1)-th kept token.
      src = jnp.sum((kept_upto[None, :] <= slots[:, None]).astype(jnp.int32), axis=1)
      src = jnp.minimum(src, n - 1)
      if d_chunk == d:
        h = h_ref[src].astype(jnp.float32)
      else:
        h = h_ref[src, pl.ds(d0, d_chunk)].astype(jnp.float32)
      out = jnp.where(slots[:, None] < k_eff, h,
                      jnp.where(slots[:, None] == k_eff, mean[None, :], 0.0))
      tok_ref[pl.ds(m0, rows), pl.ds(d0, d_chunk)] = out.astype(tok_ref.dtype)

    m_total = k_max + 1
    full = m_total // out_chunk

    def out_body(c, carry):
      write_rows(pl.multiple_of(c * out_chunk, out_chunk), out_chunk)
      return carry

    lax.fori_loop(0, full, out_body, 0)
    for m in range(full * out_chunk, m_total):  # < out_chunk tail rows, one at a time
      write_rows(m, 1)

  cnt_ref[...] = jnp.full((1,), k_eff + 1, jnp.int32)


def _gpu_call(hidden, image_embeds, text_embeds, *, k_max, mode, ratio, interpret):
  b, n, d = hidden.shape
  e = image_embeds.shape[2]
  params = plt.CompilerParams(num_warps=4, num_stages=1)
  tile = _pow2_divisor(n, 32)
  scores = pl.pallas_call(
      functools.partial(_gpu_scores_kernel, e_chunk=_pow2_divisor(e, 256)),
      out_shape=_out_struct((b, n), jnp.float32, image_embeds),
      grid=(b, n // tile),
      in_specs=[pl.BlockSpec((None, tile, e), lambda i, t: (i, t, 0)),
                pl.BlockSpec((None, e), lambda i, t: (i, 0))],
      out_specs=pl.BlockSpec((None, tile), lambda i, t: (i, t)),
      compiler_params=params, interpret=interpret, name="trim_scores_triton",
      cost_estimate=_cost(2 * b * n * e, 0, _nbytes(image_embeds) + _nbytes(text_embeds)
                          + _nbytes((b, n), jnp.float32)),
  )(image_embeds, text_embeds)
  p = jax.nn.softmax(-scores, axis=-1)
  per_example = mode == "iqr_example"
  k = jnp.zeros((b,), jnp.int32) if per_example else trim_common.keep_counts(p, mode, ratio)
  n_pad = _next_pow2(n)
  p = jnp.pad(p, ((0, 0), (0, n_pad - n)), constant_values=-1.0)
  d_chunk = _pow2_divisor(d, 1024)
  kernel = functools.partial(
      _gpu_select_kernel, n=n, k_max=k_max, per_example_iqr=per_example,
      cmp_chunk=min(16, n_pad), row_chunk=_pow2_divisor(n, 16),
      out_chunk=min(16, 1 << (k_max + 1).bit_length() - 1), d_chunk=d_chunk)
  m_total, d_passes = k_max + 1, d // d_chunk
  # Per image: the rank pass (~6 ops per pair, +3 for the quartile counts), its recount per
  # feature chunk in the rest-mean pass (~6 per pair), the mean's adds, and per output chunk the
  # source-row search over the prefix counts.
  per_image = ((9 if per_example else 6) * n_pad * n_pad + d_passes * 6 * n * n_pad
               + 2 * n * d + d_passes * 2 * m_total * n_pad + 3 * m_total * d)
  select_cost = _cost(b * per_image, 0,
                      2 * _nbytes((b, 1), jnp.int32) + _nbytes((b, n_pad), jnp.float32)
                      + _nbytes(hidden) + _nbytes((b, m_total, d), hidden.dtype))
  tokens, count = pl.pallas_call(
      kernel,
      out_shape=(_out_struct((b, k_max + 1, d), hidden.dtype, hidden),
                 _out_struct((b, 1), jnp.int32, hidden)),
      grid=(b,),
      in_specs=[pl.BlockSpec((None, 1), lambda i: (i, 0)),
                pl.BlockSpec((None, n_pad), lambda i: (i, 0)),
                pl.BlockSpec((None, n, d), lambda i: (i, 0, 0))],
      out_specs=(pl.BlockSpec((None, k_max + 1, d), lambda i: (i, 0, 0)),
                 pl.BlockSpec((None, 1), lambda i: (i, 0))),
      compiler_params=params, interpret=interpret, name="trim_select_triton",
      cost_estimate=select_cost,
  )(k[:, None], p, hidden)
  return tokens, count[:, 0]


# ----------------------------------------------------------------------------- TPU (Mosaic)

def _tpu_probs(emb, text):
  """p = softmax(-text . emb^T) as a lane-major (1, N) row; no transpose of the big block."""
  s = lax.dot_general(text.astype(jnp.float32), emb.astype(jnp.float32),
                      (((1,), (1,)), ((), ())), precision=_HIGHEST,
                      preferred_element_type=jnp.float32)
  neg = -s
  ex = jnp.exp(neg - jnp.max(neg, axis=1, keepdims=True))
  return ex / jnp.sum(ex, axis=1, keepdims=True)


def _tpu_probs_kernel(emb_ref, text_ref, p_ref):
  p_ref[...] = _tpu_probs(emb_ref[...], text_ref[...])


def _tpu_select_kernel(k_sref, *refs, n, k_max, per_example_iqr, fused):
  if fused:  # scores and softmax in this kernel: image_embeds is read once, p never leaves VMEM
    emb_ref, text_ref, h_ref, tok_ref, cnt_ref = refs
    p_row = _tpu_probs(emb_ref[...], text_ref[...])         # (1, n) lane-major
  else:      # iqr_batch: p from the first pass, K from the batch-wide quantile
    p_ref, h_ref, tok_ref, cnt_ref = refs
    p_row = p_ref[...]
  lane = lax.broadcasted_iota(jnp.int32, (n, n), 1)         # i: the token being ranked
  sub = lax.broadcasted_iota(jnp.int32, (n, n), 0)          # j: the token compared against
  p_i = jnp.broadcast_to(p_row, (n, n))
  # Column copy of p without a (1,n)->(n,1) reshape: sum of the diagonal row is exact.
  p_col = jnp.sum(jnp.where(lane == sub, p_i, 0.0), axis=1, keepdims=True)
  p_j = jnp.broadcast_to(p_col, (n, n))
  ahead = jnp.sum(jnp.where((p_j > p_i) | ((p_j == p_i) & (sub < lane)), 1.0, 0.0),
                  axis=0, keepdims=True)                    # (1, n) rank of each token
  if per_example_iqr:
    le_count = jnp.sum(jnp.where(p_j <= p_i, 1.0, 0.0), axis=0, keepdims=True)

    def kth(k):
      return jnp.min(jnp.where(le_count > k, p_row, jnp.inf), axis=1, keepdims=True)

    ub = _iqr_upper_bound(kth, n)
    k = jnp.sum(jnp.where(p_row > ub, 1.0, 0.0), axis=1, keepdims=True)
  else:
    k = jnp.full((1, 1), k_sref[pl.program_id(0)], jnp.int32).astype(jnp.float32)
  k_eff = jnp.minimum(k, float(k_max))                      # (1, 1), integral f32
  # 0/1 floats rather than bool vectors: masks are not broadcast across sublanes.
  keep = jnp.where(ahead < k_eff, 1.0, 0.0)                 # (1, n)
  before = jnp.where(sub < lane, 1.0, 0.0)                  # [j, i] = j < i
  dest = jnp.dot(keep, before, precision=_HIGHEST,
                 preferred_element_type=jnp.float32)        # (1, n) kept tokens before i
  m_total = k_max + 1
  slot = lax.broadcasted_iota(jnp.int32, (m_total, n), 0).astype(jnp.float32)
  # Row m < K' picks the kept token with m kept before it; row K' sums the dropped tokens.
  select = jnp.where(dest == slot, keep, 0.0) + jnp.where(slot == k_eff, 1.0 - keep, 0.0)
  sums = jnp.dot(select, h_ref[...].astype(jnp.float32), precision=_HIGHEST,
                 preferred_element_type=jnp.float32)        # (m_total, d)
  slot_col = lax.broadcasted_iota(jnp.int32, (m_total, 1), 0).astype(jnp.float32)
  n_rest = jnp.maximum(float(n) - k_eff, 1.0)
  tok_ref[...] = jnp.where(slot_col == k_eff, sums / n_rest, sums).astype(tok_ref.dtype)
  cnt_ref[...] = (k_eff + 1.0).astype(jnp.int32)


def _tpu_interpret(interpret: bool):
  if not interpret:
    return False
  params = getattr(pltpu, "InterpretParams", None)
  return params(out_of_bounds_reads="raise", uninitialized_memory="nan") if params else True


def _tpu_compiler_params(n: int, d: int, e: int, k_max: int, interpret: bool):
  """Per-image blocks are whole (N, D) / (N, E) slabs and the ranks use (N, N) f32 temporaries,
  which outgrow the default scoped VMEM (16 MiB on v5e): raise the limit to what is needed."""
  if interpret:
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  blocks = 2 * 4 * (n * e + n * d + (k_max + 1) * d)   # double-buffered f32 upper bound
  temps = 4 * (8 * n * n + 2 * (k_max + 1) * n + (k_max + 1) * d)
  need = int(1.25 * (blocks + temps))
  capacity = pltpu.get_tpu_info().vmem_capacity_bytes
  if need > 0.9 * capacity:
    raise ValueError(f"trim impl='pallas_tpu': N={n}, D={d}, E={e}, k_max={k_max} needs about "
                     f"{need >> 20} MiB of VMEM (capacity {capacity >> 20} MiB); use impl='xla'")
  return pltpu.CompilerParams(dimension_semantics=("parallel",),
                              vmem_limit_bytes=max(need, 32 << 20))


def _tpu_probs_flops(n: int, e: int) -> tuple[int, int]:
  """(flops, transcendentals) of `_tpu_probs` for one image: the (1,E)x(E,N) dot, the softmax."""
  return 2 * n * e + 5 * n, n


def _tpu_select_flops(n: int, d: int, k_max: int, per_example_iqr: bool) -> int:
  """FLOPs of `_tpu_select_kernel` for one image, without the fused scores (`_tpu_probs_flops`)."""
  m_total = k_max + 1
  pairs = (2 + 5 + (2 if per_example_iqr else 0) + 1) * n * n  # diagonal copy, ranks, (n, n) masks
  quartiles = 4 * 2 * n if per_example_iqr else 0               # four order statistics
  matmuls = 2 * n * n + 2 * m_total * n * d                     # prefix sum, compaction
  selection = 6 * m_total * n + 3 * m_total * d                 # the 0/1 selection matrix, mean
  return pairs + quartiles + matmuls + selection


def _tpu_call(hidden, image_embeds, text_embeds, *, k_max, mode, ratio, interpret):
  b, n, d = hidden.shape
  e = image_embeds.shape[2]
  interp = _tpu_interpret(interpret)
  params = _tpu_compiler_params(n, d, e, k_max, interpret)
  emb_spec = pl.BlockSpec((None, n, e), lambda i, *_: (i, 0, 0))
  text_spec = pl.BlockSpec((None, 1, e), lambda i, *_: (i, 0, 0))
  text_embeds = text_embeds[:, None, :]
  fused = mode != "iqr_batch"
  per_example = mode == "iqr_example"
  probs_flops, probs_exp = _tpu_probs_flops(n, e)
  score_bytes = _nbytes(image_embeds) + _nbytes(text_embeds)
  p_bytes = _nbytes((b, 1, n), jnp.float32)
  if fused:  # one pass: K is per example (iqr_example, computed in-kernel) or static (ratio)
    k = jnp.full((b,), 0 if per_example else trim_common.static_ratio_k(n, ratio), jnp.int32)
    operands, score_specs = (image_embeds, text_embeds), [emb_spec, text_spec]
    in_flops, in_exp, in_bytes = probs_flops, probs_exp, score_bytes
  else:      # first pass: p for the batch-wide quantile
    p = pl.pallas_call(
        _tpu_probs_kernel,
        out_shape=_out_struct((b, 1, n), jnp.float32, image_embeds),
        grid=(b,), in_specs=[emb_spec, text_spec],
        out_specs=pl.BlockSpec((None, 1, n), lambda i: (i, 0, 0)),
        compiler_params=params, interpret=interp, name="trim_probs_mosaic",
        cost_estimate=_cost(b * probs_flops, b * probs_exp, score_bytes + p_bytes),
    )(image_embeds, text_embeds)
    k = trim_common.keep_counts(p[:, 0], mode, ratio)
    operands, score_specs = (p,), [pl.BlockSpec((None, 1, n), lambda i, *_: (i, 0, 0))]
    in_flops, in_exp, in_bytes = 0, 0, p_bytes
  kernel = functools.partial(_tpu_select_kernel, n=n, k_max=k_max,
                             per_example_iqr=per_example, fused=fused)
  select_cost = _cost(
      b * (in_flops + _tpu_select_flops(n, d, k_max, per_example)), b * in_exp,
      _nbytes(k) + in_bytes + _nbytes(hidden) + _nbytes((b, k_max + 1, d), hidden.dtype)
      + _nbytes((b, 1, 1), jnp.int32))
  tokens, count = pl.pallas_call(
      kernel,
      out_shape=(_out_struct((b, k_max + 1, d), hidden.dtype, hidden),
                 _out_struct((b, 1, 1), jnp.int32, hidden)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b,),
          in_specs=score_specs + [pl.BlockSpec((None, n, d), lambda i, *_: (i, 0, 0))],
          out_specs=(pl.BlockSpec((None, k_max + 1, d), lambda i, *_: (i, 0, 0)),
                     pl.BlockSpec((None, 1, 1), lambda i, *_: (i, 0, 0)))),
      compiler_params=params, interpret=interp, name="trim_select_mosaic",
      cost_estimate=select_cost,
  )(k, *operands, hidden)
  return tokens, count[:, 0, 0]


def trim_pallas(hidden, image_embeds, text_embeds, *, k_max, mode, ratio, backend, interpret):
  """Forward TRIM with the Pallas kernels of `backend` ("gpu" or "tpu"); see `trim.trim`."""
  if backend == "gpu":
    return _gpu_call(hidden, image_embeds, text_embeds, k_max=k_max, mode=mode, ratio=ratio,
                     interpret=interpret)
  if backend == "tpu":
    return _tpu_call(hidden, image_embeds, text_embeds, k_max=k_max, mode=mode, ratio=ratio,
                     interpret=interpret)
  raise ValueError(f"trim_pallas: unknown backend {backend!r}; expected 'gpu' or 'tpu'")
