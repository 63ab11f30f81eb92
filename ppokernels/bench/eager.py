"""The trainers' policy and value losses as they write them, in plain torch (veRL 0.9.1
verl/trainer/ppo/core_algos.py): the eager baselines of bench_ppo_policy_loss, bench_value_loss
and bench_per_call."""

import torch


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def agg_loss(loss_mat, mask, mode):
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    seq = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / (mask.sum(-1) + 1e-8)
    return seq.sum() / loss_mat.shape[0]


def eager_policy_loss(
    log_prob, old_log_prob, advantages, mask, clip=0.2, clip_c=3.0, agg="token-mean"
):
    """veRL compute_policy_loss_vanilla: clipped surrogate, dual clip, agg_loss, metrics."""
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = masked_mean(-neg_kl, mask)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    clipped1 = torch.maximum(losses1, losses2)
    clipfrac = masked_mean(torch.gt(losses2, losses1).float(), mask)
    losses3 = -advantages * clip_c
    clipped2 = torch.min(losses3, clipped1)
    clipfrac_lower = masked_mean(torch.gt(clipped1, losses3) * (advantages < 0).float(), mask)
    losses = torch.where(advantages < 0, clipped2, clipped1)
    return agg_loss(losses, mask, agg), clipfrac, ppo_kl, clipfrac_lower


def eager_value_loss(vpreds, returns, values, mask, clip=0.5, agg="token-mean"):
    """veRL compute_value_loss: 0.5 * agg(max of the clipped and unclipped squared errors)."""
    vclipped = torch.clamp(vpreds, values - clip, values + clip)
    l1, l2 = (vpreds - returns) ** 2, (vclipped - returns) ** 2
    loss = 0.5 * agg_loss(torch.max(l1, l2), mask, agg)
    return loss, masked_mean(torch.gt(l2, l1).float(), mask)


def loss_inputs(shape, device, mode):
    """The four [B, T] inputs of either loss: (log-probs or values, their old values, advantages
    or returns, a right-padded bool mask); the first requires a gradient unless mode is
    "forward"."""
    B, T = shape
    x = (-torch.rand(shape, device=device) * 3).requires_grad_(mode != "forward")
    old = x.detach() + 0.1 * torch.randn(shape, device=device)
    target = torch.randn(shape, device=device)
    lengths = torch.randint(T // 2, T + 1, (B, 1), device=device)  # right padding
    mask = torch.arange(T, device=device)[None] < lengths
    return x, old, target, mask
