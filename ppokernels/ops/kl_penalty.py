"""kl_penalty: per-token KL estimators between the policy and a reference policy."""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, op, register_autograd, register_fake_cpp, variants

if _backend.HAS_TRITON:
    import ppokernels.triton.kl_penalty  # noqa: F401  (registers ppokernels::kl_penalty_triton)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k3",
    clamp: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference policy.

    With x = logprobs - ref_logprobs (Schulman, "Approximating KL Divergence", 2020):
    ``k1 = x``, ``k2 = x^2 / 2``, ``k3 = exp(-x) - 1 + x``, ``abs = |x|``.
    k3 is evaluated without cancellation near x = 0 (a series), its gradient as ``-expm1(-x)``.

    Args:
        logprobs: (...) log-probs of the sampled tokens under the policy, any float dtype.
        ref_logprobs: (...) the same tokens under the reference policy, same shape and dtype.
        estimator: "k1", "k2", "k3" or "abs"; a "+" suffix ("k3+") keeps the value of the named
            estimator and takes the gradient of k2, ``x`` (veRL's straight-through estimators).
        clamp: if given, the value is clamped to [-clamp, clamp] and clamped entries get no
            gradient. veRL's "low_var_kl" is ``estimator="k3", clamp=10`` (its extra input clamp
            at +-20 changes nothing once the output is clamped); OpenRLHF clamps every estimator
            at 10.
        backend: "auto", "cpp", "triton" or "reference".

    Returns:
        (...) float32 KL per token (float64 for float64 inputs), differentiable with respect to
        both inputs (d/d ref_logprobs = -d/d logprobs). NaN inputs give NaN.

    See also: :func:`ppokernels.reference.kl_penalty`.
    """
    name = "kl_penalty"
    _checks.pair(name, "logprobs", logprobs, "ref_logprobs", ref_logprobs)
    _checks.kl_estimator(name, "estimator", estimator)
    clamp = _checks.positive(name, "clamp", clamp, allow_none=True)
    b = _backend.choose(name, logprobs.device, backend)
    if b == "reference":
        return reference.kl_penalty(logprobs, ref_logprobs, estimator=estimator, clamp=clamp)
    return kernel(name, b)(logprobs, ref_logprobs, estimator, clamp)


# ------------------------------------------------------------------ fake kernels (C++ ops)
def _fake(logprobs, ref_logprobs, estimator, clamp):
    return logprobs.new_empty(logprobs.shape, dtype=acc_dtype(logprobs))


def _fake_backward(grad, logprobs, ref_logprobs, estimator, clamp):
    return torch.empty_like(logprobs)


register_fake_cpp("kl_penalty", _fake)
register_fake_cpp("kl_penalty_backward", _fake_backward)


# ------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, ctx.estimator, ctx.clamp = inputs
    # the gradient of either input needs both (it is a function of their difference)
    need = ctx.needs_input_grad
    if need[0] or need[1]:
        ctx.save_for_backward(logprobs, ref_logprobs)
    else:
        ctx.save_for_backward(None, None)


def _make_backward(backward_op):
    def backward(ctx, grad):
        logprobs, ref_logprobs = ctx.saved_tensors
        if logprobs is None:
            return None, None, None, None
        g = backward_op(grad, logprobs, ref_logprobs, ctx.estimator, ctx.clamp)
        return (
            g if ctx.needs_input_grad[0] else None,
            -g if ctx.needs_input_grad[1] else None,
            None,
            None,
        )

    return backward


for _fwd, _bwd in variants("kl_penalty", "kl_penalty_backward"):
    register_autograd(_fwd, _make_backward(op(_bwd)), setup_context=_setup_context)
