"""Masked moments and whitening, and group baselines (GRPO, Dr.GRPO, RLOO).

Fake kernels and autograd formulas of the ops are registered in
:mod:`ppokernels.ops._advantages_register`.
"""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels.ops import _advantages_register, _checks  # noqa: F401  (registers fakes, autograd)

ESTIMATORS = ("grpo", "rloo")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _moments(name, x, mask, unbiased, backend):
    _checks.tensor(name, "x", x)
    _checks.mask(name, "mask", mask, x)
    _checks.choice(name, "backend", backend, _backend.BACKENDS)
    b = _backend.choose("masked_moments", x.device, backend)  # the op both functions share
    if b == "reference":
        return None
    fn = torch.ops.ppokernels.masked_moments
    return (fn if b == "cpp" else torch.ops.ppokernels.masked_moments_triton)(x, mask, unbiased)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask != 0``: ``sum(x m) / sum(m)``.

    Args:
        x: (...) any float dtype. mask: (...) bool, integer or float {0, 1}, the shape of x.
    Returns:
        0-d float32 (float64 for float64 x), differentiable with respect to x. NaN when no
        entry is valid (as ``torch.mean`` of an empty tensor). Masked entries are ignored even
        when they hold inf or NaN. Deterministic: the same bits on every call.
    """
    out = _moments("masked_mean", x, mask, True, backend)
    return reference.masked_mean(x, mask) if out is None else out[0]


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask != 0`` (two passes, fp32 accumulation).

    ``sum(m (x - mean)^2) / d`` with ``d = n - 1`` (Bessel, ``unbiased=True``) or ``n``,
    ``n = sum(m)``. Returns a 0-d float32 (float64 for float64 x), differentiable; NaN when
    ``d <= 0`` (no valid entry, or a single one when unbiased), as ``torch.var``.
    """
    _checks.flag("masked_var", "unbiased", unbiased)
    out = _moments("masked_var", x, mask, unbiased, backend)
    return reference.masked_var(x, mask, unbiased=unbiased) if out is None else out[1]


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)``, with mean and var (:func:`masked_var`) over the
    entries where ``mask != 0``; with ``shift_mean=False`` the mean is added back.

    As veRL's and TRL's ``masked_whiten``, every entry is transformed, valid or not (multiply
    by the mask afterwards to zero the padding). veRL raises on masks with fewer than two valid
    entries; here the statistics are NaN then (see :func:`masked_var`) and so is the output.

    Args:
        x: (...) any float dtype. mask: (...) bool, integer or float {0, 1}, the shape of x.
        eps: >= 0, added to the variance. unbiased: Bessel's correction (veRL, TRL: True;
            OpenRLHF's normalisation uses False and a variance floor instead).
    Returns:
        (...) float32 (float64 for float64 x), differentiable with respect to x through the
        mean and the variance as well.
    """
    name = "masked_whiten"
    _checks.tensor(name, "x", x)
    _checks.mask(name, "mask", mask, x)
    _checks.flag(name, "shift_mean", shift_mean)
    _checks.flag(name, "unbiased", unbiased)
    eps = _checks.non_negative(name, "eps", eps)
    b = _backend.choose(name, x.device, backend)
    if b == "reference":
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    fn = (
        torch.ops.ppokernels.masked_whiten
        if b == "cpp"
        else torch.ops.ppokernels.masked_whiten_triton
    )
    return fn(x, mask, shift_mean, unbiased, eps)


def group_advantages(
    scores: torch.Tensor,
    group_index: torch.Tensor,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    norm_by_std: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence advantages with a group baseline (several samples of one prompt).

    With ``mean_g``, ``std_g`` (unbiased) and ``n_g`` the statistics of the group of sample i:
      - ``"grpo"``: ``(s_i - mean_g) / (std_g + eps)``; ``norm_by_std=False`` gives Dr.GRPO's
        ``s_i - mean_g``.
      - ``"rloo"``: ``s_i`` minus the mean of the other members, ``n_g / (n_g - 1) (s_i - mean_g)``.
    Groups of one sample behave as veRL's loop versions (``compute_grpo_outcome_advantage``,
    ``compute_rloo_outcome_advantage``): GRPO takes mean 0 and std 1, so ``A = s / (1 + eps)``
    (``s`` without std normalisation); RLOO returns the raw score ``s``.

    Args:
        scores: [B] any float dtype. group_index: [B] integer group ids, in any order, not
            necessarily contiguous or sorted (e.g. veRL's ``uid`` mapped to integers).
        eps: >= 0. norm_by_std: only for "grpo".
    Returns:
        [B] float32 (float64 for float64 scores), differentiable with respect to scores. In a
        group of equal scores (std 0) the std's gradient is taken as 0 (autograd through
        ``torch.std`` gives NaN there). The group ids are made dense with ``torch.unique``,
        which synchronises with the device.
    """
    name = "group_advantages"
    _checks.tensor(name, "scores", scores, ndim=1)
    if not isinstance(group_index, torch.Tensor):
        raise TypeError(f"{name}: group_index must be a torch.Tensor, got {type(group_index)}")
    if group_index.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: group_index must be an integer tensor, got {group_index.dtype}")
    _checks.same_shape(name, "group_index", group_index, "scores", scores)
    _checks.same_device(name, "group_index", group_index, scores)
    _checks.choice(name, "estimator", estimator, ESTIMATORS)
    eps = _checks.non_negative(name, "eps", eps)
    _checks.flag(name, "norm_by_std", norm_by_std)
    b = _backend.choose(name, scores.device, backend)
    if b == "reference":
        return reference.group_advantages(
            scores, group_index, estimator=estimator, eps=eps, norm_by_std=norm_by_std
        )
    uniq, ids = torch.unique(group_index, return_inverse=True)  # dense ids in [0, G)
    fn = torch.ops.ppokernels.group_advantages
    fn = fn if b == "cpp" else torch.ops.ppokernels.group_advantages_triton
    return fn(scores, ids, uniq.numel(), estimator, eps, norm_by_std)
