"""masked_mean, masked_var and masked_whiten: deterministic masked statistics and whitening.

masked_mean and masked_var share one op, ``masked_moments`` ([mean, var, count] in one pass).
Each backward is itself a registered op (``*_backward`` / ``*_backward_triton``); the formulas
are derived in ``csrc/include/ppokernels/masked_whiten.h``.
"""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, register_fake_cpp, register_first_input_autograd

if _backend.HAS_TRITON:
    import ppokernels.triton.masked_whiten  # noqa: F401  (masked_*_triton ops)


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

# ------------------------------------------------------------------------------- autograd
# x only; masked_moments' backward also takes its output [mean, var, count] (the count gets no
# gradient).
register_first_input_autograd("masked_moments", 2, save_output=True)
register_first_input_autograd("masked_whiten", 2, save_output=False)
