"""Plain-PyTorch definitions of every ppokernels op: the specification the kernels are tested
against, readable first. Each function computes in float32, or float64 for float64 inputs, and is
differentiable by autograd. Names follow the RL literature (cleanrl, the PPO-RLHF papers).
"""

from __future__ import annotations

import torch


def _acc(*xs: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------------------- kl
def kl_penalty(logprobs, ref_logprobs, *, estimator="k3", clamp=None):
    """Per-token KL estimate from x = logprobs - ref_logprobs (Schulman 2020).

    k1 = x, k2 = x^2 / 2, k3 = exp(-x) - 1 + x, abs = |x|; ``clamp`` clamps the value to
    [-clamp, clamp]. A "+" suffix keeps the value and takes k2's gradient (straight-through).
    """
    dtype = _acc(logprobs, ref_logprobs)
    logratio = logprobs.to(dtype) - ref_logprobs.to(dtype)
    straight_through = estimator.endswith("+")
    name = estimator.rstrip("+")
    if name == "k1":
        kl = logratio
    elif name == "k2":
        kl = 0.5 * logratio.square()
    elif name == "k3":
        kl = torch.expm1(-logratio) + logratio
    elif name == "abs":
        kl = logratio.abs()
    else:
        raise ValueError(f"kl_penalty: unknown estimator {estimator!r}")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    if straight_through:
        k2 = 0.5 * logratio.square()
        kl = k2 - k2.detach() + kl.detach()
    return kl


# -------------------------------------------------------------------------------------- gae
def gae(rewards, values, mask, *, gamma=1.0, lam=1.0, mode="skip"):
    """Generalised advantage estimation (Schulman et al. 2016), a reverse loop over time.

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``.
    mode "skip" (veRL): masked tokens are skipped; V_next is the value of the next *valid* token,
    A passes through them unchanged (so they hold the next valid token's advantage) and
    ``returns = advantages + values`` (all values, as veRL). mode "zero" (OpenRLHF, TRL): rewards
    and values are zeroed at masked positions and the recursion runs through them;
    ``returns = advantages + m * values``. Rewards at masked positions are never used, nor values
    except in the "skip" returns (NaN padding is harmless to the advantages).
    """
    dtype = _acc(rewards, values)
    valid = mask != 0
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    raw_values = values.to(dtype)
    rewards = torch.where(valid, rewards.to(dtype), zero)
    values = torch.where(valid, raw_values, zero)
    nextvalues = rewards.new_zeros(rewards.shape[:-1])
    lastgaelam = rewards.new_zeros(rewards.shape[:-1])
    advantages = [None] * rewards.shape[-1]
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[..., t] + gamma * nextvalues - values[..., t]
        gaelam = delta + gamma * lam * lastgaelam
        if mode == "skip":
            lastgaelam = torch.where(valid[..., t], gaelam, lastgaelam)
            nextvalues = torch.where(valid[..., t], values[..., t], nextvalues)
        else:
            lastgaelam = gaelam
            nextvalues = values[..., t]
        advantages[t] = lastgaelam
    advantages = torch.stack(advantages, -1) if advantages else rewards.clone()
    return advantages, advantages + (raw_values if mode == "skip" else values)


def discounted_returns(rewards, mask, *, gamma=1.0, mode="skip"):
    """Discounted return-to-go ``G_t = r_t + gamma * G_{t+1}``.

    mode "skip": masked tokens are skipped, carrying G unchanged (their output is the carried G);
    mode "zero" (OpenRLHF ``get_cumulative_returns``): ``G_t = m_t r_t + gamma * G_{t+1}``.
    Equal to ``gae(rewards, 0, mask, gamma=gamma, lam=1, mode=mode)[0]``.
    """
    return gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, mode=mode)[0]


# ------------------------------------------------------------------------------- advantages
def _valid(x, mask):
    """(x in the accumulation dtype with masked entries set to 0, mask as bool)."""
    m = mask != 0
    xa = x.to(_acc(x))
    return torch.where(m, xa, torch.zeros_like(xa)), m


def masked_mean(x, mask):
    """sum(x * m) / sum(m) over all entries (NaN when no entry is valid, as torch.mean).

    Masked entries are selected away, so inf/NaN padding does not leak into the result.
    """
    xv, m = _valid(x, mask)
    return xv.sum() / m.sum()


def masked_var(x, mask, *, unbiased=True):
    """sum(m (x - mean)^2) / (n - 1 if unbiased else n), n = sum(m); NaN without enough entries."""
    xv, m = _valid(x, mask)
    n = m.sum()
    mean = xv.sum() / n
    d = n - 1 if unbiased else n
    sq = torch.where(m, (xv - mean).square(), torch.zeros_like(xv)).sum()
    return torch.where(d > 0, sq / d.clamp(min=1), torch.full_like(sq, float("nan")))


def masked_whiten(x, mask, *, shift_mean=True, unbiased=True, eps=1e-8):
    """(x - mean) * rsqrt(var + eps) (+ mean if not shift_mean), statistics over the valid
    entries, every entry transformed (veRL's / TRL's masked_whiten)."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    y = (x.to(_acc(x)) - mean) * torch.rsqrt(var + eps)
    return y if shift_mean else y + mean


def group_advantages(scores, group_index, *, estimator="grpo", eps=1e-6, norm_by_std=True):
    """Per-sequence advantages with a group baseline; groups of one member as veRL's loops.

    grpo: (s - mean_g) / (std_g + eps) with the unbiased std, or s - mean_g without std
    normalisation (Dr.GRPO); a singleton has mean 0 and std 1. rloo: s - mean of the other
    members = n / (n - 1) (s - mean_g); a singleton keeps its score.
    """
    s = scores.to(_acc(scores))
    _, inv = torch.unique(group_index, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0
    one = torch.ones_like(s)
    n = torch.zeros(g, dtype=s.dtype, device=s.device).index_add(0, inv, one)[inv]
    mean = torch.zeros(g, dtype=s.dtype, device=s.device).index_add(0, inv, s)[inv] / n
    sq = torch.zeros(g, dtype=s.dtype, device=s.device).index_add(0, inv, (s - mean).square())
    single = n == 1
    # singletons: std 1 (selected before the sqrt, whose gradient at 0 is infinite)
    std = torch.sqrt(torch.where(single, one, sq[inv] / torch.where(single, one, n - 1)))
    mean = torch.where(single, torch.zeros_like(s), mean)
    if estimator == "grpo":
        return (s - mean) / (std + eps) if norm_by_std else s - mean
    if estimator == "rloo":
        return torch.where(single, s, (s - mean) * n / (n - 1).clamp(min=1))
    raise ValueError(f"group_advantages: unknown estimator {estimator!r}")



# --------------------------------------------------------------------------------- logprobs
def token_logprobs(logits, labels, *, temperature=1.0, with_entropy=False, ignore_index=-100):
    """Log-prob of each label and (optionally) the entropy of each row's softmax.

    With z = logits / temperature (the temperature applies to log-probs and entropy alike):
    ``logprobs = log_softmax(z)[label]``, ``entropy = -sum_j p_j log p_j``, p = softmax(z).
    Tokens whose label is ``ignore_index`` give 0 for both and get no gradient.

    Args:
        logits: (..., V) float logits. labels: (...) integer token ids.

    Returns:
        ``(logprobs, entropy or None)``, each (...) float32 (float64 for float64 logits).
    """
    z = logits.to(_acc(logits)) / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    index = torch.where(valid, labels, 0).long().unsqueeze(-1)
    logprobs = torch.where(valid, logp.gather(-1, index).squeeze(-1), 0.0)
    entropy = None
    if with_entropy:
        p = logp.exp()
        # p log p = 0 where p = 0 (e.g. -inf logits), instead of 0 * -inf = NaN
        entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
        entropy = torch.where(valid, entropy, 0.0)
    return logprobs, entropy



# -------------------------------------------------------------------------- linear_logprobs
def linear_logprobs_stats(
    hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, vocab_start=0
):
    """Per-row ``(label_logit, lse, entropy)`` of ``z = (hidden @ weight.T + bias) / temperature``
    over the vocabulary shard ``[vocab_start, vocab_start + V)`` held by ``weight [V, H]``.

    ``label_logit`` is 0 where the label lies outside the shard; rows labelled ``ignore_index``
    give zeros. Materialises the ``[N, V]`` logits (this is the specification, not a kernel).
    """
    dtype = _acc(hidden, weight)
    z = hidden.reshape(-1, hidden.shape[-1]).to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z / temperature
    y = labels.reshape(-1).long()
    valid = y != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    entropy = lse - (p * z).sum(-1)
    local = y - vocab_start
    owned = valid & (local >= 0) & (local < weight.shape[0])
    label_logit = z.gather(1, torch.where(owned, local, 0)[:, None]).squeeze(1)
    zero = torch.zeros_like(lse)
    return (
        torch.where(owned, label_logit, zero),
        torch.where(valid, lse, zero),
        torch.where(valid, entropy, zero),
    )


def linear_logprobs(
    hidden, weight, labels, *, bias=None, temperature=1.0, with_entropy=False, ignore_index=-100
):
    """``(logprobs, entropy or None)`` of ``labels`` under ``softmax((hidden @ weight.T + bias) /
    temperature)``, shape of ``labels``; 0 where ``labels == ignore_index``."""
    label_logit, lse, entropy = linear_logprobs_stats(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index
    )
    logprobs = (label_logit - lse).view(labels.shape)
    return logprobs, entropy.view(labels.shape) if with_entropy else None



# --------------------------------------------------------------------------------- ppo_loss
from typing import NamedTuple  # noqa: E402  (kept in this section: one marker per stem)


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
