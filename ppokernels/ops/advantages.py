"""Masked moments and whitening, and group baselines (GRPO, Dr.GRPO, RLOO).

Each backward is itself a registered op (``*_backward`` / ``*_backward_triton``); the formulas are
derived in ``csrc/include/ppokernels/advantages.h``.
"""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, op, register_autograd, register_fake_cpp, variants

if _backend.HAS_TRITON:
    import ppokernels.triton.advantages  # noqa: F401  (masked_*_triton ops)
    import ppokernels.triton.advantages_group  # noqa: F401  (group_advantages*_triton ops)

ESTIMATORS = ("grpo", "rloo")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _moments(name, x, mask, unbiased, backend):
    _checks.tensor(name, "x", x)
    _checks.mask(name, "mask", mask, x)
    _checks.choice(name, "backend", backend, _backend.BACKENDS)
    _checks.not_meta(name, "x", x)
    b = _backend.choose("masked_moments", x.device, backend)  # the op both functions share
    return None if b == "reference" else kernel("masked_moments", b)(x, mask, unbiased)


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

    As veRL's and TRL's ``masked_whiten``, every entry is transformed, valid or not (select
    with the mask afterwards to zero the padding). veRL raises on masks with fewer than two valid
    entries; here the statistics are NaN then (see :func:`masked_var`) and so is the output.
    inf/NaN padding at masked positions stays inf/NaN in the output but never reaches a
    gradient: such entries do not feed the statistics' gradient (their own is ``rstd * g``).

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
    _checks.not_meta(name, "x", x)
    b = _backend.choose(name, x.device, backend)
    if b == "reference":
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    return kernel(name, b)(x, mask, shift_mean, unbiased, eps)


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
    _checks.not_meta(name, "scores", scores)
    b = _backend.choose(name, scores.device, backend)
    if b == "reference":
        return reference.group_advantages(
            scores, group_index, estimator=estimator, eps=eps, norm_by_std=norm_by_std
        )
    uniq, ids = torch.unique(group_index, return_inverse=True)  # dense ids in [0, G)
    return kernel(name, b)(scores, ids, uniq.numel(), estimator, eps, norm_by_std)


# ------------------------------------------------------------------ fake kernels (C++ ops)
register_fake_cpp("masked_moments", lambda x, mask, unbiased: x.new_empty((3,), dtype=acc_dtype(x)))
register_fake_cpp(
    "masked_moments_backward", lambda grad, x, mask, moments, unbiased: x.new_empty(x.shape)
)
register_fake_cpp(
    "masked_whiten",
    lambda x, mask, shift_mean, unbiased, eps: x.new_empty(x.shape, dtype=acc_dtype(x)),
)
register_fake_cpp(
    "masked_whiten_backward",
    lambda grad, x, mask, shift_mean, unbiased, eps: x.new_empty(x.shape),
)
register_fake_cpp(
    "group_advantages",
    lambda scores, ids, num_groups, est, eps, norm: scores.new_empty(
        scores.shape, dtype=acc_dtype(scores)
    ),
)
register_fake_cpp(
    "group_advantages_backward",
    lambda grad, scores, ids, num_groups, est, eps, norm: scores.new_empty(scores.shape),
)


# ------------------------------------------------------------------------------- autograd
# The three ops differentiate their first input only (x, scores; masks and group ids are not
# differentiable). Each backward op takes (grad, *saved tensors, *scalar arguments): the tensor
# inputs, plus for masked_moments its output [mean, var, count] (the count gets no gradient).
def _make_setup(n_tensors: int, save_output: bool):
    def setup_context(ctx, inputs, output):
        ctx.scalars = inputs[n_tensors:]
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*inputs[:n_tensors], *((output,) if save_output else ()))

    return setup_context


def _make_backward(backward_op):
    def backward(ctx, grad):
        dx = None
        if ctx.needs_input_grad[0]:
            dx = backward_op(grad, *ctx.saved_tensors, *ctx.scalars)
        return dx, *([None] * (1 + len(ctx.scalars)))

    return backward


for _name, _setup in (
    ("masked_moments", _make_setup(2, save_output=True)),
    ("masked_whiten", _make_setup(2, save_output=False)),
    ("group_advantages", _make_setup(2, save_output=False)),
):
    for _fwd, _bwd in variants(_name, f"{_name}_backward"):
        register_autograd(_fwd, _make_backward(op(_bwd)), setup_context=_setup)
