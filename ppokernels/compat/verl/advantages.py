"""veRL 0.9.1's outcome-reward advantage estimators on rewards, masks and group ids
(``verl.trainer.ppo.core_algos`` ``ADV_ESTIMATOR_REGISTRY``: grpo_vectorized, gdpo, grpo_passk,
reinforce_plus_plus_baseline, rloo_vectorized, opo, remax, gpg) and the optimal-token-baseline
ones, which also read the rollout log-probs and ``sum pi^2`` (optimal_token_baseline,
tir_optimal_token_baseline), vectorised over the batch (veRL loops over samples or groups in
Python for most of them) on ppokernels' group baselines, discounted returns and masked whitening.
Same signatures, values and dtypes as veRL.
"""

from __future__ import annotations

import numpy as np
import torch

import ppokernels as ppk
from ppokernels.compat import float_dtype
from ppokernels.compat.verl.core_algos import _group_ids, _outcome
from ppokernels.compat.verl.torch_functional import masked_whiten

__all__ = [
    "compute_gdpo_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_opo_outcome_advantage",
    "compute_optimal_token_baseline_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
]


def _groups(index, device):
    """Dense group ids [B] and each sample's group size [B]."""
    g = _group_ids(index, device)
    return g, torch.bincount(g)[g]


def _baseline(token_level_rewards, index):
    """``s - mean_g`` (singleton groups: mean 0), as float scores [B]."""
    scores = token_level_rewards.sum(dim=-1)
    g = _group_ids(index, scores.device)
    adv = ppk.group_advantages(scores, g, estimator="grpo", norm_by_std=False)
    return adv.to(scores.dtype), scores, g


def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards,
    response_mask,
    index,
    epsilon=1e-6,
    norm_adv_by_std_in_grpo=True,
    config=None,
):
    """GRPO with veRL's vectorised group statistics: the same numbers as the loop version
    (singleton groups: mean 0, std 1; unbiased std without a floor)."""
    return _outcome(
        token_level_rewards,
        response_mask,
        index,
        estimator="grpo",
        eps=epsilon,
        norm_by_std=norm_adv_by_std_in_grpo,
    )


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs
):
    """RLOO, vectorised form: ``s`` minus the mean of the other members; singleton groups get
    0 (the loop version keeps their raw score)."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        g, count = _groups(index, scores.device)
        adv = ppk.group_advantages(scores, g, estimator="rloo").to(scores.dtype)
        adv = torch.where(count > 1, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs
):
    """REINFORCE++-baseline: ``s - mean_g`` over the response, whitened over the batch, times
    the mask."""
    with torch.no_grad():
        adv, _, _ = _baseline(token_level_rewards, index)
        scores = adv.unsqueeze(-1) * response_mask
        scores = masked_whiten(scores, response_mask) * response_mask
    return scores, scores


def compute_opo_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs
):
    """OPO: baseline ``sum_j L_j s_j / sum_j L_j`` over the group (``L`` = response length);
    singleton groups: baseline 0."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        length = response_mask.sum(dim=-1).to(scores.dtype)
        g, count = _groups(index, scores.device)
        num = torch.zeros(
            int(g.max()) + 1 if g.numel() else 0, dtype=scores.dtype, device=scores.device
        )
        den = torch.zeros_like(num).index_add_(0, g, length)
        num = num.index_add_(0, g, length * scores)
        base = torch.where(count > 1, num[g] / den[g], torch.zeros_like(scores))
        adv = (scores - base).unsqueeze(-1) * response_mask
    return adv, adv


def compute_remax_outcome_advantage(
    token_level_rewards, reward_baselines, response_mask, config=None, **kwargs
):
    """ReMax: returns = reverse cumulative sum of the masked rewards, advantages = returns minus
    the greedy baseline on valid tokens. No whitening."""
    with torch.no_grad():
        ones = torch.ones_like(response_mask, dtype=torch.bool)
        returns = ppk.discounted_returns(
            token_level_rewards * response_mask, ones, gamma=1.0, mode="zero"
        ).to(token_level_rewards.dtype)
        advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
    return advantages, returns


def compute_gpg_outcome_advantage(
    token_level_rewards,
    response_mask,
    index,
    epsilon=1e-6,
    f_norm=1.0,
    alpha=1.0,
    config=None,
    **kwargs,
):
    """GPG: ``alpha (s - mean_g) / f_norm`` with ``alpha = B / max(#{s != 0}, 1)`` (veRL
    recomputes alpha, whatever is passed); singleton groups: mean 0."""
    with torch.no_grad():
        adv, scores, _ = _baseline(token_level_rewards, index)
        alpha = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
        adv = (alpha * adv / f_norm).to(scores.dtype).unsqueeze(-1) * response_mask
    return adv, adv


def compute_grpo_passk_outcome_advantage(
    token_level_rewards,
    response_mask,
    index,
    epsilon=1e-6,
    norm_adv_by_std_in_grpo=True,
    config=None,
    **kwargs,
):
    """Pass@k: only each group's best sample gets ``r_max - r_second`` (divided by the group's
    unbiased std + epsilon when ``config.norm_adv_by_std_in_grpo``, which veRL reads from the
    config, not the argument); groups need at least 2 samples."""
    assert config is not None
    norm = config.get("norm_adv_by_std_in_grpo", True)
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        g, count = _groups(index, scores.device)
        if (count < 2).any():
            i = int(torch.nonzero(count < 2)[0])
            raise ValueError(
                f"Pass@k requires at least 2 samples per group. Got 1 for group {index[i]}."
            )
        n_g = int(g.max()) + 1
        best = torch.full((n_g,), -torch.inf, dtype=scores.dtype, device=scores.device)
        best = best.scatter_reduce(0, g, scores, "amax")
        pos = torch.arange(scores.shape[0], device=scores.device)
        is_best = scores == best[g]
        first = torch.full((n_g,), scores.shape[0], dtype=torch.long, device=scores.device)
        first = first.scatter_reduce(0, g, torch.where(is_best, pos, scores.shape[0]), "amin")
        winner = first[g] == pos
        second = torch.full_like(best, -torch.inf).scatter_reduce(
            0, g, torch.where(winner, -torch.inf, scores), "amax"
        )
        adv = best - second
        if norm:
            ones = torch.ones_like(scores)
            n = torch.zeros_like(best).index_add_(0, g, ones)
            mean = torch.zeros_like(best).index_add_(0, g, scores) / n
            var = torch.zeros_like(best).index_add_(0, g, (scores - mean[g]).square()) / (n - 1)
            adv = adv / (var.sqrt() + epsilon)
        adv = torch.where(winner, adv[g], torch.zeros_like(scores))
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_gdpo_outcome_advantage(
    token_level_rewards,
    response_mask,
    index,
    epsilon=1e-6,
    norm_adv_by_std_in_grpo=True,
    config=None,
    non_tensor_batch=None,
    batch=None,
    **kwargs,
):
    """GDPO: GRPO-normalise each reward component (``config.gdpo_reward_keys`` in
    ``non_tensor_batch``; the summed token rewards without them) within its group, take the
    weighted sum (``config.gdpo_reward_weights``), whiten over the batch, times the mask."""
    device = token_level_rewards.device
    scores = [token_level_rewards.sum(dim=-1)]
    weights = None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = config.get("gdpo_reward_keys", None)
        assert keys, (
            "GDPO requires 'algorithm.gdpo_reward_keys' listing the individual reward "
            "component keys returned by compute_score (e.g. ['format_reward', 'accuracy_reward'])."
        )
        for key in keys:
            assert key in non_tensor_batch, (
                f"GDPO reward key '{key}' not found in non_tensor_batch. "
                f"Available keys: {list(non_tensor_batch.keys())}. "
                f"Make sure your compute_score returns a dict containing '{key}'."
            )
        # veRL places each score on the last valid token and sums over the response: the score
        scores = [
            torch.tensor(np.asarray(non_tensor_batch[k], dtype=np.float32), device=device)
            for k in keys
        ]
        if config.get("gdpo_reward_weights", None) is not None:
            weights = list(config.get("gdpo_reward_weights"))
    w = torch.tensor(
        weights if weights is not None else [1.0] * len(scores), dtype=torch.float32, device=device
    )
    g = _group_ids(index, device)
    total = None
    for k, s in enumerate(scores):
        a = ppk.group_advantages(
            s, g, estimator="grpo", eps=epsilon, norm_by_std=norm_adv_by_std_in_grpo
        )
        a = w[k] * (a.to(s.dtype).unsqueeze(-1) * response_mask)
        total = a if total is None else total + a
    advantages = masked_whiten(total, response_mask) * response_mask
    return advantages, advantages


# ------------------------------------------------------------- optimal token baseline (OTB)
# B_t = sum_g G_t W_t / (sum_g W_t + eps) per group and time step, with the path-variance proxy
# W_t = sum_{j <= t} m_j (1 - 2 pi_j + sum_v pi_v^2) rho_j^2. No ppokernels op reduces per group
# *and* per time step with weights (group_advantages reduces one score per sample), so the group
# sums are one torch index_add_ each (veRL loops over groups); the returns are ppokernels'.


def _returns(token_level_rewards, response_mask):
    """Undiscounted return-to-go of the masked rewards, on every position (masked ones carry
    the return of the next valid token), in veRL's dtype."""
    ones = torch.ones_like(response_mask, dtype=torch.bool)
    valid = response_mask.bool()
    rewards = torch.where(valid, token_level_rewards, 0.0) * response_mask
    returns = ppk.discounted_returns(rewards, ones, gamma=1.0, mode="zero")
    return returns.to(float_dtype(token_level_rewards, response_mask))


def _path_variance(old_log_probs, sum_pi_squared, rollout_is_weights, response_mask):
    """``W_t`` [B, T]: the cumulative sum over valid tokens of ``1 - 2 pi + sum pi^2`` (times
    ``rho^2`` with IS weights rho)."""
    w = 1 - 2 * torch.exp(old_log_probs) + sum_pi_squared
    if rollout_is_weights is not None:
        w = w * rollout_is_weights**2
    return (torch.where(response_mask.bool(), w, 0.0) * response_mask).cumsum(dim=-1)


def _group_sum(x, g, n_groups):
    return x.new_zeros((n_groups, *x.shape[1:])).index_add_(0, g, x)


def _zero_tail(lengths, g, n_groups, count, width):
    """[B, width] bool: in each group of >= 2 with a unique longest sample, that sample's
    positions from the second-longest length on (veRL's ``handle_zero_tail``)."""
    neg = torch.full((n_groups,), -1, dtype=lengths.dtype, device=lengths.device)
    longest = neg.scatter_reduce(0, g, lengths, "amax")
    is_longest = lengths == longest[g]
    n_longest = _group_sum(is_longest.long(), g, n_groups)[g]
    second = neg.scatter_reduce(0, g, torch.where(is_longest, -1, lengths), "amax")[g]
    row = is_longest & (n_longest == 1) & (count > 1)
    return row[:, None] & (torch.arange(width, device=lengths.device) >= second[:, None])


def _otb(returns, weights, g, count, lengths, handle_zero_tail, epsilon):
    """``returns - B``, ``B`` the ``weights``-weighted mean of ``returns`` over each group per
    column ([B, width] each; 0 in singleton groups and on the zeroed tail)."""
    n_groups = int(g.max()) + 1 if g.numel() else 0
    num = _group_sum(returns * weights, g, n_groups)
    den = _group_sum(weights, g, n_groups) + epsilon
    keep = (count > 1)[:, None]
    if handle_zero_tail:
        keep = keep & ~_zero_tail(lengths, g, n_groups, count, returns.shape[-1])
    base = torch.where(keep, (num / den)[g].to(returns.dtype), 0.0)
    return returns - base


def compute_optimal_token_baseline_advantage(
    token_level_rewards,
    response_mask,
    index,
    old_log_probs,
    sum_pi_squared,
    rollout_is_weights=None,
    handle_zero_tail=True,
    epsilon=1e-8,
    **kwargs,
):
    """OTB: ``A_t = (G_t - B_t) m_t`` with the per-time-step group baseline
    ``B_t = sum_g G_t W_t m_t / (sum_g W_t m_t + epsilon)`` (``W`` = path-variance proxy, see
    above; time steps are columns of the padded [B, T] layout), ``B = 0`` in singleton groups
    and, with ``handle_zero_tail``, on a unique longest sample's columns from the group's
    second-longest length on. Returns ``(A, G)``, [B, T] each."""
    with torch.no_grad():
        returns = _returns(token_level_rewards, response_mask)
        w = _path_variance(old_log_probs, sum_pi_squared, rollout_is_weights, response_mask)
        g = _group_ids(index, returns.device)
        count = torch.bincount(g)[g]
        lengths = response_mask.sum(dim=-1).long()
        adv = _otb(returns, w * response_mask, g, count, lengths, handle_zero_tail, epsilon)
        adv = adv * response_mask
    return adv, returns


def compute_multi_turn_optimal_token_baseline_advantage(
    token_level_rewards,
    response_mask,
    index,
    old_log_probs,
    sum_pi_squared,
    rollout_is_weights=None,
    handle_zero_tail=True,
    epsilon=1e-8,
    **kwargs,
):
    """TIR-OTB (multi-turn): OTB with time steps counted over each sample's valid tokens only
    (the k-th valid token of every group member shares a baseline, whatever the observation
    spans before it); samples without a valid token get ``A = 0`` and are left out of their
    group. Returns ``(A, G)``, [B, T] each, ``G`` on every position as OTB's."""
    with torch.no_grad():
        returns = _returns(token_level_rewards, response_mask)
        w = _path_variance(old_log_probs, sum_pi_squared, rollout_is_weights, response_mask)
        valid = response_mask.bool()
        lengths = response_mask.sum(dim=-1).long()
        rows, cols = torch.nonzero(valid, as_tuple=True)
        pos = (valid.cumsum(dim=-1) - 1)[rows, cols]  # the rank of each valid token in its row
        width = int(lengths.max()) if lengths.numel() else 0
        packed_g = returns.new_zeros((returns.shape[0], width))
        packed_w = w.new_zeros((returns.shape[0], width))
        packed_g[rows, pos] = returns[rows, cols]
        packed_w[rows, pos] = w[rows, cols]
        g = _group_ids(index, returns.device)
        # empty samples are all zeros in the packed layout: they add nothing to the sums but
        # must not count as group members
        count = _group_sum((lengths > 0).long(), g, int(g.max()) + 1 if g.numel() else 0)[g]
        packed = _otb(packed_g, packed_w, g, count, lengths, handle_zero_tail, epsilon)
        adv = torch.zeros_like(returns)
        adv[rows, cols] = packed[rows, pos]
        adv = adv * response_mask
    return adv, returns


# registry name -> function, for patch()
ESTIMATORS = {
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}
