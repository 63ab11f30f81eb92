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
