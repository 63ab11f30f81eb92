"""``clamp`` for the references, with one gradient convention whatever the torch version."""

from __future__ import annotations

import torch


def clamp(
    x: torch.Tensor, lo: float | torch.Tensor | None = None, hi: float | torch.Tensor | None = None
) -> torch.Tensor:
    """``x.clamp(lo, hi)``, with gradient 1 on the closed interval ``[lo, hi]`` and 0 outside it
    (where a bound that is a tensor takes it).

    That is the kernels' convention, and torch.clamp's up to torch 2.14; torch 2.15 gives 0 at
    the bounds themselves. The difference shows where an input sits exactly on a bound (bf16
    log-ratios do, e.g. lp - old = 0.5 = logratio_clamp), so the specification pins it."""
    # where, not clamp: the gradient goes to x inside [lo, hi] (bounds included) and to a tensor
    # bound where x lies beyond it; NaN compares false and passes through, as in clamp
    if lo is not None:
        x = torch.where(x < lo, lo, x)
    if hi is not None:
        x = torch.where(x > hi, hi, x)
    return x
