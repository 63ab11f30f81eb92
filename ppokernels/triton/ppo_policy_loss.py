"""Triton kernels of ppo_policy_loss: the policy losses, forward and backward.

Math as in ``csrc/include/ppokernels/ppo_policy_loss.h``. Forward: one program per row reduces the
row
into partial sums (``_ppo_policy_loss_row_kernel``), then one program reduces the rows in a fixed
order and applies the aggregation weights (``_ppo_policy_loss_finalize_kernel``): deterministic,
no atomics.
Backward: elementwise over [B, T] with the per-row weight saved by the forward.
Scalars travel as fp32 (Triton's type for Python floats), also for fp64 data.
The value loss is in ``value_loss.py``, the per-token math in ``ppo_policy_loss_math.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels._dtypes import acc_dtype, bool_mask
from ppokernels.triton._common import aot_table, launch
from ppokernels.triton.agg import AGG, FINALIZE_CONFIG, ROW_CONFIG, _agg_scale
from ppokernels.triton.kl_penalty import ESTIMATORS
from ppokernels.triton.kl_penalty import _value as _kl_value
from ppokernels.triton.ppo_policy_loss_math import (
    LOG_1E8,
    MODES,
    K,
    _kl_grad,
    _mode_backward,
    _mode_forward,
    _row_terms,
    mode_scalars,
)


@triton.jit
def _ppo_policy_loss_row_kernel(
    # inputs, [B, T] unless noted
    lp_ptr,
    old_ptr,
    ref_ptr,
    ent_ptr,  # dtype of logprobs (ref/ent: used if HAS_REF/HAS_ENT)
    adv_ptr,
    w_ptr,  # fp32/fp64, [B, T] or [B] (ADV_ROW / W_ROW)
    mask_ptr,  # bool
    # outputs
    part_ptr,  # [B, K] fp32/fp64 per-row partial sums
    rowv_ptr,  # [B, 2] the row values ra, rb (ppo_loss_modes.h policy_row_values)
    # shapes and scalars
    T,
    clip_low,
    clip_high,
    dual,
    lr_clamp,
    kl_clamp,
    mp0,
    mp1,
    mp2,
    mp3,  # mp*: mode params
    # meta
    HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_W: tl.constexpr,
    ADV_ROW: tl.constexpr,
    W_ROW: tl.constexpr,
    MODE: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_LR_CLAMP: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_KL_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc = part_ptr.dtype.element_ty
    base = b * T
    ra = tl.zeros([BLOCK], acc)
    rb = tl.zeros([BLOCK], acc)
    row_loss = 0.0
    if MODE == 1 or MODE == 5 or MODE == 9:  # first pass: the row's sequence-level values
        a0, a1, a2, an = ra, ra, ra, ra
        for t0 in range(0, T, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            m = tl.load(mask_ptr + base + offs, mask=offs < T, other=0) != 0
            lr = tl.load(lp_ptr + base + offs, mask=m, other=0.0).to(acc) - tl.load(
                old_ptr + base + offs, mask=m, other=0.0
            ).to(acc)
            if HAS_LR_CLAMP:
                lr = tl.minimum(tl.maximum(lr, -lr_clamp), lr_clamp)
            adv = _load_row_or_token(adv_ptr, b, base, offs, m, ADV_ROW, 0.0)
            w = _load_w(w_ptr, b, base, offs, m, lr, HAS_W, W_ROW)
            s0, s1, s2 = _row_terms(lr, adv, w, clip_low, clip_high, MODE, HAS_W)
            a0 += tl.where(m, s0, 0.0)
            a1 += tl.where(m, s1, 0.0)
            a2 += tl.where(m, s2, 0.0)
            an += m.to(acc)
        s0 = tl.sum(a0)
        s1 = tl.sum(a1)
        n = tl.sum(an)
        if MODE == 1:
            ra += s0 / tl.maximum(n, 1.0)
        elif MODE == 9:
            ra += tl.minimum(tl.maximum(s0 + s1, LOG_1E8), 20.0)
        else:
            d = n + 1e-8
            lrho = s0 / d
            sw = 1.0
            if HAS_W:
                sw = tl.exp(tl.sum(a2) / d)
            row_loss = -(s1 / d) * tl.exp(lrho) * sw
            ra += lrho
            rb += row_loss / d
    tl.store(rowv_ptr + b * 2, tl.max(ra, 0))
    tl.store(rowv_ptr + b * 2 + 1, tl.max(rb, 0))
    zero = tl.zeros([BLOCK], acc)
    a_n, a_loss, a_kl, a_ent, a_clip, a_nlr, a_dual = zero, zero, zero, zero, zero, zero, zero
    for t0 in range(0, T, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        m = tl.load(mask_ptr + base + offs, mask=offs < T, other=0) != 0
        lp = tl.load(lp_ptr + base + offs, mask=m, other=0.0).to(acc)
        old = tl.load(old_ptr + base + offs, mask=m, other=0.0).to(acc)
        lr = lp - old
        if HAS_LR_CLAMP:
            lr = tl.minimum(tl.maximum(lr, -lr_clamp), lr_clamp)
        adv = _load_row_or_token(adv_ptr, b, base, offs, m, ADV_ROW, 0.0)
        w = _load_w(w_ptr, b, base, offs, m, lr, HAS_W, W_ROW)
        loss, c0, c1 = _mode_forward(
            lp, old, lr, adv, w, ra, clip_low, clip_high, dual, mp0, mp1, mp2, mp3, MODE, HAS_DUAL
        )
        if HAS_REF:
            ref = tl.load(ref_ptr + base + offs, mask=m, other=0.0).to(acc)
            kl = _kl_value(lp - ref, KL_EST)
            if HAS_KL_CLAMP:
                kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
            a_kl += tl.where(m, kl, 0.0)
        if HAS_ENT:
            a_ent += tl.where(m, tl.load(ent_ptr + base + offs, mask=m, other=0.0).to(acc), 0.0)
        a_n += m.to(acc)
        a_loss += tl.where(m, loss, 0.0)
        a_clip += tl.where(m, c0, 0.0)
        a_nlr += tl.where(m, -lr, 0.0)
        a_dual += tl.where(m, c1, 0.0)
    p = part_ptr + b * 8
    tl.store(p + 0, tl.sum(a_n))
    tl.store(p + 1, tl.sum(a_loss) + row_loss)  # + geo_mean's per-row loss
    tl.store(p + 2, tl.sum(a_kl))
    tl.store(p + 3, tl.sum(a_ent))
    tl.store(p + 4, tl.sum(a_clip))
    tl.store(p + 5, tl.sum(a_nlr))
    tl.store(p + 6, tl.sum(a_dual))


@triton.jit
def _load_w(w_ptr, b, base, offs, m, like, HAS_W: tl.constexpr, W_ROW: tl.constexpr):
    """The importance weights of row b at offs, 1 without weights."""
    if HAS_W:
        w = _load_row_or_token(w_ptr, b, base, offs, m, W_ROW, 1.0)
    else:
        w = like * 0.0 + 1.0
    return w


@triton.jit
def _load_row_or_token(ptr, b, base, offs, m, ROW: tl.constexpr, other):
    """[B] (ROW) or [B, T] fp32/fp64 values of row b at offs (other where not m)."""
    if ROW:
        return tl.load(ptr + b + offs * 0)
    return tl.load(ptr + base + offs, mask=m, other=other)


@triton.jit
def _ppo_policy_loss_finalize_kernel(
    # inputs
    part_ptr,  # [B, K] per-row partial sums
    rowv_ptr,  # [B, 2] ra, rb
    # outputs
    loss_ptr,  # [] loss
    metrics_ptr,  # [5] clipfrac, approx_kl, dual_clipfrac, kl, entropy
    row_stats_ptr,  # [B, 4] aggregation weight, ra, surrogate weight, rb
    # shapes and scalars
    B,
    T,
    num_tokens,
    num_seqs,
    kl_coef,
    entropy_coef,  # num_*: <= 0 means local counts
    # meta
    AGG: tl.constexpr,
    GEO: tl.constexpr,
    BLOCK_B: tl.constexpr,  # GEO: geo_mean's row weights
):
    acc = part_ptr.dtype.element_ty
    z = tl.zeros([BLOCK_B], acc)
    n_acc, clip_acc, nlr_acc, dual_acc = z, z, z, z
    for r0 in range(0, B, BLOCK_B):
        rows = (r0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        ok = rows < B
        n_acc += tl.load(part_ptr + rows * 8 + 0, mask=ok, other=0.0)
        clip_acc += tl.load(part_ptr + rows * 8 + 4, mask=ok, other=0.0)
        nlr_acc += tl.load(part_ptr + rows * 8 + 5, mask=ok, other=0.0)
        dual_acc += tl.load(part_ptr + rows * 8 + 6, mask=ok, other=0.0)
    n_total = tl.sum(n_acc)
    loss_acc, kl_acc, ent_acc = z, z, z
    for r0 in range(0, B, BLOCK_B):
        rows = (r0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        ok = rows < B
        n = tl.load(part_ptr + rows * 8 + 0, mask=ok, other=0.0)
        w = _agg_scale(n, n_total, num_tokens, num_seqs, B, T, AGG)
        w = tl.where(ok, w, 0.0)
        pg = tl.load(part_ptr + rows * 8 + 1, mask=ok, other=0.0)
        kl = tl.load(part_ptr + rows * 8 + 2, mask=ok, other=0.0)
        ent = tl.load(part_ptr + rows * 8 + 3, mask=ok, other=0.0)
        if GEO:  # the per-row surrogate is averaged over sequences (ppo_policy_loss.h)
            seqs = tl.where(num_seqs > 0, num_seqs, B * 1.0)
            inv = tl.where(seqs > 0, 1.0 / tl.maximum(seqs, 1e-30), 0.0)
            wp = tl.where(ok, inv + w * 0.0, 0.0)
        else:
            wp = w
        loss_acc += wp * pg + w * (kl_coef * kl - entropy_coef * ent)
        kl_acc += w * kl
        ent_acc += w * ent
        rs = row_stats_ptr + rows * 4
        tl.store(rs, w, mask=ok)
        tl.store(rs + 1, tl.load(rowv_ptr + rows * 2, mask=ok, other=0.0), mask=ok)
        tl.store(rs + 2, wp, mask=ok)
        tl.store(rs + 3, tl.load(rowv_ptr + rows * 2 + 1, mask=ok, other=0.0), mask=ok)
    inv = tl.where(n_total > 0, 1.0 / tl.maximum(n_total, 1.0), 0.0)
    tl.store(loss_ptr, tl.sum(loss_acc))
    tl.store(metrics_ptr + 0, tl.sum(clip_acc) * inv)
    tl.store(metrics_ptr + 1, tl.sum(nlr_acc) * inv)
    tl.store(metrics_ptr + 2, tl.sum(dual_acc) * inv)
    tl.store(metrics_ptr + 3, tl.sum(kl_acc))
    tl.store(metrics_ptr + 4, tl.sum(ent_acc))


@triton.jit
def _ppo_policy_loss_bwd_kernel(
    # inputs, [B, T] unless noted
    grad_ptr,  # [] upstream gradient of the loss, fp32/fp64
    lp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    w_ptr,
    mask_ptr,  # as in _ppo_policy_loss_row_kernel
    row_stats_ptr,  # [B, 4] aggregation weight, ra, surrogate weight, rb
    # outputs
    g_lp_ptr,
    g_ref_ptr,
    g_ent_ptr,  # dtype of logprobs (ref/ent: if HAS_REF/HAS_ENT)
    # shapes and scalars
    T,
    clip_low,
    clip_high,
    dual,
    lr_clamp,
    kl_coef,
    kl_clamp,
    entropy_coef,
    mp0,
    mp1,
    mp2,
    mp3,
    # meta
    HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_W: tl.constexpr,
    ADV_ROW: tl.constexpr,
    W_ROW: tl.constexpr,
    MODE: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_LR_CLAMP: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_KL_CLAMP: tl.constexpr,
    KL_ST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < T
    base = b * T
    acc = row_stats_ptr.dtype.element_ty
    m = tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0
    g_up = tl.load(grad_ptr).to(acc)
    scale = g_up * tl.load(row_stats_ptr + b * 4)
    scale_pg = g_up * tl.load(row_stats_ptr + b * 4 + 2)
    m = m & (((offs * 0 + scale) != 0) | ((offs * 0 + scale_pg) != 0))  # empty rows: no work
    ra = tl.load(row_stats_ptr + b * 4 + 1)
    rb = tl.load(row_stats_ptr + b * 4 + 3)
    lp = tl.load(lp_ptr + base + offs, mask=m, other=0.0).to(acc)
    old = tl.load(old_ptr + base + offs, mask=m, other=0.0).to(acc)
    raw = lp - old
    lr = raw
    cg = raw * 0.0 + 1.0
    if HAS_LR_CLAMP:
        lr = tl.minimum(tl.maximum(raw, -lr_clamp), lr_clamp)
        cg = tl.where((raw < -lr_clamp) | (raw > lr_clamp), 0.0, 1.0)
    adv = _load_row_or_token(adv_ptr, b, base, offs, m, ADV_ROW, 0.0)
    w = _load_w(w_ptr, b, base, offs, m, lr, HAS_W, W_ROW)
    g = scale_pg * _mode_backward(
        lp,
        old,
        lr,
        cg,
        adv,
        w,
        ra,
        rb,
        clip_low,
        clip_high,
        dual,
        mp0,
        mp1,
        mp2,
        mp3,
        MODE,
        HAS_DUAL,
    )
    if HAS_REF:
        ref = tl.load(ref_ptr + base + offs, mask=m, other=0.0).to(acc)
        dkl = kl_coef * _kl_grad(lp - ref, kl_clamp, KL_EST, HAS_KL_CLAMP, KL_ST)
        g += scale * dkl
        gr = tl.where(m, -scale * dkl, 0.0)
        tl.store(g_ref_ptr + base + offs, gr.to(g_ref_ptr.dtype.element_ty), mask=inb)
    if HAS_ENT:
        ge = tl.where(m, -entropy_coef * scale + raw * 0.0, 0.0)
        tl.store(g_ent_ptr + base + offs, ge.to(g_ent_ptr.dtype.element_ty), mask=inb)
    g = tl.where(m, g, 0.0)
    tl.store(g_lp_ptr + base + offs, g.to(g_lp_ptr.dtype.element_ty), mask=inb)


def _flags(lp, adv, ref, ent, w, loss_mode, loss_params, lr_clamp, kl_estimator, kl_clamp):
    """The constexpr switches and the scalars of the loss mode (clip_low, clip_high, dual,
    mp0 ... mp3) of one call."""
    scalars, mode_flags = mode_scalars(loss_mode, loss_params)
    flags = dict(
        HAS_REF=ref is not None,
        HAS_ENT=ent is not None,
        HAS_W=w is not None,
        ADV_ROW=adv.dim() == 1,
        W_ROW=w is not None and w.dim() == 1,
        **mode_flags,
        HAS_LR_CLAMP=lr_clamp is not None,
        KL_EST=ESTIMATORS[kl_estimator.rstrip("+")],
        HAS_KL_CLAMP=kl_clamp is not None,
    )
    return flags, scalars


def _prep(lp, old, adv, mask, ref, ent, w):
    acc = acc_dtype(lp)
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731
    adv = adv.to(acc).contiguous()
    w = None if w is None else w.to(acc).contiguous()
    mask = bool_mask(mask).contiguous()
    return acc, c(lp), c(old), adv, mask, c(ref), c(ent), w


@triton_op("ppokernels::ppo_policy_loss_triton", mutates_args=())
def ppo_policy_loss_triton(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    loss_mode: str,
    loss_params: list[float],
    logratio_clamp: float | None,
    agg: str,
    num_tokens: float | None,
    num_seqs: float | None,
    kl_coef: float,
    kl_estimator: str,
    kl_clamp: float | None,
    entropy_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc, lp, old, adv, mask, ref, ent, w = _prep(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights
    )
    B, T = lp.shape
    part = torch.empty((B, K), dtype=acc, device=lp.device)
    rowv = torch.empty((B, 2), dtype=acc, device=lp.device)
    loss = torch.empty((), dtype=acc, device=lp.device)
    metrics = torch.empty((5,), dtype=acc, device=lp.device)
    row_stats = torch.empty((B, 4), dtype=acc, device=lp.device)
    flags, scalars = _flags(
        lp, adv, ref, ent, w, loss_mode, loss_params, logratio_clamp, kl_estimator, kl_clamp
    )
    if B > 0:
        launch(_ppo_policy_loss_row_kernel)[(B,)](
            lp,
            old,
            ref if ref is not None else lp,
            ent if ent is not None else lp,
            adv,
            w if w is not None else adv,
            mask,
            part,
            rowv,
            T,
            scalars["clip_low"],
            scalars["clip_high"],
            scalars["dual"],
            logratio_clamp or 0.0,
            kl_clamp or 0.0,
            *(scalars[k] for k in ("mp0", "mp1", "mp2", "mp3")),
            **flags,
            **ROW_CONFIG,
        )
    launch(_ppo_policy_loss_finalize_kernel)[(1,)](
        part,
        rowv,
        loss,
        metrics,
        row_stats,
        B,
        T,
        num_tokens or 0.0,
        num_seqs or 0.0,
        kl_coef,
        entropy_coef,
        AGG=AGG[agg],
        GEO=flags["MODE"] == MODES["geo_mean"],
        **FINALIZE_CONFIG,
    )
    return loss, metrics, row_stats


@triton_op("ppokernels::ppo_policy_loss_backward_triton", mutates_args=())
def ppo_policy_loss_backward_triton(
    grad: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    row_stats: torch.Tensor,
    loss_mode: str,
    loss_params: list[float],
    logratio_clamp: float | None,
    kl_coef: float,
    kl_estimator: str,
    kl_clamp: float | None,
    entropy_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc, lp, old, adv, mask, ref, ent, w = _prep(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights
    )
    B, T = lp.shape
    g_lp = torch.empty_like(lp)
    g_ref = torch.empty_like(ref) if ref is not None else lp.new_empty((0,))
    g_ent = torch.empty_like(ent) if ent is not None else lp.new_empty((0,))
    flags, scalars = _flags(
        lp, adv, ref, ent, w, loss_mode, loss_params, logratio_clamp, kl_estimator, kl_clamp
    )
    if B > 0 and T > 0:
        launch(_ppo_policy_loss_bwd_kernel)[(B, triton.cdiv(T, ROW_CONFIG["BLOCK"]))](
            grad.to(acc),
            lp,
            old,
            ref if ref is not None else lp,
            adv,
            w if w is not None else adv,
            mask,
            row_stats.to(acc).contiguous(),
            g_lp,
            g_ref if ref is not None else g_lp,
            g_ent if ent is not None else g_lp,
            T,
            scalars["clip_low"],
            scalars["clip_high"],
            scalars["dual"],
            logratio_clamp or 0.0,
            kl_coef,
            kl_clamp or 0.0,
            entropy_coef,
            *(scalars[k] for k in ("mp0", "mp1", "mp2", "mp3")),
            **flags,
            KL_ST=kl_estimator.endswith("+"),
            **ROW_CONFIG,
        )
    return g_lp, g_ref, g_ent


# ------------------------------------------------------------ ahead-of-time compile table
_ALL = dict(
    HAS_REF=True,
    HAS_ENT=True,
    HAS_W=True,
    ADV_ROW=False,
    W_ROW=False,
    HAS_DUAL=True,
    HAS_LR_CLAMP=True,
    KL_EST=2,
    HAS_KL_CLAMP=True,
    MODE=0,
)
_NONE = dict(
    HAS_REF=False,
    HAS_ENT=False,
    HAS_W=False,
    ADV_ROW=True,
    W_ROW=True,
    HAS_DUAL=False,
    HAS_LR_CLAMP=False,
    KL_EST=0,
    HAS_KL_CLAMP=False,
    MODE=0,
)
# every loss mode once, with every input (dual clip only where it applies)
_MODES = [dict(_ALL, MODE=i, HAS_DUAL=i in (0, 1)) for i in MODES.values()] + [_NONE]
_DATA = {
    "lp_ptr": "*T",
    "old_ptr": "*T",
    "ref_ptr": "*T",
    "adv_ptr": "*A",
    "w_ptr": "*A",
    "mask_ptr": "*i1",
}
_CLIP = {"T": "i64", "clip_low": "fp32", "clip_high": "fp32", "dual": "fp32", "lr_clamp": "fp32"}
_MP = {"mp0": "fp32", "mp1": "fp32", "mp2": "fp32", "mp3": "fp32"}
AOT = (
    aot_table(
        _ppo_policy_loss_row_kernel,
        {
            **_DATA,
            "ent_ptr": "*T",
            "part_ptr": "*A",
            "rowv_ptr": "*A",
            **_CLIP,
            "kl_clamp": "fp32",
            **_MP,
        },
        lambda dt: ROW_CONFIG,
        variants=_MODES,
    )
    + aot_table(
        _ppo_policy_loss_bwd_kernel,
        {
            "grad_ptr": "*A",
            **_DATA,
            "row_stats_ptr": "*A",
            "g_lp_ptr": "*T",
            "g_ref_ptr": "*T",
            "g_ent_ptr": "*T",
            **_CLIP,
            "kl_coef": "fp32",
            "kl_clamp": "fp32",
            "entropy_coef": "fp32",
            **_MP,
        },
        lambda dt: ROW_CONFIG,
        variants=[dict(v, KL_ST=v["MODE"] == 1) for v in _MODES],
    )
    # the finalize kernel sees only accumulator-dtype partials
    + aot_table(
        _ppo_policy_loss_finalize_kernel,
        {
            "part_ptr": "*A",
            "rowv_ptr": "*A",
            "loss_ptr": "*A",
            "metrics_ptr": "*A",
            "row_stats_ptr": "*A",
            "B": "i64",
            "T": "i64",
            "num_tokens": "fp32",
            "num_seqs": "fp32",
            "kl_coef": "fp32",
            "entropy_coef": "fp32",
        },
        lambda dt: FINALIZE_CONFIG,
        dtypes=("fp32", "fp64"),
        variants=[dict(AGG=a, GEO=False) for a in AGG.values()] + [dict(AGG=2, GEO=True)],
    )
)
