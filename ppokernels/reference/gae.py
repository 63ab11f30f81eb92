"""Reference gae and discounted_returns: the advantage and return recursions, as loops over time."""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype as _acc


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
