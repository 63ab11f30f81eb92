"""Triton kernels of the kl family: per-token KL estimators, forward and backward.

Math as in ``csrc/include/ppokernels/kl_penalty.h``; estimator codes: k1 = 0, k2 = 1, k3 = 2, abs
= 3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels._dtypes import acc_dtype
from ppokernels.losses import KL_ESTIMATORS
from ppokernels.triton._common import aot_table, expm1, expm1_minus_y, launch

ESTIMATORS = {name: code for code, name in enumerate(KL_ESTIMATORS)}  # the EST constexpr
# Launch table (read by the launchers and the AOT table): elementwise, 1024 tokens per program.
CONFIG = dict(BLOCK=1024, num_warps=4, num_stages=3)


@triton.jit
def _k3(x):
    """exp(-x) - 1 + x, from the series shared with the C++ kernels near 0 (no cancellation)."""
    return expm1_minus_y(-x)


@triton.jit
def _value(x, EST: tl.constexpr):
    if EST == 0:
        k = x
    elif EST == 1:
        k = 0.5 * x * x
    elif EST == 2:
        k = _k3(x)
    else:
        k = tl.abs(x)
    return k


@triton.jit
def _kl_penalty_fwd_kernel(
    # inputs
    logprobs_ptr,  # [n] fp32/fp64/bf16/fp16
    ref_logprobs_ptr,  # [n] same dtype
    # outputs
    out_ptr,  # [n] fp32 (fp64 for fp64 inputs)
    # shapes and scalars
    n,
    clamp,  # output clamp, used when HAS_CLAMP
    # meta
    EST: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 before the multiply: n may exceed 2^31
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    acc = out_ptr.dtype.element_ty
    a = tl.load(logprobs_ptr + offs, mask=valid, other=0.0).to(acc)
    b = tl.load(ref_logprobs_ptr + offs, mask=valid, other=0.0).to(acc)
    k = _value(a - b, EST)
    if HAS_CLAMP:
        k = tl.minimum(tl.maximum(k, -clamp), clamp)
    tl.store(out_ptr + offs, k, mask=valid)


@triton.jit
def _kl_penalty_bwd_kernel(
    # inputs
    grad_ptr,  # [n] fp32/fp64, upstream gradient of the estimator
    logprobs_ptr,  # [n]
    ref_logprobs_ptr,  # [n]
    # outputs
    grad_logprobs_ptr,  # [n] dtype of logprobs
    # shapes and scalars
    n,
    clamp,
    # meta
    EST: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    acc = grad_ptr.dtype.element_ty
    a = tl.load(logprobs_ptr + offs, mask=valid, other=0.0).to(acc)
    b = tl.load(ref_logprobs_ptr + offs, mask=valid, other=0.0).to(acc)
    g = tl.load(grad_ptr + offs, mask=valid, other=0.0)
    x = a - b
    if STRAIGHT_THROUGH:  # value of the named estimator, gradient of k2
        d = x
    else:
        if EST == 0:
            d = tl.full(x.shape, 1.0, acc)
        elif EST == 1:
            d = x
        elif EST == 2:
            d = -expm1(-x)
        else:
            d = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(acc)
        if HAS_CLAMP:  # clamped values pass no gradient (the boundary itself does, as torch.clamp)
            k = _value(x, EST)
            d = tl.where((k < -clamp) | (k > clamp), 0.0, d)
    tl.store(grad_logprobs_ptr + offs, (g * d).to(grad_logprobs_ptr.dtype.element_ty), mask=valid)


def _parse(estimator: str) -> tuple[int, bool]:
    st = estimator.endswith("+")
    name = estimator[:-1] if st else estimator
    if name not in ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown estimator {estimator!r}")
    return ESTIMATORS[name], st


def _launch(kernel, tensors, n: int, clamp: float | None, **switches) -> None:
    """One program per BLOCK elements over ``n`` elements: ``kernel(*tensors, n, clamp, ...)``
    (nothing to launch for n = 0)."""
    if n > 0:
        grid = (triton.cdiv(n, CONFIG["BLOCK"]),)
        launch(kernel)[grid](
            *tensors,
            n,
            clamp if clamp is not None else 0.0,
            HAS_CLAMP=clamp is not None,
            **switches,
            **CONFIG,
        )


@triton_op("ppokernels::kl_penalty_triton", mutates_args=())
def kl_penalty_triton(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp: float | None
) -> torch.Tensor:
    est, _ = _parse(estimator)
    lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
    out = torch.empty(lp.shape, dtype=acc_dtype(lp), device=lp.device)
    _launch(_kl_penalty_fwd_kernel, (lp, ref, out), lp.numel(), clamp, EST=est)
    return out


@triton_op("ppokernels::kl_penalty_backward_triton", mutates_args=())
def kl_penalty_backward_triton(
    grad: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    clamp: float | None,
) -> torch.Tensor:
    est, st = _parse(estimator)
    lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
    g = grad.to(acc_dtype(lp)).contiguous()
    grad_lp = torch.empty_like(lp)
    _launch(
        _kl_penalty_bwd_kernel,
        (g, lp, ref, grad_lp),
        lp.numel(),
        clamp,
        EST=est,
        STRAIGHT_THROUGH=st,
    )
    return grad_lp


# ------------------------------------------------------------ ahead-of-time compile table
_SIG = {
    "logprobs_ptr": "*T",
    "ref_logprobs_ptr": "*T",
    "out_ptr": "*A",
    "n": "i64",
    "clamp": "fp32",
}
_BWD_SIG = {
    "grad_ptr": "*A",
    "logprobs_ptr": "*T",
    "ref_logprobs_ptr": "*T",
    "grad_logprobs_ptr": "*T",
    "n": "i64",
    "clamp": "fp32",
}
AOT = aot_table(
    _kl_penalty_fwd_kernel,
    _SIG,
    lambda dt: CONFIG,
    variants=[dict(EST=e, HAS_CLAMP=True) for e in range(4)],
) + aot_table(
    _kl_penalty_bwd_kernel,
    _BWD_SIG,
    lambda dt: CONFIG,
    variants=[
        dict(EST=e, HAS_CLAMP=True, STRAIGHT_THROUGH=st) for st in (False, True) for e in range(4)
    ],
)
