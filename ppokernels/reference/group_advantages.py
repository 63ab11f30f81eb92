"""Reference group_advantages: GRPO, Dr.GRPO and RLOO group baselines."""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype as _acc


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
