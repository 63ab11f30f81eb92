"""``clamp`` for the references, with one gradient convention whatever the torch version."""

from __future__ import annotations

import torch


def clamp(
    x: torch.Tensor, lo: float | torch.Tensor | None = None, hi: float | torch.Tensor | None = None
) -> torch.Tensor:
    """``x.clamp(lo, hi)``, with gradient 1 on the closed interval ``[lo, hi]`` and 0 outside it.

    That is the kernels' convention, and torch.clamp's up to torch 2.14; torch 2.15 gives 0 at
    the bounds themselves. The difference shows where an input sits exactly on a bound (bf16
    log-ratios do, e.g. lp - old = 0.5 = logratio_clamp), so the specification pins it."""
    inside = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        inside = inside & (x >= lo)
    if hi is not None:
        inside = inside & (x <= hi)
    return torch.where(inside, x, x.clamp(lo, hi).detach())
