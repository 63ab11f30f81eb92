"""value_loss: PPO's clipped value loss, fused.

The forward op returns (loss, clipfrac, row_scale): row_scale is each row's aggregation weight, so
the backward is one elementwise pass without a second reduction. Gradients flow to values only;
old_values and returns are constants, as in veRL's and OpenRLHF's losses (they are rollout data).
"""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype, bool_mask, promote
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, op, register_autograd, register_fake_cpp, variants
from ppokernels.reference import ValueLossOutput

if _backend.HAS_TRITON:
    import ppokernels.triton.value_loss  # noqa: F401  (registers the ppokernels::*_triton ops)

__all__ = ["ValueLossOutput", "value_loss"]


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    backend: str = "auto",
) -> ValueLossOutput:
    """Clipped value loss (veRL ``compute_value_loss``, OpenRLHF ``ValueLoss``), fused.

    Per valid token ``vc = clip(v, v_old - clip, v_old + clip)``,
    ``L = 0.5 max((v - R)^2, (vc - R)^2)`` (``0.5 (v - R)^2`` when clip is None), aggregated
    with ``agg`` as in :func:`ppokernels.ppo_policy_loss`.

    Args:
        values: [B, T] value predictions (float dtype; differentiable).
        old_values: [B, T] rollout values (a constant; mixed dtypes run in the promoted one).
        returns: [B, T] returns, any float dtype (a constant).
        mask: [B, T] bool/int/float; 0 marks padding.

    Returns:
        ValueLossOutput: ``loss`` (0-d float32, float64 for float64 inputs) and detached
        ``clipfrac`` (masked mean of clipped > unclipped squared error).
    """
    name = "value_loss"
    _checks.data2d(name, "values", values)
    _checks.data2d(name, "old_values", old_values, "values", values)
    _checks.tensor(name, "returns", returns, ndim=2)
    _checks.like(name, "returns", returns, "values", values)
    mask = bool_mask(_checks.mask(name, "mask", mask, values))
    clip = _checks.positive(name, "clip", clip, allow_none=True)
    num_tokens, num_seqs = _checks.agg(name, agg, num_tokens, num_seqs)
    # as in ppo_policy_loss: rollout data refused alike by every backend but explicit "reference"
    if _backend.requested(backend) != "reference":
        _checks.constant(name, "old_values", old_values)
        _checks.constant(name, "returns", returns)
    b = _backend.choose(name, values.device, backend)
    kw = dict(clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    if b == "reference":
        return reference.value_loss(values, old_values, returns, mask, **kw)
    values, old_values = promote(values, old_values)
    loss, clipfrac, _ = kernel(name, b)(
        values, old_values, returns, mask, clip, agg, num_tokens, num_seqs
    )
    return ValueLossOutput(loss, clipfrac.detach())


# ------------------------------------------------------------------ fake kernels (C++ ops)
def _value_fake(values, old_values, returns, mask, *args):
    acc = acc_dtype(values)
    return (
        values.new_empty((), dtype=acc),
        values.new_empty((), dtype=acc),
        values.new_empty((values.shape[0],), dtype=acc),
    )


def _value_backward_fake(grad, values, *args):
    return torch.empty_like(values)


register_fake_cpp("value_loss", _value_fake)
register_fake_cpp("value_loss_backward", _value_backward_fake)


# ------------------------------------------------------------------------------- autograd
# value_loss differentiates values (0) only; the backward needs clip, not the aggregation.
def _value_setup(ctx, inputs, output):
    ctx.clip = inputs[4]
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(*inputs[:4], output[2])


def _make_value_backward(backward_op):
    def backward(ctx, grad_loss, _grad_clipfrac, _grad_row_scale):
        if not ctx.saved_tensors:  # only a constant input asked for a gradient
            return (None,) * 8
        values, old_values, returns, mask, row_scale = ctx.saved_tensors
        g = backward_op(grad_loss, values, old_values, returns, mask, row_scale, ctx.clip)
        return (g, *([None] * 7))

    return backward


for _fwd, _bwd in variants("value_loss", "value_loss_backward"):
    register_autograd(_fwd, _make_value_backward(op(_bwd)), setup_context=_value_setup)
