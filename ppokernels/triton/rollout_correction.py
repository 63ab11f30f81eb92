"""Triton kernel of rollout_correction: one program per row, two sweeps of BLOCK tokens (the
second from cache), the rejection criteria as [NC, BLOCK] tiles (one row of the tile per
criterion, NC the count rounded up to a power of two).

Math and vocabularies as ``csrc/include/ppokernels/rollout_correction.h`` and
``ppokernels/reference/rollout_correction.py`` (codes are positions in its tuples). Bytes moved:
2 sweeps x (2 log-probs + mask) read, weights + mask written, once per token.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels._dtypes import acc_dtype
from ppokernels.reference.rollout_correction import (
    CRITERION_AGGS,
    CRITERION_STATS,
    ESTIMATORS,
    LEVELS,
    MODES,
    PROB_EPS,
    ROW_STATS,
)
from ppokernels.triton._common import aot_table, expm1_minus_y, launch

CONFIG = dict(BLOCK=512, num_warps=8, num_stages=1)
_NR = len(ROW_STATS)
_EPS: tl.constexpr = tl.constexpr(PROB_EPS)
_ONE_BITS = {torch.float16: 0x3C00, torch.bfloat16: 0x3F80}
_NS = len(CRITERION_STATS)


@triton.jit
def _estimator(est, xc, lp, rlp):
    """[NC, BLOCK] statistics: est [NC, 1] codes (k1, k2, k3, binary_kl, tv), the rest
    [1, BLOCK]."""
    p = tl.minimum(tl.maximum(tl.exp(rlp), _EPS), 1.0 - _EPS)
    q = tl.minimum(tl.maximum(tl.exp(lp), _EPS), 1.0 - _EPS)
    bkl = p * tl.log(p / q) + (1.0 - p) * tl.log((1.0 - p) / (1.0 - q))
    out = tl.where(est == 0, -xc, 0.5 * xc * xc)
    out = tl.where(est == 2, expm1_minus_y(xc), out)
    out = tl.where(est == 3, bkl, out)
    return tl.where(est == 4, tl.abs(p - q), out)


@triton.jit
def _valid(ptr, inb, MASK_BITS: tl.constexpr):
    m = tl.load(ptr, mask=inb, other=0)
    if MASK_BITS:
        m = m & 0x7FFF  # -0.0 is 0
    return (m != 0) & inb


@triton.jit
def _bound(raw, lower, upper, MODE: tl.constexpr):
    if MODE == 0:
        w = tl.minimum(tl.maximum(raw, lower), upper)
    else:
        w = tl.where((raw >= lower) & (raw <= upper), raw, 0.0)
    return w


@triton.jit
def _rollout_correction_row_kernel(
    # inputs
    lp_ptr,  # [B, T] fp32/fp64/bf16/fp16, the trainer's log-probs
    rlp_ptr,  # [B, T] same dtype, the sampler's
    mask_ptr,  # [B, T] any dtype, nonzero = valid (fp16 / bf16: their bits as int16)
    crit_ptr,  # [5, NC] fp32 (fp64): agg code, estimator code, lower, upper, std clamp floor
    # outputs
    w_ptr,  # [B, T] fp32 (fp64) weights
    keep_ptr,  # [B, T] the mask's dtype, the rejection mask
    stats_ptr,  # [B, 18 + 9 * n_crit] fp32 (fp64) row statistics
    # shapes and scalars
    T,
    n_crit,
    lower,  # weight bounds (+-inf: none)
    upper,
    report_low,
    clamp,  # log-ratio clamp (inf: none)
    one_bits,  # MASK_BITS: the int16 bits of 1.0 in the mask's half dtype
    # meta
    MASK_BITS: tl.constexpr,  # the mask is a half dtype read as int16 bits (sign bit ignored)
    LEVEL: tl.constexpr,
    MODE: tl.constexpr,
    NC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    acc = w_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    ci = tl.arange(0, NC)
    c_on = ci < n_crit
    agg = tl.load(crit_ptr + ci, mask=c_on, other=0.0).to(tl.int32)[:, None]
    est = tl.load(crit_ptr + NC + ci, mask=c_on, other=0.0).to(tl.int32)[:, None]
    c_lo = tl.load(crit_ptr + 2 * NC + ci, mask=c_on, other=0.0).to(acc)
    c_hi = tl.load(crit_ptr + 3 * NC + ci, mask=c_on, other=0.0).to(acc)
    c_clo = tl.load(crit_ptr + 4 * NC + ci, mask=c_on, other=0.0).to(acc)
    is_tok = (agg == 0) & c_on[:, None]
    is_seq = (agg != 0) & c_on[:, None]
    zero = tl.zeros([BLOCK], dtype=acc)
    zero2 = tl.zeros([NC, BLOCK], dtype=acc)
    # ---- sweep 1: row sums, the sequence criteria's sums and maxima
    n = zero
    sx = zero
    slp = zero
    srlp = zero
    sk3 = zero
    srho = zero
    sabs = zero
    mabs = zero
    cs = zero2
    cm = zero2 - float("inf")
    for t0 in range(0, T, BLOCK):
        offs = t0 + cols
        inb = offs < T
        valid = _valid(mask_ptr + base + offs, inb, MASK_BITS)
        a = tl.where(valid, tl.load(lp_ptr + base + offs, mask=inb, other=0.0).to(acc), 0.0)
        b = tl.where(valid, tl.load(rlp_ptr + base + offs, mask=inb, other=0.0).to(acc), 0.0)
        x = a - b
        xc = tl.minimum(tl.maximum(x, -clamp), clamp)
        n += valid.to(acc)
        sx += x
        slp += a
        srlp += b
        sk3 += expm1_minus_y(x)
        srho += tl.where(valid, tl.exp(xc + xc), 0.0)
        sabs += tl.abs(x)
        mabs = tl.maximum(mabs, tl.abs(x))
        st = _estimator(est, xc[None, :], a[None, :], b[None, :])
        v2 = valid[None, :] & is_seq
        cs += tl.where(v2, st, 0.0)
        cm = tl.where(v2, tl.maximum(cm, st), cm)
    cnt = tl.sum(n, axis=0)
    sum_x = tl.sum(sx, axis=0)
    if LEVEL == 2:
        s = sum_x
    else:
        s = tl.where(cnt > 0, sum_x / tl.maximum(cnt, 1.0), 0.0)
    raw_row = tl.exp(tl.minimum(tl.maximum(s, -clamp), clamp))
    c_sum = tl.sum(cs, axis=1)
    c_max = tl.max(cm, axis=1)
    agg1 = tl.reshape(agg, [NC])
    v = tl.where(agg1 == 1, c_sum, tl.where(agg1 == 2, c_sum / tl.maximum(cnt, 1.0), c_max))
    v = tl.where(cnt > 0, v, 0.0)
    keep_row = ((v >= c_lo) & (v <= c_hi)).to(acc)
    # ---- sweep 2: weights, rejection mask, their statistics
    sw = zero
    sw2 = zero
    mw = zero - float("inf")
    nw = zero + float("inf")
    nh = zero
    nl = zero
    sr = zero
    nrej = zero
    t_sum = zero2
    t_max = zero2 - float("inf")
    t_min = zero2 + float("inf")
    t_hi = zero2
    t_lo = zero2
    t_sc = zero2
    t_sc2 = zero2
    t_rej = zero2
    for t0 in range(0, T, BLOCK):
        offs = t0 + cols
        inb = offs < T
        valid = _valid(mask_ptr + base + offs, inb, MASK_BITS)
        mv = valid.to(acc)
        a = tl.where(valid, tl.load(lp_ptr + base + offs, mask=inb, other=0.0).to(acc), 0.0)
        b = tl.where(valid, tl.load(rlp_ptr + base + offs, mask=inb, other=0.0).to(acc), 0.0)
        x = a - b
        xc = tl.minimum(tl.maximum(x, -clamp), clamp)
        if LEVEL == 0:
            raw = tl.where(valid, tl.exp(xc), 0.0)
        else:
            raw = tl.where(valid, zero + raw_row, 0.0)
        w = tl.where(valid, _bound(raw, lower, upper, MODE), 0.0)
        tl.store(w_ptr + base + offs, w, mask=inb)
        sw += w
        sw2 += w * w
        mw = tl.where(valid, tl.maximum(mw, w), mw)
        nw = tl.where(valid, tl.minimum(nw, w), nw)
        nh += tl.where(valid & (raw > upper), 1.0, 0.0)
        nl += tl.where(valid & (raw < report_low), 1.0, 0.0)
        sr += raw
        st = _estimator(est, xc[None, :], a[None, :], b[None, :])
        inside = ((st >= c_lo[:, None]) & (st <= c_hi[:, None])).to(acc)
        v2 = valid[None, :] & is_tok
        sc = tl.minimum(tl.maximum(st, c_clo[:, None]), c_hi[:, None])
        t_sum += tl.where(v2, st, 0.0)
        t_max = tl.where(v2, tl.maximum(t_max, st), t_max)
        t_min = tl.where(v2, tl.minimum(t_min, st), t_min)
        t_hi += tl.where(v2 & (st > c_hi[:, None]), 1.0, 0.0)
        t_lo += tl.where(v2 & (st < c_lo[:, None]), 1.0, 0.0)
        t_sc += tl.where(v2, sc, 0.0)
        t_sc2 += tl.where(v2, sc * sc, 0.0)
        t_rej += tl.where(v2, 1.0 - inside, 0.0)
        fail = tl.where(is_tok, 1.0 - inside, tl.where(is_seq, 1.0 - keep_row[:, None], 0.0))
        kp = mv * (1.0 - tl.max(fail, axis=0))
        nrej += mv - kp
        if MASK_BITS:
            kv = tl.where(kp > 0, one_bits, 0).to(keep_ptr.dtype.element_ty)
        else:
            kv = kp.to(keep_ptr.dtype.element_ty)
        tl.store(keep_ptr + base + offs, kv, mask=inb)
    # ---- row statistics
    out = stats_ptr + row * (18 + 9 * n_crit)
    tl.store(out + 0, cnt)
    tl.store(out + 1, sum_x)
    tl.store(out + 2, tl.sum(slp, axis=0))
    tl.store(out + 3, tl.sum(srlp, axis=0))
    tl.store(out + 4, tl.sum(sk3, axis=0))
    tl.store(out + 5, tl.sum(srho, axis=0))
    tl.store(out + 6, tl.sum(sabs, axis=0))
    tl.store(out + 7, tl.max(mabs, axis=0))
    tl.store(out + 8, s)
    tl.store(out + 9, _bound(raw_row, lower, upper, MODE))
    tl.store(out + 10, tl.sum(sw, axis=0))
    tl.store(out + 11, tl.sum(sw2, axis=0))
    tl.store(out + 12, tl.max(mw, axis=0))
    tl.store(out + 13, tl.min(nw, axis=0))
    tl.store(out + 14, tl.sum(nh, axis=0))
    tl.store(out + 15, tl.sum(nl, axis=0))
    tl.store(out + 16, tl.sum(sr, axis=0))
    tl.store(out + 17, tl.sum(nrej, axis=0))
    tok = agg1 == 0
    ts = tl.sum(t_sum, axis=1)
    has = cnt > 0
    vc = tl.minimum(tl.maximum(v, c_clo), c_hi)
    o = out + 18 + ci * 9
    tl.store(o + 0, tl.where(tok, tl.where(has, ts / tl.maximum(cnt, 1.0), 0.0), v), mask=c_on)
    tl.store(o + 1, tl.where(tok, ts, cnt * v), mask=c_on)
    tl.store(
        o + 2, tl.where(tok, tl.max(t_max, axis=1), tl.where(has, v, -float("inf"))), mask=c_on
    )
    tl.store(o + 3, tl.where(tok, tl.min(t_min, axis=1), tl.where(has, v, float("inf"))), mask=c_on)
    tl.store(o + 4, tl.where(tok, tl.sum(t_hi, axis=1), tl.where(v > c_hi, cnt, 0.0)), mask=c_on)
    tl.store(o + 5, tl.where(tok, tl.sum(t_lo, axis=1), tl.where(v < c_lo, cnt, 0.0)), mask=c_on)
    tl.store(o + 6, tl.where(tok, tl.sum(t_sc, axis=1), cnt * vc), mask=c_on)
    tl.store(o + 7, tl.where(tok, tl.sum(t_sc2, axis=1), cnt * vc * vc), mask=c_on)
    tl.store(
        o + 8, tl.where(tok, tl.sum(t_rej, axis=1), tl.where(keep_row > 0, 0.0, cnt)), mask=c_on
    )


def _codes(criteria, crit_bounds, device, dtype):
    """[5, NC] table in the accumulation dtype: agg code, estimator code, lower, upper, std clamp
    floor."""
    nc = max(triton.next_power_of_2(len(criteria)), 1)
    table = torch.zeros(5, nc, dtype=torch.float64)
    for i, code in enumerate(criteria):
        agg, est = divmod(code, len(ESTIMATORS))
        lo, hi = crit_bounds[2 * i], crit_bounds[2 * i + 1]
        lo = -math.inf if math.isnan(lo) else lo
        hi = math.inf if math.isnan(hi) else hi
        table[:, i] = torch.tensor([agg, est, lo, hi, lo if lo > -math.inf else 0.0])
    return table.to(device=device, dtype=dtype), nc


@triton_op("ppokernels::rollout_correction_triton", mutates_args=())
def rollout_correction_triton(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    mode: str,
    bounds: list[float],
    logratio_clamp: float | None,
    criteria: list[int],
    criteria_bounds: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp, rlp, m = logprobs.contiguous(), rollout_logprobs.contiguous(), mask.contiguous()
    B, T = lp.shape
    acc = acc_dtype(lp)
    weights = torch.empty((B, T), dtype=acc, device=lp.device)
    keep = torch.empty((B, T), dtype=m.dtype, device=lp.device)
    half = m.dtype in _ONE_BITS  # read and written as int16 bits (one kernel for every dtype)
    m_k, keep_k = (m.view(torch.int16), keep.view(torch.int16)) if half else (m, keep)
    stats = torch.empty((B, _NR + _NS * len(criteria)), dtype=acc, device=lp.device)
    lower = -math.inf if math.isnan(bounds[0]) else bounds[0]
    upper = math.inf if math.isnan(bounds[1]) else bounds[1]
    report_low = lower if lower > -math.inf else (1.0 / upper if upper < math.inf else -math.inf)
    clamp = math.inf if logratio_clamp is None else logratio_clamp
    table, nc = _codes(criteria, criteria_bounds, lp.device, acc)
    if B > 0:
        launch(_rollout_correction_row_kernel)[(B,)](
            lp,
            rlp,
            m_k,
            table,
            weights,
            keep_k,
            stats,
            T,
            len(criteria),
            lower,
            upper,
            report_low,
            clamp,
            _ONE_BITS.get(m.dtype, 1),
            MASK_BITS=half,
            LEVEL=LEVELS.index(level),
            MODE=MODES.index(mode),
            NC=nc,
            **CONFIG,
        )
    return weights, keep, stats


# ------------------------------------------------------------ ahead-of-time compile table
_SIG = {
    "lp_ptr": "*T",
    "rlp_ptr": "*T",
    "mask_ptr": "*i1",
    "crit_ptr": "*A",
    "w_ptr": "*A",
    "keep_ptr": "*i1",
    "stats_ptr": "*A",
    "T": "i64",
    "n_crit": "i32",
    "lower": "fp32",
    "upper": "fp32",
    "report_low": "fp32",
    "clamp": "fp32",
    "one_bits": "i32",
}
AOT = aot_table(
    _rollout_correction_row_kernel,
    _SIG,
    lambda dt: CONFIG,
    variants=[
        dict(LEVEL=0, MODE=0, NC=2, MASK_BITS=False),
        dict(LEVEL=1, MODE=1, NC=4, MASK_BITS=False),
        dict(LEVEL=2, MODE=0, NC=1, MASK_BITS=False),
    ],
)
assert len(CRITERION_AGGS) == 4 and len(ESTIMATORS) == 5  # the codes the kernel spells out
