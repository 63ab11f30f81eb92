"""ppo_policy_loss and value_loss, forward and forward + backward: the fused kernels vs the eager
formula as the trainers write it (veRL's vanilla policy loss with dual clip, agg_loss and the
clipfrac / ppo_kl / clipfrac_lower metrics; its clipped value loss), and the reference compiled.

Bytes per token (fp32 data, bool mask), policy: forward reads logprobs, old_logprobs, advantages
and the mask (13 B); backward reads them again and writes the gradient (17 B). Value: forward
reads values, old_values, returns and the mask (13 B); backward 17 B.
"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import ppokernels_providers, provider_fn, run_mode
from ppokernels.losses import Clip

SHAPES = {
    "tiny": [(4, 64)],
    "demo": [(64, 2048)],
    "cpu": [(64, 2048), (256, 4096)],
    "llm": [(256, 4096), (1024, 8192)],
}
AGG = "token-mean"


def providers(device):
    return ["eager-formula", "reference-compiled", *ppokernels_providers(device)]


# ---- the trainers' formulas in plain torch (veRL 0.9.1 verl/trainer/ppo/core_algos.py)
def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _agg_loss(loss_mat, mask, mode):
    if mode == "token-mean":
        return _masked_mean(loss_mat, mask)
    seq = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / (mask.sum(-1) + 1e-8)
    return seq.sum() / loss_mat.shape[0]


def eager_policy_loss(log_prob, old_log_prob, advantages, mask, clip=0.2, clip_c=3.0):
    """veRL compute_policy_loss_vanilla: clipped surrogate, dual clip, agg_loss, metrics."""
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = _masked_mean(-neg_kl, mask)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    clipped1 = torch.maximum(losses1, losses2)
    clipfrac = _masked_mean(torch.gt(losses2, losses1).float(), mask)
    losses3 = -advantages * clip_c
    clipped2 = torch.min(losses3, clipped1)
    clipfrac_lower = _masked_mean(torch.gt(clipped1, losses3) * (advantages < 0).float(), mask)
    losses = torch.where(advantages < 0, clipped2, clipped1)
    return _agg_loss(losses, mask, AGG), clipfrac, ppo_kl, clipfrac_lower


def eager_value_loss(vpreds, returns, values, mask, clip=0.5):
    """veRL compute_value_loss: 0.5 * agg(max of the clipped and unclipped squared errors)."""
    vclipped = torch.clamp(vpreds, values - clip, values + clip)
    l1, l2 = (vpreds - returns) ** 2, (vclipped - returns) ** 2
    loss = 0.5 * _agg_loss(torch.max(l1, l2), mask, AGG)
    return loss, _masked_mean(torch.gt(l2, l1).float(), mask)


def _policy_fn(provider):
    if provider == "eager-formula":
        return lambda lp, old, adv, m: eager_policy_loss(lp, old, adv, m.float())[0]
    return provider_fn(
        provider,
        reference.ppo_policy_loss,
        ppokernels.ppo_policy_loss,
        result=_loss,
        loss=Clip(dual_clip=3.0),
        agg=AGG,
    )


def _value_fn(provider):
    if provider == "eager-formula":
        return lambda v, vo, ret, m: eager_value_loss(v, ret, vo, m.float())[0]
    return provider_fn(
        provider, reference.value_loss, ppokernels.value_loss, result=_loss, clip=0.5, agg=AGG
    )


def _loss(out):
    return out.loss


def _data(shape, device, mode):
    B, T = shape
    lp = (-torch.rand(shape, device=device) * 3).requires_grad_(mode != "forward")
    old = lp.detach() + 0.1 * torch.randn(shape, device=device)
    adv = torch.randn(shape, device=device)
    lengths = torch.randint(T // 2, T + 1, (B, 1), device=device)  # right padding
    mask = torch.arange(T, device=device)[None] < lengths
    return lp, old, adv, mask


def _bench(benchmark, fn, shape, provider, device, mode, group):
    data = _data(shape, device, mode)  # (logprobs or values, old ..., advantages or returns, mask)
    moved = data[0].numel() * (13 if mode == "forward" else 30)
    run_mode(
        benchmark, fn, data, mode, group=group, device=device, provider=provider, bytes_moved=moved
    )


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_ppo_policy_loss(benchmark, shape, provider, device, mode):
    _bench(
        benchmark,
        _policy_fn(provider),
        shape,
        provider,
        device,
        mode,
        group=f"ppo_policy_loss {mode} {shape}",
    )


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_value_loss(benchmark, shape, provider, device, mode):
    _bench(
        benchmark,
        _value_fn(provider),
        shape,
        provider,
        device,
        mode,
        group=f"value_loss {mode} {shape}",
    )
