"""Triton kernels of the logprobs family: token log-probs / entropy from logits and their gradient.

One program per row, looping over the vocabulary in BLOCK_V tiles with the online softmax
statistics of ``_common.softmax_stats_tile`` (math as in
``csrc/include/ppokernels/token_logprobs.h``).
Rows are addressed as ``(r // inner) * outer_stride + (r % inner) * inner_stride`` so that a
strided slice such as ``logits[:, :-1]`` needs no copy. The tile size depends on V only, so a
row's results do not depend on the batch it sits in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels._dtypes import acc_dtype
from ppokernels.triton._common import aot_table, expm1, launch, softmax_stats_tile

MAX_BLOCK_V = 4096  # vocabulary tile of the widest rows (V >= 4096)


@triton.jit
def _token_logprobs_fwd_kernel(
    # inputs
    logits_ptr,  # [..., V] fp32/fp64/bf16/fp16, last dim contiguous, rows as in the docstring
    labels_ptr,  # [N] int64
    # outputs
    logprobs_ptr,  # [N] fp32 (fp64 for fp64 logits)
    entropy_ptr,  # [N] same, written when WITH_ENTROPY
    lse_ptr,  # [N] same, log-sum-exp of logits / temperature, saved for the backward
    # shapes and scalars
    V,
    inner,
    outer_stride,
    inner_stride,
    inv_t,  # 1 / temperature
    ignore_index,
    # meta
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before any multiply: N * V may exceed 2^31
    base = logits_ptr + (row // inner) * outer_stride + (row % inner) * inner_stride
    label = tl.load(labels_ptr + row)
    acc = lse_ptr.dtype.element_ty
    ignored = label == ignore_index
    valid = (label >= 0) & (label < V)
    n_cols = tl.where(valid & ~ignored, V, 0)  # ignored / invalid rows read nothing
    cols = tl.arange(0, BLOCK_V)[None, :]
    m = tl.full([1], float("-inf"), acc)
    s = tl.zeros([1], acc)
    u = tl.zeros([1], acc)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        z = tl.load(base + c, mask=c < V, other=float("-inf")).to(acc) * inv_t
        m, s, u = softmax_stats_tile(m, s, u, z, WITH_ENTROPY)
    lse = tl.sum(m + tl.log(s), axis=0)
    z_y = tl.load(base + label, mask=valid & ~ignored, other=0.0).to(acc) * inv_t
    nan = float("nan")
    lp = z_y - lse
    lp = tl.where(lp > 0.0, 0.0, lp)  # <= 0 (rounding may cross on a peaked row); NaN stays
    lp = tl.where(ignored, 0.0, tl.where(valid, lp, nan))
    tl.store(logprobs_ptr + row, lp)
    tl.store(lse_ptr + row, tl.where(ignored, 0.0, tl.where(valid, lse, nan)))
    if WITH_ENTROPY:
        h = tl.sum(tl.log(s) - u / s, axis=0)
        h = tl.where(h < 0.0, 0.0, h)
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, tl.where(valid, h, nan)))


@triton.jit
def _token_logprobs_bwd_kernel(
    # inputs
    grad_logprobs_ptr,  # [N] fp32 (fp64), upstream gradient of logprobs
    grad_entropy_ptr,  # [N] same, read when HAS_ENTROPY
    logits_ptr,  # [..., V] rows as in the forward
    labels_ptr,  # [N] int64
    lse_ptr,  # [N] from the forward
    entropy_ptr,  # [N] from the forward, read when HAS_ENTROPY
    # outputs
    grad_ptr,  # [..., V] dtype of logits; may be logits_ptr itself (in-place backward)
    # shapes and scalars
    V,
    inner,
    outer_stride,
    inner_stride,
    g_inner,
    g_outer_stride,
    g_inner_stride,
    inv_t,
    ignore_index,
    # meta
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + (row // inner) * outer_stride + (row % inner) * inner_stride
    dst = grad_ptr + (row // g_inner) * g_outer_stride + (row % g_inner) * g_inner_stride
    acc = lse_ptr.dtype.element_ty
    label = tl.load(labels_ptr + row)
    g_lp = tl.load(grad_logprobs_ptr + row).to(acc)
    lse = tl.load(lse_ptr + row)
    if HAS_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(acc)
        mean_z = lse - tl.load(entropy_ptr + row)
    else:
        g_ent = tl.zeros([], acc)
        mean_z = tl.zeros([], acc)
    # ignored tokens and tokens with no upstream gradient (PPO-clipped) get 0 and read nothing
    zero = (label == ignore_index) | (label < 0) | (label >= V) | ((g_lp == 0) & (g_ent == 0))
    # target column: 1 - p_y = -expm1(log p_y), no cancellation when p_y -> 1. Read before the
    # loop overwrites it in place.
    z_y = tl.load(src + label, mask=~zero, other=0.0).to(acc) * inv_t
    lp_y = z_y - lse
    p_y = tl.exp(lp_y)
    d_y = (g_lp * -expm1(lp_y) - tl.where(p_y == 0, 0.0, g_ent * p_y * (z_y - mean_z))) * inv_t
    c0 = -g_lp * inv_t
    c1 = -g_ent * inv_t
    n_read = tl.where(zero, 0, V)  # columns to read: none for a zero row
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inside = c < V
        z = tl.load(src + c, mask=c < n_read, other=0.0).to(acc) * inv_t
        p = tl.exp(z - lse)
        d = tl.where(p == 0, 0.0, p * (c0 + c1 * (z - mean_z)))
        d = tl.where(c == label, d_y, d)
        d = tl.where(zero, 0.0, d)
        tl.store(dst + c, d.to(grad_ptr.dtype.element_ty), mask=inside)


def row_layout(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (copied if needed) with its rows as (inner, outer_stride, inner_stride)."""
    if t.stride(-1) == 1:
        kept = []  # (size, stride), innermost first, contiguous neighbours merged
        for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1]), strict=True):
            if size == 1:
                continue
            if kept and stride == kept[-1][1] * kept[-1][0]:
                kept[-1] = (kept[-1][0] * size, kept[-1][1])
            else:
                kept.append((size, stride))
        if len(kept) <= 2:
            kept += [(1, 0)] * (2 - len(kept))
            return t, (max(kept[0][0], 1), kept[1][1], kept[0][1])
    return row_layout(t.contiguous())


def _config(V: int) -> dict:
    """Launch table of both kernels for a vocabulary of V: the tile is V rounded up to a power of
    two (at most MAX_BLOCK_V), 8 warps from 2048 columns on. Read by the launchers and by the
    AOT table (for the widest tile, the one every real vocabulary uses)."""
    block = min(triton.next_power_of_2(max(V, 16)), MAX_BLOCK_V)
    return dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4, num_stages=3)


@triton_op("ppokernels::token_logprobs_triton", mutates_args=())
def token_logprobs_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    ignore_index: int,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, layout = row_layout(logits)
    lab = labels.contiguous()
    acc = acc_dtype(x)
    lp = torch.empty(labels.shape, dtype=acc, device=x.device)
    ent = torch.empty(labels.shape if with_entropy else (0,), dtype=acc, device=x.device)
    lse = torch.empty(labels.shape, dtype=acc, device=x.device)
    n, V = lab.numel(), x.shape[-1]
    if n > 0:
        launch(_token_logprobs_fwd_kernel)[(n,)](
            x,
            lab,
            lp,
            ent,
            lse,
            V,
            *layout,
            1.0 / temperature,
            ignore_index,
            WITH_ENTROPY=with_entropy,
            **_config(V),
        )
    return lp, ent, lse


def _backward(grad_lp, grad_ent, logits, labels, lse, entropy, temperature, ignore_index, out):
    x, layout = row_layout(logits)
    acc = lse.dtype
    has_ent = grad_ent is not None
    g_lp = grad_lp.to(acc).contiguous()
    g_ent = grad_ent.to(acc).contiguous() if has_ent else g_lp
    ent = entropy.contiguous() if has_ent else lse
    n, V = labels.numel(), x.shape[-1]
    if n > 0:
        dst, g_layout = row_layout(out)
        assert dst is out, "the gradient buffer must have addressable rows"
        launch(_token_logprobs_bwd_kernel)[(n,)](
            g_lp,
            g_ent,
            x,
            labels.contiguous(),
            lse.contiguous(),
            ent,
            out,
            V,
            *layout,
            *g_layout,
            1.0 / temperature,
            ignore_index,
            HAS_ENTROPY=has_ent,
            **_config(V),
        )


@triton_op("ppokernels::token_logprobs_backward_triton", mutates_args=())
def token_logprobs_backward_triton(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, out
    )
    return out


@triton_op("ppokernels::token_logprobs_backward_triton_", mutates_args={"logits"})
def token_logprobs_backward_triton_(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> None:
    """In place: the gradient overwrites ``logits`` (copied back if its rows needed a copy)."""
    direct = row_layout(logits)[0] is logits
    out = logits if direct else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, out
    )
    if not direct:
        logits.copy_(out)


# ------------------------------------------------------------ ahead-of-time compile table
_ROWS = {"V": "i64", "inner": "i64", "outer_stride": "i64", "inner_stride": "i64"}
_SCALARS = {"inv_t": "fp32", "ignore_index": "i64"}
_FWD_SIG = {
    "logits_ptr": "*T",
    "labels_ptr": "*i64",
    "logprobs_ptr": "*A",
    "entropy_ptr": "*A",
    "lse_ptr": "*A",
    **_ROWS,
    **_SCALARS,
}
_BWD_SIG = {
    "grad_logprobs_ptr": "*A",
    "grad_entropy_ptr": "*A",
    "logits_ptr": "*T",
    "labels_ptr": "*i64",
    "lse_ptr": "*A",
    "entropy_ptr": "*A",
    "grad_ptr": "*T",
    **_ROWS,
    "g_inner": "i64",
    "g_outer_stride": "i64",
    "g_inner_stride": "i64",
    **_SCALARS,
}
AOT = aot_table(
    _token_logprobs_fwd_kernel,
    _FWD_SIG,
    lambda dt: _config(MAX_BLOCK_V),
    variants=[dict(WITH_ENTROPY=True), dict(WITH_ENTROPY=False)],
) + aot_table(
    _token_logprobs_bwd_kernel,
    _BWD_SIG,
    lambda dt: _config(MAX_BLOCK_V),
    variants=[dict(HAS_ENTROPY=True), dict(HAS_ENTROPY=False)],
)
