"""Triton kernels of value_loss, the clipped value loss, forward and backward.

Math as in ``csrc/include/ppokernels/value_loss.h`` (value_token): per valid token
``L = 0.5 max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2)``, dL/dv = v - R unless the
clipped term strictly wins. Forward: per-row partial sums, then a fixed-order reduction over rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels._dtypes import acc_dtype, bool_mask
from ppokernels.triton._common import aot_table, launch
from ppokernels.triton.agg import AGG, FINALIZE_CONFIG, ROW_CONFIG, _agg_scale


@triton.jit
def _value_token(v, vo, ret, clip, HAS_CLIP: tl.constexpr):
    """(L, dL/dv, clipped flag) of one token."""
    err = v - ret
    sq = err * err
    if HAS_CLIP:
        vc = tl.minimum(tl.maximum(v, vo - clip), vo + clip)
        sqc = (vc - ret) * (vc - ret)
        clipped = sqc > sq
        loss = 0.5 * tl.maximum(sq, sqc)
        d = tl.where(clipped, 0.0, err)
    else:
        clipped = sq != sq  # all false on valid tokens
        loss = 0.5 * sq
        d = err
    return loss, d, clipped


@triton.jit
def _value_loss_row_kernel(
    # inputs, [B, T]
    v_ptr,
    vo_ptr,  # values, old_values (same dtype)
    ret_ptr,  # returns, fp32/fp64
    mask_ptr,  # bool
    # outputs
    part_ptr,  # [B, 4] per-row partials: n, loss, clipped, (pad)
    # shapes and scalars
    T,
    clip,
    # meta
    HAS_CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc = part_ptr.dtype.element_ty
    base = b * T
    a_n = tl.zeros([BLOCK], acc)
    a_loss = tl.zeros([BLOCK], acc)
    a_clip = tl.zeros([BLOCK], acc)
    for t0 in range(0, T, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        m = tl.load(mask_ptr + base + offs, mask=offs < T, other=0) != 0
        v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(acc)
        vo = tl.load(vo_ptr + base + offs, mask=m, other=0.0).to(acc)
        ret = tl.load(ret_ptr + base + offs, mask=m, other=0.0).to(acc)
        loss, d, clipped = _value_token(v, vo, ret, clip, HAS_CLIP)
        a_n += m.to(acc)
        a_loss += tl.where(m, loss, 0.0)
        a_clip += (m & clipped).to(acc)
    tl.store(part_ptr + b * 4 + 0, tl.sum(a_n))
    tl.store(part_ptr + b * 4 + 1, tl.sum(a_loss))
    tl.store(part_ptr + b * 4 + 2, tl.sum(a_clip))


@triton.jit
def _value_loss_finalize_kernel(
    # inputs
    part_ptr,  # [B, 4]
    # outputs
    loss_ptr,
    clipfrac_ptr,  # []
    row_scale_ptr,  # [B] aggregation weight per row
    # shapes and scalars
    B,
    T,
    num_tokens,
    num_seqs,
    # meta
    AGG: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    acc = part_ptr.dtype.element_ty
    n_acc = tl.zeros([BLOCK_B], acc)
    clip_acc = tl.zeros([BLOCK_B], acc)
    for r0 in range(0, B, BLOCK_B):
        rows = (r0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        ok = rows < B
        n_acc += tl.load(part_ptr + rows * 4, mask=ok, other=0.0)
        clip_acc += tl.load(part_ptr + rows * 4 + 2, mask=ok, other=0.0)
    n_total = tl.sum(n_acc)
    loss_acc = tl.zeros([BLOCK_B], acc)
    for r0 in range(0, B, BLOCK_B):
        rows = (r0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        ok = rows < B
        n = tl.load(part_ptr + rows * 4, mask=ok, other=0.0)
        w = tl.where(ok, _agg_scale(n, n_total, num_tokens, num_seqs, B, T, AGG), 0.0)
        loss_acc += w * tl.load(part_ptr + rows * 4 + 1, mask=ok, other=0.0)
        tl.store(row_scale_ptr + rows, w, mask=ok)
    tl.store(loss_ptr, tl.sum(loss_acc))
    tl.store(
        clipfrac_ptr, tl.sum(clip_acc) * tl.where(n_total > 0, 1.0 / tl.maximum(n_total, 1.0), 0.0)
    )


@triton.jit
def _value_loss_bwd_kernel(
    # inputs
    grad_ptr,  # [] upstream gradient
    v_ptr,
    vo_ptr,
    ret_ptr,
    mask_ptr,  # [B, T] as in _value_loss_row_kernel
    row_scale_ptr,  # [B]
    # outputs
    g_v_ptr,  # [B, T] dtype of values
    # shapes and scalars
    T,
    clip,
    # meta
    HAS_CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < T
    base = b * T
    acc = row_scale_ptr.dtype.element_ty
    scale = tl.load(grad_ptr).to(acc) * tl.load(row_scale_ptr + b)
    m = (tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0) & ((offs * 0 + scale) != 0)
    v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(acc)
    vo = tl.load(vo_ptr + base + offs, mask=m, other=0.0).to(acc)
    ret = tl.load(ret_ptr + base + offs, mask=m, other=0.0).to(acc)
    loss, d, clipped = _value_token(v, vo, ret, clip, HAS_CLIP)
    g = tl.where(m, scale * d, 0.0)
    tl.store(g_v_ptr + base + offs, g.to(g_v_ptr.dtype.element_ty), mask=inb)


def _prep(values, old_values, returns, mask):
    acc = acc_dtype(values)
    mask = bool_mask(mask).contiguous()
    return acc, values.contiguous(), old_values.contiguous(), returns.to(acc).contiguous(), mask


@triton_op("ppokernels::value_loss_triton", mutates_args=())
def value_loss_triton(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    agg: str,
    num_tokens: float | None,
    num_seqs: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc, v, vo, ret, mask = _prep(values, old_values, returns, mask)
    B, T = v.shape
    part = torch.empty((B, 4), dtype=acc, device=v.device)
    loss = torch.empty((), dtype=acc, device=v.device)
    clipfrac = torch.empty((), dtype=acc, device=v.device)
    row_scale = torch.empty((B,), dtype=acc, device=v.device)
    if B > 0:
        launch(_value_loss_row_kernel)[(B,)](
            v, vo, ret, mask, part, T, clip or 0.0, HAS_CLIP=clip is not None, **ROW_CONFIG
        )
    launch(_value_loss_finalize_kernel)[(1,)](
        part,
        loss,
        clipfrac,
        row_scale,
        B,
        T,
        num_tokens or 0.0,
        num_seqs or 0.0,
        AGG=AGG[agg],
        **FINALIZE_CONFIG,
    )
    return loss, clipfrac, row_scale


@triton_op("ppokernels::value_loss_backward_triton", mutates_args=())
def value_loss_backward_triton(
    grad: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    row_scale: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:
    acc, v, vo, ret, mask = _prep(values, old_values, returns, mask)
    B, T = v.shape
    g_v = torch.empty_like(v)
    if B > 0 and T > 0:
        launch(_value_loss_bwd_kernel)[(B, triton.cdiv(T, ROW_CONFIG["BLOCK"]))](
            grad.to(acc),
            v,
            vo,
            ret,
            mask,
            row_scale.to(acc).contiguous(),
            g_v,
            T,
            clip or 0.0,
            HAS_CLIP=clip is not None,
            **ROW_CONFIG,
        )
    return g_v


# ------------------------------------------------------------ ahead-of-time compile table
_V = {"v_ptr": "*T", "vo_ptr": "*T", "ret_ptr": "*A", "mask_ptr": "*i1"}
_CLIP = [dict(HAS_CLIP=True), dict(HAS_CLIP=False)]
AOT = (
    aot_table(
        _value_loss_row_kernel,
        {**_V, "part_ptr": "*A", "T": "i64", "clip": "fp32"},
        lambda dt: ROW_CONFIG,
        variants=_CLIP,
    )
    + aot_table(
        _value_loss_bwd_kernel,
        {
            "grad_ptr": "*A",
            **_V,
            "row_scale_ptr": "*A",
            "g_v_ptr": "*T",
            "T": "i64",
            "clip": "fp32",
        },
        lambda dt: ROW_CONFIG,
        variants=_CLIP,
    )
    + aot_table(
        _value_loss_finalize_kernel,
        {
            "part_ptr": "*A",
            "loss_ptr": "*A",
            "clipfrac_ptr": "*A",
            "row_scale_ptr": "*A",
            "B": "i64",
            "T": "i64",
            "num_tokens": "fp32",
            "num_seqs": "fp32",
        },
        lambda dt: FINALIZE_CONFIG,
        dtypes=("fp32", "fp64"),
        variants=[dict(AGG=a) for a in AGG.values()],
    )
)
