"""Triton kernels (the @triton.jit part) of the linear_logprobs family: label logit, log-sum-exp
and entropy per row straight from hidden states and the lm_head weight, forward and backward.

Forward: one program per block of BLOCK_N rows walks the vocabulary in BLOCK_V tiles; each tile
is a K loop of ``tl.dot`` over H with an fp32 accumulator, then an online update of the per-row
statistics (max m, s = sum e^(z-m), u = sum e^(z-m) (z-m): ``SoftmaxStats`` of
csrc/include/ppokernels/token_logprobs.h, ``softmax_stats_tile`` of triton/_common.py) and the label
logit picked from the same accumulator. Tile columns past V are -inf. The tile shape never depends
on N, so a row's bits do not depend on the batch it is in.

Logits cache: with HAS_CACHE the forward also stores the raw tiles (before bias and temperature)
of the first ``n_cache`` valid rows into a [n_cache, V] accumulator-dtype buffer, and the
backward runs ``_linear_logprobs_dz_cached_kernel`` on those rows, which loads them instead of
recomputing the GEMM: the same values (the same tile code made them), so the same dlogits bits
(``_dz_tile``, shared), and three GEMMs instead of four.

Backward, per chunk of rows: ``_linear_logprobs_dz_kernel`` recomputes each tile and writes
dlogits (csrc/include/ppokernels/linear_logprobs.h) into a [rows, V] workspace;
``_linear_logprobs_grad_hidden_kernel`` (programs own row x H blocks, loop over the vocabulary)
and ``_linear_logprobs_grad_weight_kernel`` (programs own vocab x H blocks, loop over rows, also
summing grad_bias) are plain GEMMs with fp32 accumulators:
no atomics, a fixed summation order. Rows labelled ignore_index are compacted out on the host
(``nonzero``: one device sync per call).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ppokernels.triton._common import expm1, softmax_stats_tile

# Launch table per input dtype and kernel role, read by the launchers and the AOT table. Tile
# shapes are fixed (never chosen from N) so a row's bits do not depend on the batch. "logits":
# the forward and the dlogits kernels (BLOCK_N x BLOCK_V tiles, K step BLOCK_K over H); "grad":
# the two gradient GEMMs (BLOCK_N or BLOCK_V x BLOCK_H tiles). The shapes are the largest that
# compile for sm_90 without register spills at these warps/stages (tests/build/test_triton_audit.py
# checks it for bf16, under triton 3.6 on the GPU machine's stack and the newest triton here): a
# 128 x 128 fp32 accumulator plus the softmax temporaries spilled with 8 warps, and triton 3.6
# spilled the forward's 64 x 128 tile with a K step of 64 (bf16) or 32 (fp32) too, and the
# caching forward's 64 x 128 bf16 tile with a K step of 32 (56 B), hence 64 x 64 in half dtypes.
# IEEE: fp32 and fp64 dots in full precision (no tf32), with the accumulator's out_dtype
# (triton <= 3.6 needs it). bf16/fp16 run on the tensor cores (wgmma on sm_90). "cached": the
# dlogits kernel of cached rows (no GEMM, elementwise, so its tile shape changes no bit):
# 16 x 128 on 4 warps, whose tile, int64 addresses and temporaries fit the registers in every
# dtype (64 x 128 on 8 warps spilled in bf16, 32 x 128 on 4 in fp64).
_CACHED = dict(BLOCK_N=16, BLOCK_V=128, num_warps=4, num_stages=1)
_WIDE = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=16, BLOCK_H=64, IEEE=True, num_warps=8, num_stages=2)
_HALF_LOGITS = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, IEEE=False, num_warps=8, num_stages=3)
_HALF_GRAD = dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, IEEE=False, num_warps=8, num_stages=3)
CONFIGS = {
    "fp32": {"logits": _WIDE, "grad": _WIDE, "cached": _CACHED},
    "fp64": {"logits": _WIDE, "grad": _WIDE, "cached": _CACHED},
    "bf16": {"logits": _HALF_LOGITS, "grad": _HALF_GRAD, "cached": _CACHED},
    "fp16": {"logits": _HALF_LOGITS, "grad": _HALF_GRAD, "cached": _CACHED},
}


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    rows,
    rmask,
    cols,
    cmask,
    H,
    IEEE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] tile of hidden[rows] @ weight[cols].T, accumulated in ACC."""
    acc = tl.zeros([rows.shape[0], cols.shape[0]], ACC)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        h = tl.load(
            hidden_ptr + rows[:, None] * H + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + cols[None, :] * H + ks[:, None],
            mask=cmask[None, :] & kmask[:, None],
            other=0.0,
        )
        # fp32/fp64 inputs: no tf32 rounding; out_dtype=acc.dtype because triton <= 3.6 does not
        # infer an fp64 result from an fp64 accumulator (its default out_dtype is fp32)
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc = tl.dot(h, w, acc)
    return acc


@triton.jit
def _linear_logprobs_fwd_kernel(
    # inputs
    hidden_ptr,  # [n, H] valid rows only, contiguous
    weight_ptr,  # [V, H] contiguous, same dtype
    bias_ptr,  # [V] accumulator dtype (read when HAS_BIAS)
    labels_ptr,  # [n] int64, label - vocab_start (outside [0, V): another shard's)
    # outputs, accumulator dtype (fp32; fp64 for fp64 inputs)
    label_logit_ptr,  # [n]
    lse_ptr,  # [n]
    ent_ptr,  # [n]
    cache_ptr,  # [n_cache, V] raw logits of the first n_cache rows (written when HAS_CACHE)
    # shapes and scalars
    n,
    n_cache,
    V,
    H,
    inv_t,  # 1 / temperature
    # meta
    HAS_BIAS: tl.constexpr,
    HAS_CACHE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    ACC = label_logit_ptr.dtype.element_ty
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < n
    y = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), ACC)
    s = tl.zeros([BLOCK_N], ACC)
    u = tl.zeros([BLOCK_N], ACC)
    zy = tl.zeros([BLOCK_N], ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        acc = _logits_tile(hidden_ptr, weight_ptr, rows, rmask, cols, cmask, H, IEEE, BLOCK_K, ACC)
        if HAS_CACHE:
            # int64 base of the tile, int32 offsets within it (BLOCK_N V < 2^31): int64 addresses
            # per entry spilled 264 B on sm_80; now 104 B there, none on sm_90 (255 registers)
            base = cache_ptr + row0 * V + v0
            offs = tl.arange(0, BLOCK_N)[:, None] * V.to(tl.int32) + tl.arange(0, BLOCK_V)[None, :]
            tl.store(base + offs, acc, mask=(rows < n_cache)[:, None] & cmask[None, :])
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
        z = tl.where(cmask[None, :], acc * inv_t, float("-inf"))  # padding is -inf, never 0
        m, s, u = softmax_stats_tile(m, s, u, z, True)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
    log_s = tl.log(s)
    tl.store(label_logit_ptr + rows, zy, mask=rmask)
    tl.store(lse_ptr + rows, m + log_s, mask=rmask)
    tl.store(ent_ptr + rows, log_s - u / s, mask=rmask)


@triton.jit
def _dz_tile(
    acc,  # [BLOCK_N, BLOCK_V] raw logits of rows x cols (no bias, no temperature)
    bias_ptr,
    labels_ptr,
    lse_ptr,
    ent_ptr,
    coef_ptr,
    dz_ptr,
    rows,
    rmask,
    cols,
    cmask,
    r0,
    n,
    V,
    inv_t,
    HAS_BIAS: tl.constexpr,
):
    """Writes the dlogits of one tile (csrc/include/ppokernels/linear_logprobs.h) to the
    workspace rows ``rows - r0``: elementwise, so the same bits whatever the tile shape."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    y = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
    b = tl.load(coef_ptr + n + rows, mask=rmask, other=0.0)
    c = tl.load(coef_ptr + 2 * n + rows, mask=rmask, other=0.0)
    logp = acc * inv_t - lse[:, None]
    p = tl.exp(logp)
    # p = 0 (a -inf logit: a masked vocabulary entry) gives 0, not 0 * -inf (linear_logprobs.h)
    ent_term = tl.where(p > 0, p * c[:, None] * (logp + ent[:, None]), 0.0)
    # label column: a + b p_y = (a + b) + b expm1(log p_y), no cancellation near p_y = 1
    dz_y = (a + b)[:, None] + b[:, None] * expm1(logp) + ent_term
    dz = tl.where(cols[None, :] == y[:, None], dz_y, p * b[:, None] + ent_term) * inv_t
    mask = rmask[:, None] & cmask[None, :]
    out = dz_ptr + (rows - r0)[:, None] * V + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_logprobs_dz_kernel(
    # inputs
    hidden_ptr,  # [n, H] valid rows only
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] accumulator dtype
    labels_ptr,  # [n] int64 local label ids
    lse_ptr,
    ent_ptr,  # [n] accumulator dtype, saved by the forward
    coef_ptr,  # [3, n] accumulator dtype: a (label logit), b (lse), c (-entropy) upstream grads
    # outputs
    dz_ptr,  # [r1 - r0, V] dlogits of rows [r0, r1), dtype of hidden
    # shapes and scalars
    r0,
    r1,
    n,
    V,
    H,
    inv_t,
    # meta
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dlogits of rows [r0, r1) from the recomputed logits tile."""
    ACC = lse_ptr.dtype.element_ty
    rows = r0 + tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < r1
    cmask = cols < V
    acc = _logits_tile(hidden_ptr, weight_ptr, rows, rmask, cols, cmask, H, IEEE, BLOCK_K, ACC)
    args = (bias_ptr, labels_ptr, lse_ptr, ent_ptr, coef_ptr, dz_ptr, rows, rmask, cols, cmask)
    _dz_tile(acc, *args, r0, n, V, inv_t, HAS_BIAS)


@triton.jit
def _linear_logprobs_dz_cached_kernel(
    # inputs
    cache_ptr,  # [n_cache, V] accumulator dtype: the forward's raw logits of the first rows
    bias_ptr,  # [V] accumulator dtype
    labels_ptr,  # [n] int64 local label ids
    lse_ptr,
    ent_ptr,  # [n] accumulator dtype, saved by the forward
    coef_ptr,  # [3, n] accumulator dtype, as _linear_logprobs_dz_kernel
    # outputs
    dz_ptr,  # [r1 - r0, V] dlogits of rows [r0, r1) (r1 <= n_cache), dtype of hidden
    # shapes and scalars
    r0,
    r1,
    n,
    V,
    inv_t,
    # meta
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dlogits of cached rows [r0, r1): reads 4 (8) bytes and writes 2-4 per entry, no GEMM."""
    rows = r0 + tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < r1
    cmask = cols < V
    acc = tl.load(
        cache_ptr + rows[:, None] * V + cols[None, :],
        mask=rmask[:, None] & cmask[None, :],
        other=0.0,
    )
    args = (bias_ptr, labels_ptr, lse_ptr, ent_ptr, coef_ptr, dz_ptr, rows, rmask, cols, cmask)
    _dz_tile(acc, *args, r0, n, V, inv_t, HAS_BIAS)


@triton.jit
def _linear_logprobs_grad_hidden_kernel(
    dz_ptr,  # [cnt, V] dlogits of this chunk
    weight_ptr,  # [V, H]
    grad_ptr,  # [n, H] fp32 grad of the valid rows; this chunk writes rows [r0, r0 + cnt)
    r0,
    cnt,
    V,
    H,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < cnt
    hmask = hs < H
    acc = tl.zeros([BLOCK_N, BLOCK_H], grad_ptr.dtype.element_ty)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        g = tl.load(
            dz_ptr + rows[:, None] * V + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + cols[:, None] * H + hs[None, :],
            mask=cmask[:, None] & hmask[None, :],
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(g, w, acc, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc = tl.dot(g, w, acc)
    tl.store(
        grad_ptr + (r0 + rows)[:, None] * H + hs[None, :], acc, mask=rmask[:, None] & hmask[None, :]
    )


@triton.jit
def _linear_logprobs_grad_weight_kernel(
    dz_ptr,  # [cnt, V] dlogits of this chunk
    hidden_ptr,  # [n, H] valid rows; this chunk is rows [r0, r0 + cnt)
    grad_w_ptr,  # [V, H] fp32, accumulated over chunks (read, add, write)
    grad_b_ptr,  # [V] fp32, accumulated likewise (HAS_BIAS)
    r0,
    cnt,
    V,
    H,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    pid_h = tl.program_id(1)
    hs = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < V
    hmask = hs < H
    out = grad_w_ptr + cols[:, None] * H + hs[None, :]
    omask = cmask[:, None] & hmask[None, :]
    acc = tl.load(out, mask=omask, other=0.0)
    gb = tl.zeros([BLOCK_V], grad_w_ptr.dtype.element_ty)
    for k0 in range(0, cnt, BLOCK_N):
        rows = k0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < cnt
        g = tl.load(
            dz_ptr + rows[None, :] * V + cols[:, None],
            mask=cmask[:, None] & rmask[None, :],
            other=0.0,
        )  # [BLOCK_V, BLOCK_N]
        h = tl.load(
            hidden_ptr + (r0 + rows)[:, None] * H + hs[None, :],
            mask=rmask[:, None] & hmask[None, :],
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(g, h, acc, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc = tl.dot(g, h, acc)
        if HAS_BIAS:
            gb += tl.sum(g.to(gb.dtype), 1)
    tl.store(out, acc, mask=omask)
    if HAS_BIAS:
        if pid_h == 0:
            old = tl.load(grad_b_ptr + cols, mask=cmask, other=0.0)
            tl.store(grad_b_ptr + cols, old + gb, mask=cmask)
