"""veRL 0.9.1 ``verl.trainer.ppo.core_algos``: advantage estimators, KL, policy / value / entropy
losses and their aggregation, on ppokernels ops (see the package doc)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import ppokernels as ppk
from ppokernels.compat import float_dtype
from ppokernels.compat.verl.torch_functional import entropy_from_logits, masked_whiten
from ppokernels.losses import Clip

# ---------------------------------------------------------------------- advantage estimators


def _group_ids(index, device):
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """GAE skipping masked tokens (multi-turn observations): ``(whitened adv, adv + values)``."""
    with torch.no_grad():
        adv, returns = ppk.gae(
            token_level_rewards,
            values,
            response_mask,
            gamma=float(gamma),
            lam=float(lam),
            mode="skip",
        )
        dtype = float_dtype(token_level_rewards, values)
        advantages = masked_whiten(adv.to(dtype), response_mask)
    return advantages, returns.to(dtype)


def _outcome(token_level_rewards, response_mask, index, **kw):
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        adv = ppk.group_advantages(scores, _group_ids(index, scores.device), **kw)
        adv = adv.to(scores.dtype).unsqueeze(-1) * response_mask
    return adv, adv


def compute_grpo_outcome_advantage(
    token_level_rewards,
    response_mask,
    index,
    epsilon=1e-6,
    norm_adv_by_std_in_grpo=True,
    config=None,
):
    """GRPO: ``(s - mean_g) / (std_g + eps)`` (unbiased std; singleton groups: mean 0, std 1),
    or ``s - mean_g`` without std normalisation, broadcast over the response mask."""
    return _outcome(
        token_level_rewards,
        response_mask,
        index,
        estimator="grpo",
        eps=epsilon,
        norm_by_std=norm_adv_by_std_in_grpo,
    )


def compute_rloo_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs
):
    """RLOO: ``n / (n - 1) (s - mean_g)``; a singleton group keeps its raw score."""
    return _outcome(token_level_rewards, response_mask, index, estimator="rloo")


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards, response_mask, config=None, **kwargs
):
    """REINFORCE++: return-to-go with ``config.gamma`` carried over masked tokens (0 there),
    advantages = whitened returns times the mask."""
    assert config is not None
    with torch.no_grad():
        returns = ppk.discounted_returns(
            token_level_rewards, response_mask, gamma=float(config.gamma), mode="skip"
        )
        returns = returns.to(token_level_rewards.dtype) * response_mask
        advantages = masked_whiten(returns, response_mask) * response_mask
    return advantages, returns


# ----------------------------------------------------------------------- losses and KL

_KL = {
    "kl": "k1",
    "k1": "k1",
    "abs": "abs",
    "mse": "k2",
    "k2": "k2",
    "low_var_kl": "k3",
    "k3": "k3",
}


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """veRL's KL estimators: kl/k1, abs, mse/k2, low_var_kl/k3 (value clamped to [-10, 10]);
    a "+" suffix keeps the value and takes k2's gradient (straight-through)."""
    plus = kl_penalty.endswith("+")
    name = _KL.get(kl_penalty[:-1] if plus else kl_penalty)
    if name is None:  # "full" and unknown names, as veRL
        raise NotImplementedError
    est = name + ("+" if plus and name != "k2" else "")
    kl = ppk.kl_penalty(logprob, ref_logprob, estimator=est, clamp=10.0 if name == "k3" else None)
    return kl.to(float_dtype(logprob, ref_logprob))


def _agg_args(
    mode, mask, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
):
    """(ppokernels agg, num_tokens, num_seqs, scale): veRL's agg_loss = ppokernels agg * scale."""
    scale: Any = float(dp_size)
    if mode == "token-sum":  # veRL: masked_sum * dp_size, whatever batch_num_tokens says
        return mode, None, None, scale
    if mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        if isinstance(batch_num_tokens, torch.Tensor):  # keep it on device: fold into scale
            scale = scale * mask.sum() / batch_num_tokens
            batch_num_tokens = None
        return mode, batch_num_tokens, None, scale
    if mode not in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        raise ValueError(f"Invalid loss_agg_mode: {mode}")
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        # veRL divides by the number of rows with a valid token; ppokernels by B
        rows = (mask.sum(-1) > 0).sum()
        scale = scale * mask.shape[0] / rows
    elif isinstance(global_batch_size, torch.Tensor):
        scale = scale * mask.shape[0] / global_batch_size
        global_batch_size = None
    if mode == "seq-mean-token-sum-norm":
        scale = scale / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        mode = "seq-mean-token-sum"
    return mode, None, global_batch_size, scale


def _pg(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    clip_low,
    clip_high,
    clip_c,
    mode,
    weights=None,
    **batch_info,
):
    assert clip_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_c}."
    )
    agg, num_tokens, num_seqs, scale = _agg_args(mode, response_mask, **batch_info)
    out = ppk.ppo_policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        loss=Clip(clip_low, clip_high, dual_clip=clip_c),
        logratio_clamp=20.0,
        agg=agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        is_weights=weights,
    )
    dtype = float_dtype(old_log_prob, log_prob, advantages)
    return (
        (out.loss * scale).to(dtype),
        out.clipfrac.to(dtype),
        out.approx_kl.to(dtype),
        out.dual_clipfrac.to(dtype),
    )


def compute_policy_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    cliprange=None,
    cliprange_low=None,
    cliprange_high=None,
    clip_ratio_c=3.0,
    loss_agg_mode="token-mean",
):
    """Deprecated 4-tuple form: ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return _pg(
        old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode
    )


def _cfg(config, key, default=None):
    getter = getattr(config, "get", None)
    return getter(key, default) if callable(getter) else getattr(config, key, default)


def compute_policy_loss_vanilla(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """PPO clip (asymmetric ``clip_ratio_low/high``), dual clip ``clip_ratio_c``, log-ratio
    clamp +-20, rollout IS weights, aggregated with ``config.global_batch_info``; returns
    ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``."""
    assert config is not None
    clip = config.clip_ratio
    low = clip if config.clip_ratio_low is None else config.clip_ratio_low
    high = clip if config.clip_ratio_high is None else config.clip_ratio_high
    info = dict(_cfg(config, "global_batch_info", None) or {})
    loss, clipfrac, ppo_kl, lower = _pg(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        low,
        high,
        _cfg(config, "clip_ratio_c", 3.0),
        loss_agg_mode,
        rollout_is_weights,
        **info,
    )
    metrics = {
        "actor/pg_clipfrac": clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": lower.item(),
    }
    return loss, metrics


def agg_loss(
    loss_mat,
    loss_mask,
    loss_agg_mode,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """veRL's aggregation (token-mean, token-sum, seq-mean-token-sum[-norm],
    seq-mean-token-mean) times ``dp_size``, with global counts when given."""
    agg, num_tokens, num_seqs, scale = _agg_args(
        loss_agg_mode, loss_mask, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    x = torch.where(loss_mask.bool(), loss_mat, 0.0) * loss_mask
    if agg == "token-mean":
        out = x.sum() / (loss_mask.sum() if num_tokens is None else num_tokens)
    elif agg == "token-sum":
        out = x.sum()
    else:
        rows = x.sum(-1)
        if agg == "seq-mean-token-mean":
            rows = rows / (loss_mask.sum(-1) + 1e-8)
        out = rows.sum() / (loss_mask.shape[0] if num_seqs is None else num_seqs)
    return out * scale


def compute_value_loss(
    vpreds,
    returns,
    values,
    response_mask,
    cliprange_value,
    loss_agg_mode="token-mean",
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """``0.5 agg(max((v - R)^2, (clip(v, v_old +- c) - R)^2))`` and the clip fraction."""
    agg, num_tokens, num_seqs, scale = _agg_args(
        loss_agg_mode,
        response_mask,
        dp_size,
        batch_num_tokens,
        global_batch_size,
        loss_scale_factor,
    )
    out = ppk.value_loss(
        vpreds,
        values,
        returns,
        response_mask,
        clip=cliprange_value,
        agg=agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
    )
    dtype = float_dtype(vpreds, returns, values)
    return (out.loss * scale).to(dtype), out.clipfrac.to(dtype)


def compute_entropy_loss(logits, response_mask, loss_agg_mode: str = "token-mean"):
    """``agg_loss(entropy_from_logits(logits), response_mask, loss_agg_mode)``."""
    return agg_loss(entropy_from_logits(logits), response_mask, loss_agg_mode)
