"""ppo_policy_loss and value_loss: PPO's clipped policy and value losses, fused."""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels.ops import _checks
from ppokernels.ops import ppo_loss_register as _reg
from ppokernels.reference import PolicyLossOutput, ValueLossOutput

__all__ = ["PolicyLossOutput", "ValueLossOutput", "ppo_policy_loss", "value_loss"]


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    logratio_clamp: float | None = 20.0,
    ratio_level: str = "token",
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> PolicyLossOutput:
    """PPO clipped surrogate loss with its metrics, in one fused forward and one fused backward.

    Per valid token (veRL ``compute_policy_loss_vanilla``, OpenRLHF ``PolicyLoss``):
    ``logratio = clamp(lp - old, +-logratio_clamp)``, ``r = exp(logratio)``,
    ``L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; with ``dual_clip = c > 1``
    tokens with ``A < 0`` take ``min(L, -A c)``; ``L *= is_weights``; then
    ``+ kl_coef * kl_penalty(lp, ref_logprobs, kl_estimator, kl_clamp) - entropy_coef * entropy``,
    all aggregated with ``agg``:

    - "token-mean": sum / (num_tokens or number of valid tokens); "token-sum": sum;
    - "seq-mean-token-mean": sum over rows of the row's masked mean / (num_seqs or B);
    - "seq-mean-token-sum": sum of row sums / (num_seqs or B); "seq-mean-token-sum-norm": / T too.

    Global ``num_tokens`` / ``num_seqs`` make the sum of per-rank losses the global-batch loss.
    ``ratio_level="sequence"`` is GSPO: r has the value exp(masked mean over t of logratio) and
    the per-token gradient of ``exp(lp - sg(lp) + sg(seq_logratio))`` (veRL's gspo).

    Args:
        logprobs: [B, T] log-probs under the current policy (float dtype; differentiable).
        old_logprobs: [B, T] behaviour log-probs (a constant). Mixed float dtypes among
            logprobs, old_logprobs, ref_logprobs and entropy run in their promoted dtype.
        advantages: [B, T] per token or [B] per sequence, any float dtype (a constant).
        mask: [B, T] bool/int/float; 0 marks padding (no work, zero gradient, NaN-safe).
        clip_low, clip_high: clip range [1 - clip_low, 1 + clip_high]; clip_high None = clip_low.
        dual_clip: c > 1 (Ye et al. 2019), or None.
        logratio_clamp: clamp of lp - old before exp (veRL/OpenRLHF: 20), None for none.
        ref_logprobs, kl_coef, kl_estimator, kl_clamp: KL-in-loss term (GRPO), see kl_penalty.
        entropy, entropy_coef: [B, T] entropy of the policy and the bonus coefficient.
        is_weights: [B, T] or [B] importance weights (e.g. truncated IS), a constant.

    Returns:
        PolicyLossOutput: ``loss`` (0-d float32, float64 for float64 inputs); detached 0-d
        ``clipfrac`` (masked mean of clipped > unclipped), ``approx_kl`` (masked mean of
        -logratio), ``dual_clipfrac`` (masked mean of dual clip active and A < 0), and ``kl`` /
        ``entropy`` (aggregated like the loss) when their inputs are given. No valid token: all 0.
    """
    name = "ppo_policy_loss"
    _reg.check_data(name, logprobs, arg="logprobs")
    _reg.check_data(name, old_logprobs, like=logprobs, arg="old_logprobs")
    _reg.check_row_or_token(name, "advantages", advantages, logprobs)
    mask = _reg.check_mask(name, mask, logprobs)
    if ref_logprobs is not None:
        _reg.check_data(name, ref_logprobs, like=logprobs, arg="ref_logprobs")
    if entropy is not None:
        _reg.check_data(name, entropy, like=logprobs, arg="entropy")
    if is_weights is not None:
        _reg.check_row_or_token(name, "is_weights", is_weights, logprobs)
    scalars = _reg.check_policy_scalars(
        name, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        logratio_clamp=logratio_clamp, ratio_level=ratio_level, agg=agg, num_tokens=num_tokens,
        num_seqs=num_seqs, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
        entropy_coef=entropy_coef, has_ref=ref_logprobs is not None, has_ent=entropy is not None,
    )  # fmt: skip
    b = _backend.choose(name, logprobs.device, backend)
    opt = dict(ref_logprobs=ref_logprobs, entropy=entropy, is_weights=is_weights)
    if b == "reference":
        return reference.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, **opt, **scalars)
    for arg, x in (("old_logprobs", old_logprobs), ("advantages", advantages)):
        _reg.check_constant(name, arg, x)
    _reg.check_constant(name, "is_weights", is_weights)
    logprobs, old_logprobs, opt["ref_logprobs"], opt["entropy"] = _reg.promote(
        logprobs, old_logprobs, ref_logprobs, entropy
    )
    fn = torch.ops.ppokernels.ppo_policy_loss
    fn = fn if b == "cpp" else torch.ops.ppokernels.ppo_policy_loss_triton
    loss, metrics, _ = fn(
        logprobs, old_logprobs, advantages, mask, *opt.values(), *scalars.values()
    )
    metrics = metrics.detach()
    return PolicyLossOutput(
        loss,
        metrics[0],
        metrics[1],
        metrics[2],
        metrics[3] if ref_logprobs is not None else None,
        metrics[4] if entropy is not None else None,
    )


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    backend: str = "auto",
) -> ValueLossOutput:
    """Clipped value loss (veRL ``compute_value_loss``, OpenRLHF ``ValueLoss``), fused.

    Per valid token ``vc = clip(v, v_old - clip, v_old + clip)``,
    ``L = 0.5 max((v - R)^2, (vc - R)^2)`` (``0.5 (v - R)^2`` when clip is None), aggregated
    with ``agg`` as in :func:`ppo_policy_loss`.

    Args:
        values: [B, T] value predictions (float dtype; differentiable).
        old_values: [B, T] rollout values (a constant; mixed dtypes run in the promoted one).
        returns: [B, T] returns, any float dtype (a constant).
        mask: [B, T] bool/int/float; 0 marks padding.

    Returns:
        ValueLossOutput: ``loss`` (0-d float32, float64 for float64 inputs) and detached
        ``clipfrac`` (masked mean of clipped > unclipped squared error).
    """
    name = "value_loss"
    _reg.check_data(name, values, arg="values")
    _reg.check_data(name, old_values, like=values, arg="old_values")
    _checks.tensor(name, "returns", returns, ndim=2)
    _checks.same_shape(name, "returns", returns, "values", values)
    _checks.same_device(name, "returns", returns, values)
    mask = _reg.check_mask(name, mask, values)
    clip = _checks.positive(name, "clip", clip, allow_none=True)
    num_tokens, num_seqs = _reg.check_agg(name, agg, num_tokens, num_seqs)
    b = _backend.choose(name, values.device, backend)
    kw = dict(clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    if b == "reference":
        return reference.value_loss(values, old_values, returns, mask, **kw)
    _reg.check_constant(name, "old_values", old_values)
    _reg.check_constant(name, "returns", returns)
    values, old_values = _reg.promote(values, old_values)
    fn = torch.ops.ppokernels.value_loss if b == "cpp" else torch.ops.ppokernels.value_loss_triton
    loss, clipfrac, _ = fn(values, old_values, returns, mask, clip, agg, num_tokens, num_seqs)
    return ValueLossOutput(loss, clipfrac.detach())
