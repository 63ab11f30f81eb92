"""Reference kl_penalty: per-token KL estimators."""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype as _acc
from ppokernels.reference._clamp import clamp as _clamp


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
        kl = _clamp(kl, -clamp, clamp)
    if straight_through:
        k2 = 0.5 * logratio.square()
        kl = k2 - k2.detach() + kl.detach()
    return kl
