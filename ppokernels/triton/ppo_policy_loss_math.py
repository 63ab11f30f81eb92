"""Per-token math of the Triton kernels of ppo_policy_loss (as ppo_policy_loss.h and
ppo_policy_loss_modes.h); the aggregation is in ppokernels/triton/agg.py."""

from __future__ import annotations

import math

import triton
import triton.language as tl

from ppokernels.losses import LOSS_MODES
from ppokernels.triton._common import expm1
from ppokernels.triton.kl_penalty import _value as _kl_value

K = 8  # per-row partials: n, loss, kl, entropy, clipped, -logratio, dual, (pad)


@triton.jit
def _surrogate(ratio, adv, clip_low, clip_high, dual, HAS_DUAL: tl.constexpr):
    """Clipped surrogate of one token: (L, dL/dratio, clipped flag, dual-clip flag)."""
    neg = -adv
    l1 = neg * ratio
    l2 = neg * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = l2 > l1
    loss = tl.maximum(l1, l2)
    d = tl.where(clipped, 0.0, neg)
    if HAS_DUAL:
        l3 = neg * dual
        active = (adv < 0) & (loss > l3)
        loss = tl.where(active, l3, loss)
        d = tl.where(active, 0.0, d)
    else:
        active = clipped & (adv != adv)  # all false (adv is finite on valid tokens)
    return loss, d, clipped, active


@triton.jit
def _kl_grad(x, clamp, EST: tl.constexpr, HAS_CLAMP: tl.constexpr, ST: tl.constexpr):
    """d KL / d logprobs, as kl_penalty.h's kl_grad."""
    if ST:
        d = x
    else:
        if EST == 0:
            d = x * 0.0 + 1.0
        elif EST == 1:
            d = x
        elif EST == 2:
            d = -expm1(-x)
        else:
            d = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)
        if HAS_CLAMP:
            k = _kl_value(x, EST)
            d = tl.where((k < -clamp) | (k > clamp), 0.0, d)
    return d


# ------------------------------------------------------------------------- loss modes
# As ppo_policy_loss_modes.h: the MODE constexpr is the mode's index in LOSS_MODES; its math below.
MODES = {name: code for code, name in enumerate(LOSS_MODES)}
ROW_PASS = (1, 5, 9)  # modes with a first pass over the row: gspo, geo_mean, vespo
LOG_1E8 = tl.constexpr(-18.420680743952367)  # log(1e-8), TRL's VESPO clamp (a jit global)


def mode_scalars(loss_mode: str, loss_params) -> dict:
    """The op's (loss_mode, loss_params) as the kernels' scalars clip_low, clip_high, dual (0:
    none) and mp0 ... mp3, with the MODE and HAS_DUAL switches (ppo_loss_modes.h
    policy_mode_scalars, the same layout)."""
    if loss_mode not in MODES:
        raise ValueError(f"ppo_policy_loss: unknown loss_mode {loss_mode!r}")
    p = [float(x) for x in loss_params]
    out = dict(clip_low=0.0, clip_high=0.0, dual=0.0)
    mp = [0.0] * 4
    if loss_mode in ("vanilla", "gspo"):
        out.update(clip_low=p[0], clip_high=p[1], dual=0.0 if math.isinf(p[2]) else p[2])
        mp[0] = p[3] if loss_mode == "gspo" else 0.0
    elif loss_mode in ("geo_mean", "dppo_tv", "dppo_kl"):
        out.update(clip_low=p[0], clip_high=p[1])
        mp[0] = p[2] if loss_mode != "geo_mean" else 0.0
    else:  # sapo, cispo, gpg, dro, vespo: their parameters in order
        mp[: len(p)] = p
    out.update(mp0=mp[0], mp1=mp[1], mp2=mp[2], mp3=mp[3])
    return out, dict(MODE=MODES[loss_mode], HAS_DUAL=out["dual"] != 0.0)


@triton.jit
def _geo_logratio(lr, adv, clip_low, clip_high):
    """GMPO's sign-aware clipped log-ratio and its derivative (0 where clipped or A = 0)."""
    pos = adv > 0
    neg = adv < 0
    d = tl.where(
        pos,
        tl.where(lr > clip_high, 0.0, 1.0),
        tl.where(neg, tl.where(lr < -clip_low, 0.0, 1.0), 0.0),
    )
    v = tl.where(pos, tl.minimum(lr, clip_high), tl.where(neg, tl.maximum(lr, -clip_low), 0.0))
    return v, d


@triton.jit
def _dppo_valid(lp, old, adv, clip_low, clip_high, KL: tl.constexpr):
    """DPPO's trust-region flag (1.0 inside, 0.0 outside)."""
    p = tl.exp(lp)
    p_old = tl.exp(old)
    if KL:
        q = -expm1(lp)  # 1 - p without cancellation
        q_old = -expm1(old)
        bkl = p_old * (old - lp) + q_old * tl.log((q_old + 1e-8) / (q + 1e-8))
        ok = tl.where(adv > 0, (bkl <= clip_high) | (p <= p_old), (bkl <= clip_low) | (p >= p_old))
    else:
        ok = tl.where(adv > 0, p - p_old <= clip_high, p - p_old >= -clip_low)
    return tl.where(ok, 1.0, 0.0)


@triton.jit
def _vespo_phi(adv, log_w, mp0, mp1, mp2, mp3):
    nonneg = adv >= 0
    k = tl.where(nonneg, mp0, mp2)
    lam = tl.maximum(tl.where(nonneg, mp1, mp3), 1e-4)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi - phi) == 0, phi, 0.0)  # NaN and inf -> 0 (TRL's nan_to_num)


@triton.jit
def _row_terms(lr, adv, w, clip_low, clip_high, MODE: tl.constexpr, HAS_W: tl.constexpr):
    """Token terms (s0, s1, s2) of the first pass (ppo_loss_modes.h policy_row_terms)."""
    s1 = lr * 0.0
    s2 = lr * 0.0
    if MODE == 5:
        s0, _ = _geo_logratio(lr, adv, clip_low, clip_high)
        s1 = adv + s1
        if HAS_W:
            s2 = tl.log(w + 1e-10)
    else:
        s0 = lr
        if MODE == 9:
            if HAS_W:
                s1 = tl.minimum(tl.maximum(tl.log(w), LOG_1E8), 20.0)
    return s0, s1, s2


@triton.jit
def _mode_forward(
    lp,
    old,
    lr,
    adv,
    w,
    ra,
    clip_low,
    clip_high,
    dual,
    mp0,
    mp1,
    mp2,
    mp3,
    MODE: tl.constexpr,
    HAS_DUAL: tl.constexpr,
):
    """Token surrogate (0 for geo_mean) and the two metric flags (ppo_policy_loss.h)."""
    z = lr * 0.0
    c0 = z
    c1 = z
    r = tl.exp(lr)
    if MODE == 0:
        loss, _, fl0, fl1 = _surrogate(r, adv, clip_low, clip_high, dual, HAS_DUAL)
        loss = loss * w
        c0 = tl.where(fl0, 1.0, 0.0)
        c1 = tl.where(fl1, 1.0, 0.0)
    elif MODE == 1:
        rs = tl.exp(tl.minimum(ra + z, mp0))
        loss, _, fl0, fl1 = _surrogate(rs, adv, clip_low, clip_high, dual, HAS_DUAL)
        loss = loss * w
        c0 = tl.where(fl0, 1.0, 0.0)
        c1 = tl.where(fl1, 1.0, 0.0)
    elif MODE == 2:
        tau = tl.where(adv > 0, mp0, mp1)
        sig = 1.0 / (1.0 + tl.exp(-tau * (r - 1.0)))
        loss = -w * (sig * 4.0 / tau) * adv
    elif MODE == 3:
        c = tl.minimum(tl.maximum(r, mp0), mp1)
        c0 = tl.where(r != c, 1.0, 0.0)
        c1 = tl.where((r > mp1) & (adv > 0), 1.0, 0.0)
        loss = -w * c * adv * lp
    elif MODE == 4:
        loss = -w * adv * lp
    elif MODE == 5:
        out = (lr > clip_high) | (lr < -clip_low)
        c0 = tl.where(out & (adv > 0), 1.0, 0.0)
        c1 = tl.where(out & (adv < 0), 1.0, 0.0)
        loss = z
    elif MODE == 6 or MODE == 7:
        valid = _dppo_valid(lp, old, adv, clip_low, clip_high, MODE == 7)
        c0 = 1.0 - valid
        c1 = tl.where(r > mp0, valid, 0.0)
        loss = -w * adv * tl.minimum(r, mp0) * lp * valid
    elif MODE == 8:
        loss = -w * (lp * adv - 0.5 * mp0 * lr * lr)
    else:
        phi = _vespo_phi(adv, ra + z, mp0, mp1, mp2, mp3)
        c0 = phi
        loss = -phi * adv * lp
    return loss, c0, c1


@triton.jit
def _mode_backward(
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
    MODE: tl.constexpr,
    HAS_DUAL: tl.constexpr,
):
    """d(token surrogate) / d logprobs before the row weight (ppo_policy_loss.h
    policy_token_backward)."""
    z = lr * 0.0
    r = tl.exp(lr)
    if MODE == 0:
        _, d, _, _ = _surrogate(r, adv, clip_low, clip_high, dual, HAS_DUAL)
        g = w * d * r * cg
    elif MODE == 1:
        rs = tl.exp(tl.minimum(ra + z, mp0))
        _, d, _, _ = _surrogate(rs, adv, clip_low, clip_high, dual, HAS_DUAL)
        g = tl.where(ra + z > mp0, 0.0, w * d * rs)
    elif MODE == 2:
        tau = tl.where(adv > 0, mp0, mp1)
        sig = 1.0 / (1.0 + tl.exp(-tau * (r - 1.0)))
        g = -w * adv * 4.0 * sig * (1.0 - sig) * r * cg
    elif MODE == 3:
        g = -w * tl.minimum(tl.maximum(r, mp0), mp1) * adv
    elif MODE == 4:
        g = -w * adv
    elif MODE == 5:
        _, d = _geo_logratio(lr, adv, clip_low, clip_high)
        g = rb * d * cg
    elif MODE == 6 or MODE == 7:
        valid = _dppo_valid(lp, old, adv, clip_low, clip_high, MODE == 7)
        g = -w * adv * tl.minimum(r, mp0) * valid
    elif MODE == 8:
        g = -w * (adv - mp0 * lr * cg)
    else:
        g = -_vespo_phi(adv, ra + z, mp0, mp1, mp2, mp3) * adv
    return g
