"""Triton kernels of the advantages family: masked moments and masked whitening.

Math and the statistics layout as in ``csrc/include/ppokernels/advantages.h``. Each statistic is a
deterministic two-level reduction: ``_partials_kernel`` sums fixed chunks of CHUNK entries (one
program each, fp32 lanes reduced by tl.sum's fixed tree; fp64 for fp64 x) into fp64 partials, and
``_finalize_kernel`` (one program) sums the partials in a fixed order and derives the statistics
on the device, so no host synchronisation is needed between the passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels.triton._common import aot, launch

BLOCK = 1024
TILES = 8
CHUNK = BLOCK * TILES  # entries per partial (fixed: determinism)
NUM_STATS = 8  # count, mean, sum g, var, rstd, sum g (x - mean), coef_g, coef_h


@triton.jit
def _partials_kernel(
    # inputs
    x_ptr,  # [n] fp32/fp64/bf16/fp16
    mask_ptr,  # [n] any dtype, valid where != 0
    g_ptr,  # [n] fp32 (fp64 for fp64 x), upstream gradient; read when HAS_G
    stats_ptr,  # [NUM_STATS] fp64, the mean is read in pass B
    # outputs
    part_ptr,  # [P, 3] fp64 partial sums of this pass
    # shapes
    n,
    # meta
    # False: (sum m, sum m x, sum g); True: (sum m d^2, sum g d, 0) with d = x - mean
    PASS_B: tl.constexpr,
    HAS_G: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    a0 = tl.zeros([BLOCK], acc)
    a1 = tl.zeros([BLOCK], acc)
    a2 = tl.zeros([BLOCK], acc)
    mean = tl.load(stats_ptr + 1).to(acc)
    for t in tl.static_range(TILES):
        offs = (pid * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(acc)
        m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        g = tl.zeros([BLOCK], acc)
        if HAS_G:
            g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(acc)
        if PASS_B:
            d = x - mean
            a0 += tl.where(m, d * d, 0.0)  # select: masked inf/NaN must not leak
            a1 += tl.where(inb, g * d, 0.0)
        else:
            a0 += tl.where(m, 1.0, 0.0)
            a1 += tl.where(m, x, 0.0)
            a2 += g
    tl.store(part_ptr + pid * 3 + 0, tl.sum(a0, axis=0).to(tl.float64))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(a1, axis=0).to(tl.float64))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(a2, axis=0).to(tl.float64))


@triton.jit
def _finalize_kernel(
    part_ptr,  # [P, 3] fp64 partial sums
    stats_ptr,  # [NUM_STATS] fp64, written (pass A: count, mean, sum g; pass B: the rest)
    P,
    eps,  # added to the variance
    PASS_B: tl.constexpr,
    UNBIASED: tl.constexpr,
    SHIFT_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    s0 = tl.zeros([BLOCK], tl.float64)
    s1 = tl.zeros([BLOCK], tl.float64)
    s2 = tl.zeros([BLOCK], tl.float64)
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < P
        s0 += tl.load(part_ptr + offs * 3 + 0, mask=ok, other=0.0)
        s1 += tl.load(part_ptr + offs * 3 + 1, mask=ok, other=0.0)
        s2 += tl.load(part_ptr + offs * 3 + 2, mask=ok, other=0.0)
    t0 = tl.sum(s0, axis=0)
    t1 = tl.sum(s1, axis=0)
    t2 = tl.sum(s2, axis=0)
    if PASS_B:
        n = tl.load(stats_ptr + 0)
        sum_g = tl.load(stats_ptr + 2)
        if UNBIASED:
            d = n - 1.0
        else:
            d = n
        # d <= 0 only without enough entries, where t0 == 0: 0 / 0 = NaN, as torch.var
        var = t0 / tl.maximum(d, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        if SHIFT_MEAN:
            coef_g = -rstd * sum_g / n
        else:
            coef_g = (1.0 - rstd) * sum_g / n
        tl.store(stats_ptr + 3, var)
        tl.store(stats_ptr + 4, rstd)
        tl.store(stats_ptr + 5, t1)
        tl.store(stats_ptr + 6, coef_g)
        tl.store(stats_ptr + 7, rstd * rstd * rstd * t1 / d)
    else:
        tl.store(stats_ptr + 0, t0)
        tl.store(stats_ptr + 1, t1 / t0)  # 0 / 0 = NaN for an empty mask, as torch.mean
        tl.store(stats_ptr + 2, t2)


@triton.jit
def _elementwise_kernel(
    x_ptr,  # [n]
    mask_ptr,  # [n] any dtype
    g_ptr,  # [n] upstream gradient (MODE 1) or [3] gradient of the moments (MODE 2), acc dtype
    stats_ptr,  # [NUM_STATS] fp64 (MODE 0, 1) or [3] moments (mean, var, count) (MODE 2)
    out_ptr,  # [n] whitened x (MODE 0, acc dtype) or dx (MODE 1, 2; dtype of x)
    n,
    MODE: tl.constexpr,  # 0: whiten, 1: whiten backward, 2: moments backward
    SHIFT_MEAN: tl.constexpr,
    UNBIASED: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(acc)
    if MODE == 0:
        mean = tl.load(stats_ptr + 1).to(acc)
        y = (x - mean) * tl.load(stats_ptr + 4).to(acc)
        if not SHIFT_MEAN:
            y += mean
    elif MODE == 1:
        mean = tl.load(stats_ptr + 1).to(acc)
        m = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0).to(acc)
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(acc)
        cg = tl.load(stats_ptr + 6).to(acc)
        ch = tl.load(stats_ptr + 7).to(acc)
        y = tl.load(stats_ptr + 4).to(acc) * g + m * (cg - ch * (x - mean))
    else:
        mean = tl.load(stats_ptr + 0).to(acc)
        cnt = tl.load(stats_ptr + 2).to(acc)
        if UNBIASED:
            d = cnt - 1.0
        else:
            d = cnt
        m = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0).to(acc)
        c_mean = tl.load(g_ptr + 0).to(acc) / cnt
        c_var = 2.0 * tl.load(g_ptr + 1).to(acc) / d
        y = m * (c_mean + c_var * (x - mean))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inb)


def _stats(x, mask, g, unbiased: bool, shift_mean: bool, eps: float) -> torch.Tensor:
    """Both reduction passes: the fp64 [NUM_STATS] statistics buffer, on x's device."""
    n = x.numel()
    p = triton.cdiv(n, CHUNK)
    stats = torch.zeros(NUM_STATS, dtype=torch.float64, device=x.device)
    part = torch.empty(max(p, 1) * 3, dtype=torch.float64, device=x.device)
    f64 = x.dtype == torch.float64
    for pass_b in (False, True):
        if p > 0:
            launch(_partials_kernel)[(p,)](
                x, mask, g if g is not None else x, stats, part, n,
                PASS_B=pass_b, HAS_G=g is not None, F64=f64, BLOCK=BLOCK, TILES=TILES,
            )  # fmt: skip
        launch(_finalize_kernel)[(1,)](
            part, stats, p, eps, PASS_B=pass_b, UNBIASED=unbiased, SHIFT_MEAN=shift_mean,
            BLOCK=BLOCK,
        )  # fmt: skip
    return stats


def _mask(mask: torch.Tensor) -> torch.Tensor:
    # bool storage is read as int1 by Triton; uint8 view keeps the 1-byte loads
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()


def _elementwise(mode, x, mask, g, stats, out, shift_mean=True, unbiased=True):
    n = x.numel()
    if n > 0:
        launch(_elementwise_kernel)[(triton.cdiv(n, BLOCK),)](
            x, mask, g if g is not None else x, stats, out, n, MODE=mode, SHIFT_MEAN=shift_mean,
            UNBIASED=unbiased, F64=x.dtype == torch.float64, BLOCK=BLOCK,
        )  # fmt: skip
    return out


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@triton_op("ppokernels::masked_moments_triton", mutates_args=())
def masked_moments_triton(x: torch.Tensor, mask: torch.Tensor, unbiased: bool) -> torch.Tensor:
    stats = _stats(x.contiguous(), _mask(mask), None, unbiased, True, 0.0)
    return stats[[1, 3, 0]].to(_acc(x))


@triton_op("ppokernels::masked_moments_backward_triton", mutates_args=())
def masked_moments_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor, unbiased: bool
) -> torch.Tensor:
    xc = x.contiguous()
    g = grad.to(_acc(x)).contiguous()
    out = torch.empty(xc.shape, dtype=x.dtype, device=x.device)
    return _elementwise(2, xc, _mask(mask), g, moments.contiguous(), out, unbiased=unbiased)


@triton_op("ppokernels::masked_whiten_triton", mutates_args=())
def masked_whiten_triton(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float
) -> torch.Tensor:
    xc, m = x.contiguous(), _mask(mask)
    stats = _stats(xc, m, None, unbiased, shift_mean, eps)
    out = torch.empty(xc.shape, dtype=_acc(x), device=x.device)
    return _elementwise(0, xc, m, None, stats, out, shift_mean=shift_mean)


@triton_op("ppokernels::masked_whiten_backward_triton", mutates_args=())
def masked_whiten_backward_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool,
    unbiased: bool,
    eps: float,
) -> torch.Tensor:
    xc, m = x.contiguous(), _mask(mask)
    g = grad.to(_acc(x)).contiguous()
    stats = _stats(xc, m, g, unbiased, shift_mean, eps)
    out = torch.empty(xc.shape, dtype=x.dtype, device=x.device)
    return _elementwise(1, xc, m, g, stats, out)


for _pass_b in (False, True):
    _sig = {"x_ptr": "*bf16", "mask_ptr": "*u8", "g_ptr": "*fp32", "stats_ptr": "*fp64",
            "part_ptr": "*fp64", "n": "i64"}  # fmt: skip
    aot(_partials_kernel, _sig, PASS_B=_pass_b, HAS_G=True, F64=False, BLOCK=BLOCK, TILES=TILES)
    _sig = {"part_ptr": "*fp64", "stats_ptr": "*fp64", "P": "i64", "eps": "fp32"}
    aot(_finalize_kernel, _sig, PASS_B=_pass_b, UNBIASED=True, SHIFT_MEAN=False, BLOCK=BLOCK)
_sig = {"x_ptr": "*fp64", "mask_ptr": "*i64", "g_ptr": "*fp64", "stats_ptr": "*fp64",
        "part_ptr": "*fp64", "n": "i64"}  # fmt: skip
aot(_partials_kernel, _sig, PASS_B=True, HAS_G=True, F64=True, BLOCK=BLOCK, TILES=TILES)
for _mode in (0, 1, 2):
    _sig = {"x_ptr": "*fp32", "mask_ptr": "*u8", "g_ptr": "*fp32", "stats_ptr": "*fp64",
            "out_ptr": "*fp32", "n": "i64"}  # fmt: skip
    aot(_elementwise_kernel, _sig, MODE=_mode, SHIFT_MEAN=False, UNBIASED=True, F64=False,
        BLOCK=BLOCK)  # fmt: skip
