"""Reference ppo_policy_loss: every loss spec of ppokernels.losses, the KL and entropy terms
and the metrics."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ppokernels._dtypes import acc_dtype as _acc
from ppokernels.losses import (
    CISPO,
    DPPOKL,
    DPPOTV,
    DRO,
    GPG,
    GSPO,
    SAPO,
    Clip,
    GeoMean,
    LossSpec,
    Vespo,
    loss_spec,
)
from ppokernels.reference._clamp import clamp
from ppokernels.reference.agg import agg_loss, metric_mean
from ppokernels.reference.kl_penalty import kl_penalty


class PolicyLossOutput(NamedTuple):
    """Result of ``ppo_policy_loss``: the loss (0-d, differentiable) and detached 0-d metrics.

    ``kl`` / ``entropy`` are the aggregated KL term / entropy (same aggregation as the loss), None
    when ``ref_logprobs`` / ``entropy`` were not given.
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    dual_clipfrac: torch.Tensor
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


_LOG_1E8 = math.log(1e-8)


def _where(cond, a, b, like):
    """torch.where of two Python numbers in like's dtype (not the default float32)."""
    return torch.where(cond, torch.full_like(like, a), torch.full_like(like, b))


def _surrogate(spec: LossSpec, lp, old, adv, w, has_w, m, lr):
    """Per-token surrogate [B, T] (or per-row [B] for GeoMean) and the two metric flags."""
    zero = torch.zeros_like(lp)
    flag0, flag1 = zero.bool(), zero.bool()
    ratio = torch.exp(lr)
    match spec:
        case Clip() | GSPO():
            if isinstance(spec, GSPO):
                seq = torch.where(m, lr, 0).sum(-1) / m.sum(-1).clamp(min=1).to(lp.dtype)
                ratio = torch.exp(clamp(lp - lp.detach() + seq.detach()[:, None], hi=spec.seq_max))
            l1 = -adv * ratio
            l2 = -adv * clamp(ratio, 1 - spec.clip_low, 1 + spec.clip_high)
            loss, flag0 = torch.maximum(l1, l2), l2 > l1
            if spec.dual_clip is not None:
                l3 = -adv * spec.dual_clip
                flag1 = (loss > l3) & (adv < 0)
                loss = torch.where(adv < 0, torch.minimum(loss, l3), loss)
            return loss * w, flag0, flag1
        case SAPO():
            tau = _where(adv > 0, spec.tau_pos, spec.tau_neg, lp)
            return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv * w, flag0, flag1
        case CISPO():
            c = clamp(ratio, spec.lower, spec.upper)
            flag0, flag1 = ratio != c, (ratio > spec.upper) & (adv > 0)
            return -c.detach() * adv * lp * w, flag0, flag1
        case GPG():
            return -lp * adv * w, flag0, flag1
        case DRO():
            return -(lp * adv - 0.5 * spec.beta * lr.square()) * w, flag0, flag1
        case DPPOTV() | DPPOKL():
            p, p_old = lp.detach().exp(), old.exp()
            if isinstance(spec, DPPOTV):
                pos, neg = p - p_old <= spec.clip_high, p - p_old >= -spec.clip_low
            else:
                bkl = p_old * (old - lp.detach()) + (1 - p_old) * torch.log(
                    (1 - p_old + 1e-8) / (1 - p + 1e-8)
                )
                pos = (bkl <= spec.clip_high) | (p <= p_old)
                neg = (bkl <= spec.clip_low) | (p >= p_old)
            valid = torch.where(adv > 0, pos, neg)
            cap = spec.ratio_cap
            flag0, flag1 = ~valid, (ratio > cap) & valid
            return -adv * ratio.clamp(max=cap).detach() * lp * valid * w, flag0, flag1
        case Vespo():
            s = torch.where(m, lr, 0).sum(-1) + torch.where(
                m, torch.log(w).clamp(_LOG_1E8, 20.0), 0
            ).sum(-1)
            log_w = s.clamp(_LOG_1E8, 20.0).detach()[:, None]
            nonneg = adv >= 0
            k = _where(nonneg, spec.k_pos, spec.k_neg, lp)
            lam = clamp(_where(nonneg, spec.lambda_pos, spec.lambda_neg, lp), lo=1e-4)
            phi = torch.exp(lam + k * log_w - lam * log_w.exp())
            phi = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            return -phi * adv * lp, phi, flag1
        case GeoMean():  # GMPO: a per-row loss from the sign-aware clipped log-ratio
            n = m.sum(-1).to(lp.dtype)
            sgn = torch.sign(adv)
            clamped = clamp(lr, -spec.clip_low, spec.clip_high)
            lr_min = sgn * torch.minimum(sgn * lr, sgn * clamped)
            d = n + 1e-8
            ratio = torch.exp(torch.where(m, lr_min, 0).sum(-1) / d)
            abar = torch.where(m, adv, 0).sum(-1) / d
            loss = -abar * ratio
            if has_w:  # the row's geometric-mean weight (veRL adds 1e-10 inside the log)
                loss = loss * torch.exp(torch.where(m, torch.log(w + 1e-10), 0).sum(-1) / d)
            out = lr != clamped
            return loss, out & (adv > 0), out & (adv < 0)
    raise TypeError(f"ppo_policy_loss: loss must be a loss spec, got {spec!r}")


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    loss=Clip(),
    agg="token-mean",
    num_tokens=None,
    num_seqs=None,
    logratio_clamp=20.0,
    is_weights=None,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    kl_clamp=None,
    entropy=None,
    entropy_coef=0.0,
):
    """The policy loss of every loss spec, with KL and entropy terms (the specification).

    lr = clamp(lp - old, +-logratio_clamp), r = exp(lr); per token the surrogate of ``loss``
    (each spec's formula: :mod:`ppokernels.losses`), times is_weights w where the spec says so,
    plus kl_coef * kl_penalty(lp, ref) minus entropy_coef * entropy, aggregated by
    :func:`agg_loss`. GeoMean's loss is per row, averaged over num_seqs or B rows whatever agg.
    """
    spec = loss_spec(loss)
    dtype = _acc(logprobs, old_logprobs)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    def clean(x):  # masked entries may hold anything (padding); they must not reach a NaN
        x = x.to(dtype)
        if x.dim() == 1:
            x = x[:, None].expand(m.shape)
        return torch.where(m, x, zero)

    lp, old, adv = clean(logprobs), clean(old_logprobs), clean(advantages)
    logratio = lp - old
    if logratio_clamp is not None:
        logratio = clamp(logratio, -logratio_clamp, logratio_clamp)
    w = torch.ones_like(lp)
    if is_weights is not None:  # 1 at padding: log(w) of a masked entry never reaches a NaN
        w = torch.where(m, clean(is_weights), 1.0)
    surr, flag0, flag1 = _surrogate(spec, lp, old, adv, w, is_weights is not None, m, logratio)
    agg_kw = dict(num_tokens=num_tokens, num_seqs=num_seqs)
    if isinstance(spec, GeoMean):
        seqs = num_seqs if num_seqs is not None else m.shape[0]
        loss = surr.sum() / seqs if m.shape[0] > 0 else surr.sum()
        extra = torch.zeros_like(lp)
    else:
        loss, extra = 0.0, surr
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(lp, clean(ref_logprobs), estimator=kl_estimator, clamp=kl_clamp)
        extra = extra + kl_coef * kl
        kl = agg_loss(kl, m, agg, **agg_kw).detach()
    ent = None
    if entropy is not None:
        ent = clean(entropy)
        extra = extra - entropy_coef * ent
        ent = agg_loss(ent, m, agg, **agg_kw).detach()
    return PolicyLossOutput(
        loss=loss + agg_loss(extra, m, agg, **agg_kw),
        clipfrac=metric_mean(flag0.to(dtype), m).detach(),
        approx_kl=metric_mean(-logratio, m).detach(),
        dual_clipfrac=metric_mean(flag1.to(dtype), m).detach(),
        kl=kl,
        entropy=ent,
    )
