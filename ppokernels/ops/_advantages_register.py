"""Fake kernels and autograd formulas of the advantages ops (C++ and Triton variants).

Each backward is itself a registered op (``*_backward`` / ``*_backward_triton``); the formulas are
derived in ``csrc/include/ppokernels/advantages.h``.
"""

from __future__ import annotations

import torch

from ppokernels import _backend
from ppokernels.ops._register import op, register_fake_cpp, variants

if _backend.HAS_TRITON:
    import ppokernels.triton.advantages  # noqa: F401  (masked_*_triton ops)
    import ppokernels.triton.advantages_group  # noqa: F401  (group_advantages*_triton ops)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


register_fake_cpp("masked_moments", lambda x, mask, unbiased: x.new_empty((3,), dtype=_acc(x)))
register_fake_cpp(
    "masked_moments_backward", lambda grad, x, mask, moments, unbiased: x.new_empty(x.shape)
)
register_fake_cpp(
    "masked_whiten",
    lambda x, mask, shift_mean, unbiased, eps: x.new_empty(x.shape, dtype=_acc(x)),
)
register_fake_cpp(
    "masked_whiten_backward",
    lambda grad, x, mask, shift_mean, unbiased, eps: x.new_empty(x.shape),
)
register_fake_cpp(
    "group_advantages",
    lambda scores, ids, num_groups, est, eps, norm: scores.new_empty(
        scores.shape, dtype=_acc(scores)
    ),
)
register_fake_cpp(
    "group_advantages_backward",
    lambda grad, scores, ids, num_groups, est, eps, norm: scores.new_empty(scores.shape),
)


# masked_moments: output [mean, var, count]; the count gets no gradient.
def _moments_setup(ctx, inputs, output):
    x, mask, ctx.unbiased = inputs
    ctx.save_for_backward(x, mask, output)


def _moments_backward(backward_op):
    def backward(ctx, grad):
        x, mask, moments = ctx.saved_tensors
        dx = backward_op(grad, x, mask, moments, ctx.unbiased) if ctx.needs_input_grad[0] else None
        return dx, None, None

    return backward


def _whiten_setup(ctx, inputs, output):
    x, mask, ctx.shift_mean, ctx.unbiased, ctx.eps = inputs
    ctx.save_for_backward(x, mask)


def _whiten_backward(backward_op):
    def backward(ctx, grad):
        x, mask = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = backward_op(grad, x, mask, ctx.shift_mean, ctx.unbiased, ctx.eps)
        return dx, None, None, None, None

    return backward


def _group_setup(ctx, inputs, output):
    scores, ids, ctx.num_groups, ctx.estimator, ctx.eps, ctx.norm_by_std = inputs
    ctx.save_for_backward(scores, ids)


def _group_backward(backward_op):
    def backward(ctx, grad):
        scores, ids = ctx.saved_tensors
        ds = None
        if ctx.needs_input_grad[0]:
            ds = backward_op(
                grad, scores, ids, ctx.num_groups, ctx.estimator, ctx.eps, ctx.norm_by_std
            )
        return ds, None, None, None, None, None

    return backward


for _name, _setup, _make in (
    ("masked_moments", _moments_setup, _moments_backward),
    ("masked_whiten", _whiten_setup, _whiten_backward),
    ("group_advantages", _group_setup, _group_backward),
):
    for _fwd, _bwd in variants(_name, f"{_name}_backward"):
        torch.library.register_autograd(_fwd, _make(op(_bwd)), setup_context=_setup)
