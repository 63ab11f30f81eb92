"""Reference ppo_policy_loss and value_loss: clipped policy and value losses, aggregations."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppokernels._dtypes import acc_dtype as _acc
from ppokernels.reference.kl import kl_penalty


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


class ValueLossOutput(NamedTuple):
    """Result of ``value_loss``: the loss (0-d, differentiable) and the detached clip fraction."""

    loss: torch.Tensor
    clipfrac: torch.Tensor


AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def agg_loss(values, mask, agg="token-mean", *, num_tokens=None, num_seqs=None):
    """Aggregates a [B, T] per-token loss over the valid tokens (veRL's agg_loss).

    token-mean: sum / (num_tokens or number of valid tokens); token-sum: sum;
    seq-mean-token-mean: sum over rows with a valid token of the row's masked mean / (num_seqs or
    B); seq-mean-token-sum: sum of row sums / (num_seqs or B); seq-mean-token-sum-norm: that / T.
    No valid token gives 0.
    """
    m = mask.bool()
    x = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    rows, width = x.shape
    seqs = num_seqs if num_seqs is not None else max(rows, 1)
    if agg == "token-mean":
        d = m.sum().to(x.dtype) if num_tokens is None else num_tokens
        return x.sum() / (d.clamp(min=1) if num_tokens is None else d)
    if agg == "token-sum":
        return x.sum()
    row_sum = x.sum(-1)
    if agg == "seq-mean-token-mean":
        return (row_sum / m.sum(-1).clamp(min=1).to(x.dtype)).sum() / seqs
    if agg == "seq-mean-token-sum":
        return row_sum.sum() / seqs
    if agg == "seq-mean-token-sum-norm":
        return row_sum.sum() / (seqs * max(width, 1))
    raise ValueError(f"agg_loss: unknown agg {agg!r}")


def _masked_mean(x, m):
    """Mean of x over the valid tokens (0 when there is none)."""
    return torch.where(m, x, 0).sum() / m.sum().clamp(min=1)


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    logratio_clamp=20.0,
    ratio_level="token",
    agg="token-mean",
    num_tokens=None,
    num_seqs=None,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    kl_clamp=None,
    entropy=None,
    entropy_coef=0.0,
    is_weights=None,
):
    """PPO's clipped surrogate with clip-higher, dual clip, GSPO ratio, KL and entropy terms.

    Per token (veRL compute_policy_loss_vanilla): logratio = clamp(lp - old, +-logratio_clamp),
    r = exp(logratio), L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); dual clip c:
    L = min(L, -A c) where A < 0; L *= is_weights; plus kl_coef * kl_penalty(lp, ref) minus
    entropy_coef * entropy; aggregated by :func:`agg_loss`. ratio_level="sequence" (GSPO): r has
    the value exp(masked mean over t of logratio) and the gradient of exp(lp - sg(lp) + sg(.)).
    """
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
        logratio = logratio.clamp(-logratio_clamp, logratio_clamp)
    if ratio_level == "sequence":
        seq = torch.where(m, logratio, zero).sum(-1) / m.sum(-1).clamp(min=1).to(dtype)
        ratio = torch.exp(lp - lp.detach() + seq.detach()[:, None])
    else:
        ratio = torch.exp(logratio)
    high = clip_low if clip_high is None else clip_high
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1 - clip_low, 1 + high)
    loss = torch.maximum(l1, l2)
    dual = torch.zeros_like(m)
    if dual_clip is not None:
        l3 = -adv * dual_clip
        dual = (loss > l3) & (adv < 0)
        loss = torch.where(adv < 0, torch.minimum(loss, l3), loss)
    if is_weights is not None:
        loss = loss * clean(is_weights)
    kl = None
    agg_kw = dict(num_tokens=num_tokens, num_seqs=num_seqs)
    if ref_logprobs is not None:
        kl = kl_penalty(lp, clean(ref_logprobs), estimator=kl_estimator, clamp=kl_clamp)
        loss = loss + kl_coef * kl
        kl = agg_loss(kl, m, agg, **agg_kw).detach()
    ent = None
    if entropy is not None:
        ent = clean(entropy)
        loss = loss - entropy_coef * ent
        ent = agg_loss(ent, m, agg, **agg_kw).detach()
    return PolicyLossOutput(
        loss=agg_loss(loss, m, agg, **agg_kw),
        clipfrac=_masked_mean((l2 > l1).to(dtype), m).detach(),
        approx_kl=_masked_mean(-logratio, m).detach(),
        dual_clipfrac=_masked_mean(dual.to(dtype), m).detach(),
        kl=kl,
        entropy=ent,
    )


def value_loss(
    values,
    old_values,
    returns,
    mask,
    *,
    clip=None,
    agg="token-mean",
    num_tokens=None,
    num_seqs=None,
):
    """Clipped value loss (veRL compute_value_loss, OpenRLHF ValueLoss).

    vc = clip(v, v_old - clip, v_old + clip); per token 0.5 max((v - R)^2, (vc - R)^2) (plain
    0.5 (v - R)^2 without clip), aggregated by :func:`agg_loss`; clipfrac = masked mean of
    ((vc - R)^2 > (v - R)^2).
    """
    dtype = _acc(values, old_values)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v, vo, ret = (torch.where(m, x.to(dtype), zero) for x in (values, old_values, returns))
    err = (v - ret).square()
    clipped = torch.zeros_like(m)
    loss = err
    if clip is not None:
        vc = torch.clamp(v, vo - clip, vo + clip)
        errc = (vc - ret).square()
        clipped = errc > err
        loss = torch.maximum(err, errc)
    return ValueLossOutput(
        loss=0.5 * agg_loss(loss, m, agg, num_tokens=num_tokens, num_seqs=num_seqs),
        clipfrac=_masked_mean(clipped.to(dtype), m).detach(),
    )
