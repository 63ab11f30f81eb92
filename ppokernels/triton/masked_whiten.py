"""Triton kernels of masked_mean, masked_var and masked_whiten.

Math and the statistics layout as in ``csrc/include/ppokernels/masked_whiten.h``. Each statistic
is a
deterministic two-level reduction: ``_masked_whiten_partials_kernel`` sums fixed chunks of CHUNK
entries (one program each, fp32 lanes reduced by tl.sum's fixed tree; fp64 for fp64 x) into fp64
partials, and ``_masked_whiten_finalize_kernel`` (one program) sums the partials in a fixed order
and derives the statistics on the device, so no host synchronisation is needed between the passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels._dtypes import acc_dtype
from ppokernels.triton._common import aot_table, launch

# Launch table (read by the launchers and the AOT table). BLOCK and TILES fix the reduction order,
# so they never depend on the input (determinism).
CONFIG = dict(BLOCK=1024, num_warps=4, num_stages=3)
TILES = 8
CHUNK = CONFIG["BLOCK"] * TILES  # entries per partial
NUM_STATS = 8  # count, mean, sum g, var, rstd, sum g (x - mean), coef_g, coef_h


@triton.jit
def _masked_whiten_partials_kernel(
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
        # feeds_stats_grad (masked_whiten.h): valid entries, or masked ones that are finite
        feed = inb & (m | (x - x == 0.0))
        if PASS_B:
            d = x - mean
            a0 += tl.where(m, d * d, 0.0)  # select: masked inf/NaN must not leak
            a1 += tl.where(feed, g * d, 0.0)
        else:
            a0 += tl.where(m, 1.0, 0.0)
            a1 += tl.where(m, x, 0.0)
            a2 += tl.where(feed, g, 0.0)
    tl.store(part_ptr + pid * 3 + 0, tl.sum(a0, axis=0).to(tl.float64))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(a1, axis=0).to(tl.float64))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(a2, axis=0).to(tl.float64))


@triton.jit
def _masked_whiten_finalize_kernel(
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
def _masked_whiten_elementwise_kernel(
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
        # selected, not multiplied by m: NaN padding at masked entries gives 0 (masked_whiten.h)
        y = tl.load(stats_ptr + 4).to(acc) * g + tl.where(m > 0, cg - ch * (x - mean), 0.0)
    else:
        mean = tl.load(stats_ptr + 0).to(acc)
        cnt = tl.load(stats_ptr + 2).to(acc)
        if UNBIASED:
            d = cnt - 1.0
        else:
            d = cnt
        m = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0).to(acc)
        # moments_coefs of masked_whiten.h: 0 where the statistic is undefined or gets no gradient
        g_mean = tl.load(g_ptr + 0).to(acc)
        g_var = tl.load(g_ptr + 1).to(acc)
        c_mean = tl.where((cnt > 0) & (g_mean != 0), g_mean / tl.maximum(cnt, 1.0), 0.0)
        c_var = tl.where((d > 0) & (g_var != 0), 2.0 * g_var / tl.maximum(d, 1.0), 0.0)
        y = tl.where(m > 0, c_mean + c_var * (x - mean), 0.0)
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
            launch(_masked_whiten_partials_kernel)[(p,)](
                x,
                mask,
                g if g is not None else x,
                stats,
                part,
                n,
                PASS_B=pass_b,
                HAS_G=g is not None,
                F64=f64,
                TILES=TILES,
                **CONFIG,
            )
        launch(_masked_whiten_finalize_kernel)[(1,)](
            part,
            stats,
            p,
            eps,
            PASS_B=pass_b,
            UNBIASED=unbiased,
            SHIFT_MEAN=shift_mean,
            **CONFIG,
        )
    return stats


def _mask(mask: torch.Tensor) -> torch.Tensor:
    # bool storage is read as int1 by Triton; uint8 view keeps the 1-byte loads
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()


def _elementwise(mode, x, mask, g, stats, out, shift_mean=True, unbiased=True):
    n = x.numel()
    if n > 0:
        launch(_masked_whiten_elementwise_kernel)[(triton.cdiv(n, CONFIG["BLOCK"]),)](
            x,
            mask,
            g if g is not None else x,
            stats,
            out,
            n,
            MODE=mode,
            SHIFT_MEAN=shift_mean,
            UNBIASED=unbiased,
            F64=x.dtype == torch.float64,
            **CONFIG,
        )
    return out


@triton_op("ppokernels::masked_moments_triton", mutates_args=())
def masked_moments_triton(x: torch.Tensor, mask: torch.Tensor, unbiased: bool) -> torch.Tensor:
    stats = _stats(x.contiguous(), _mask(mask), None, unbiased, True, 0.0)
    return stats[[1, 3, 0]].to(acc_dtype(x))


@triton_op("ppokernels::masked_moments_backward_triton", mutates_args=())
def masked_moments_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor, unbiased: bool
) -> torch.Tensor:
    xc = x.contiguous()
    g = grad.to(acc_dtype(x)).contiguous()
    out = torch.empty(xc.shape, dtype=x.dtype, device=x.device)
    return _elementwise(2, xc, _mask(mask), g, moments.contiguous(), out, unbiased=unbiased)


@triton_op("ppokernels::masked_whiten_triton", mutates_args=())
def masked_whiten_triton(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float
) -> torch.Tensor:
    xc, m = x.contiguous(), _mask(mask)
    stats = _stats(xc, m, None, unbiased, shift_mean, eps)
    out = torch.empty(xc.shape, dtype=acc_dtype(x), device=x.device)
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
    g = grad.to(acc_dtype(x)).contiguous()
    stats = _stats(xc, m, g, unbiased, shift_mean, eps)
    out = torch.empty(xc.shape, dtype=x.dtype, device=x.device)
    return _elementwise(1, xc, m, g, stats, out)


# ------------------------------------------------------------ ahead-of-time compile table
def _config(dt: str) -> dict:
    return CONFIG


_F64 = lambda dt: dt == "fp64"  # noqa: E731  (the kernels' accumulator switch)
_PART_SIG = {
    "x_ptr": "*T",
    "mask_ptr": "*u8",
    "g_ptr": "*A",
    "stats_ptr": "*fp64",
    "part_ptr": "*fp64",
    "n": "i64",
}
_FIN_SIG = {"part_ptr": "*fp64", "stats_ptr": "*fp64", "P": "i64", "eps": "fp32"}
_EW_SIG = {"x_ptr": "*T", "mask_ptr": "*u8", "g_ptr": "*A", "n": "i64"}
AOT = (
    aot_table(
        _masked_whiten_partials_kernel,
        _PART_SIG,
        _config,
        variants=[
            dict(PASS_B=b, HAS_G=h, F64=_F64, TILES=TILES)
            for b in (False, True)
            for h in (True, False)
        ],
    )
    + aot_table(
        _masked_whiten_finalize_kernel,
        _FIN_SIG,
        _config,
        dtypes=("fp32",),
        variants=[
            dict(PASS_B=b, UNBIASED=u, SHIFT_MEAN=m)
            for b in (False, True)
            for u in (True, False)
            for m in (True, False)
        ],
    )
    # whiten (MODE 0): out in the accumulator dtype; the backwards (1, 2): out in x's dtype
    + aot_table(
        _masked_whiten_elementwise_kernel,
        {**_EW_SIG, "stats_ptr": "*fp64", "out_ptr": "*A"},
        _config,
        variants=[dict(MODE=0, SHIFT_MEAN=m, UNBIASED=True, F64=_F64) for m in (True, False)],
    )
    + aot_table(
        _masked_whiten_elementwise_kernel,
        {**_EW_SIG, "stats_ptr": "*fp64", "out_ptr": "*T"},
        _config,
        variants=[dict(MODE=1, SHIFT_MEAN=True, UNBIASED=True, F64=_F64)],
    )
    # moments backward: stats_ptr holds the op's own output (mean, var, count), accumulator dtype
    + aot_table(
        _masked_whiten_elementwise_kernel,
        {**_EW_SIG, "stats_ptr": "*A", "out_ptr": "*T"},
        _config,
        variants=[
            dict(MODE=2, SHIFT_MEAN=True, UNBIASED=True, F64=_F64),
            dict(MODE=2, SHIFT_MEAN=True, UNBIASED=False, F64=_F64),
        ],
    )
)
