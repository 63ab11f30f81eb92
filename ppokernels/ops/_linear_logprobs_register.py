"""Fake kernels and autograd of the linear_logprobs ops (every built variant: C++ and Triton).

The forward op returns per-row ``(label_logit, lse, entropy)``; the backward op takes their
upstream gradients and ``output_mask`` = which of (hidden, weight, bias) need a gradient, from
``ctx.needs_input_grad`` (a frozen lm_head costs no grad_weight GEMM).
"""

from __future__ import annotations

import torch

from ppokernels import _backend
from ppokernels.ops._register import op, register_fake_cpp, variants

if _backend.HAS_TRITON:
    import ppokernels.triton.linear_logprobs  # noqa: F401  (registers the _triton ops)


def _fake(hidden, weight, labels, bias, temperature, ignore_index, vocab_start, chunk_size):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return tuple(hidden.new_empty(hidden.shape[0], dtype=dtype) for _ in range(3))


def _fake_backward(
    g_y,
    g_lse,
    g_ent,
    hidden,
    weight,
    labels,
    bias,
    lse,
    ent,
    temperature,
    ignore_index,
    vocab_start,
    chunk_size,
    output_mask,
):
    gh = torch.empty_like(hidden) if output_mask[0] else hidden.new_empty(0)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    gw = torch.empty_like(weight) if output_mask[1] else hidden.new_empty(0, dtype=acc)
    use_b = output_mask[2] and bias is not None
    gb = torch.empty_like(bias) if use_b else hidden.new_empty(0, dtype=acc)
    return gh, gw, gb


register_fake_cpp("linear_logprobs", _fake)
register_fake_cpp("linear_logprobs_backward", _fake_backward)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, *ctx.args = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[1], output[2])


def _make_backward(backward_op):
    def backward(ctx, g_y, g_lse, g_ent):
        hidden, weight, labels, bias, lse, ent = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], bias is not None and need[3]]
        grads = [g if g is not None else torch.zeros_like(lse) for g in (g_y, g_lse, g_ent)]
        gh, gw, gb = backward_op(*grads, hidden, weight, labels, bias, lse, ent, *ctx.args, mask)
        return (
            gh if mask[0] else None,
            gw if mask[1] else None,
            None,
            gb if mask[2] else None,
            None,
            None,
            None,
            None,
        )

    return backward


for _fwd, _bwd in variants("linear_logprobs", "linear_logprobs_backward"):
    torch.library.register_autograd(_fwd, _make_backward(op(_bwd)), setup_context=_setup_context)
