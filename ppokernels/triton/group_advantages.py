"""Triton kernels of group_advantages: group baselines (GRPO, Dr.GRPO, RLOO).

Math as in ``csrc/include/ppokernels/masked_whiten.h`` (estimator codes: grpo = 0, rloo = 1). One
program per group scans the batch: pass 1 counts the members and sums their scores (and the
upstream gradient), pass 2 sums the centred squares (and g (s - mean)), pass 3 writes the members'
outputs. Every sum is a fixed-order lane accumulation plus tl.sum's fixed tree, so results are
deterministic; the cost is O(B x G) loads, a few microseconds at RL batch sizes (B <= 64k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels._dtypes import acc_dtype
from ppokernels.triton._common import aot_table, launch

ESTIMATORS = {"grpo": 0, "rloo": 1}
# Launch table (read by the launcher and the AOT table); BLOCK fixes the summation order.
CONFIG = dict(BLOCK=1024, num_warps=4, num_stages=3)


@triton.jit
def _group_advantages_group_kernel(
    # inputs
    scores_ptr,  # [B] fp32/fp64/bf16/fp16
    ids_ptr,  # [B] int64 dense group ids in [0, G)
    g_ptr,  # [B] fp32 (fp64 for fp64 scores) upstream gradient, read when BACKWARD
    # outputs
    out_ptr,  # [B] advantages (acc dtype) or, when BACKWARD, d scores (dtype of scores)
    # shapes and scalars
    B,
    eps,
    # meta
    EST: tl.constexpr,
    NORM_BY_STD: tl.constexpr,
    BACKWARD: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc: tl.constexpr = tl.float64 if F64 else tl.float32
    gid = tl.program_id(0).to(tl.int64)
    c = tl.zeros([BLOCK], acc)
    s1 = tl.zeros([BLOCK], acc)
    sg = tl.zeros([BLOCK], acc)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        sel = tl.load(ids_ptr + offs, mask=offs < B, other=-1) == gid
        s = tl.load(scores_ptr + offs, mask=sel, other=0.0).to(acc)
        c += tl.where(sel, 1.0, 0.0)
        s1 += s
        if BACKWARD:
            sg += tl.load(g_ptr + offs, mask=sel, other=0.0).to(acc)
    n = tl.sum(c, axis=0)
    mean = tl.sum(s1, axis=0) / n
    sq = tl.zeros([BLOCK], acc)
    sgd = tl.zeros([BLOCK], acc)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        sel = tl.load(ids_ptr + offs, mask=offs < B, other=-1) == gid
        d = tl.where(sel, tl.load(scores_ptr + offs, mask=sel, other=0.0).to(acc) - mean, 0.0)
        sq += d * d
        if BACKWARD:
            sgd += tl.load(g_ptr + offs, mask=sel, other=0.0).to(acc) * d
    single = n <= 1.0
    sigma = tl.where(single, 1.0, tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(n - 1.0, 1.0)))
    center = tl.where(single, 0.0, mean)
    if EST == 1:  # rloo: n / (n - 1); a singleton keeps its score
        scale = tl.where(single, 1.0, n / tl.maximum(n - 1.0, 1.0))
    elif NORM_BY_STD:  # grpo: singletons have std 1
        scale = 1.0 / (sigma + eps)
    else:  # Dr.GRPO
        scale = tl.full([], 1.0, acc)
    coef_g = tl.where(single, 0.0, scale * tl.sum(sg, axis=0) / n)
    coef_h = tl.zeros([], acc)
    if EST == 0 and NORM_BY_STD:  # d sigma, 0 at sigma = 0 (a subgradient)
        flat = single | (sigma == 0.0)
        den = tl.where(flat, 1.0, (n - 1.0) * sigma)
        coef_h = tl.where(flat, 0.0, scale * scale * tl.sum(sgd, axis=0) / den)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        sel = tl.load(ids_ptr + offs, mask=offs < B, other=-1) == gid
        s = tl.load(scores_ptr + offs, mask=sel, other=0.0).to(acc)
        if BACKWARD:
            g = tl.load(g_ptr + offs, mask=sel, other=0.0).to(acc)
            y = scale * g - coef_g - coef_h * (s - mean)
        else:
            y = (s - center) * scale
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=sel)


def _launch(scores, ids, g, out, num_groups, estimator, eps, norm_by_std, backward):
    if estimator not in ESTIMATORS:
        raise ValueError(f"group_advantages: unknown estimator {estimator!r}")
    if num_groups > 0 and scores.numel() > 0:
        launch(_group_advantages_group_kernel)[(num_groups,)](
            scores,
            ids,
            g if g is not None else scores,
            out,
            scores.numel(),
            eps,
            EST=ESTIMATORS[estimator],
            NORM_BY_STD=norm_by_std,
            BACKWARD=backward,
            F64=scores.dtype == torch.float64,
            **CONFIG,
        )
    return out


@triton_op("ppokernels::group_advantages_triton", mutates_args=())
def group_advantages_triton(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    estimator: str,
    eps: float,
    norm_by_std: bool,
) -> torch.Tensor:
    s = scores.contiguous()
    out = torch.empty(s.shape, dtype=acc_dtype(s), device=s.device)
    ids = group_ids.contiguous()
    return _launch(s, ids, None, out, num_groups, estimator, eps, norm_by_std, False)


@triton_op("ppokernels::group_advantages_backward_triton", mutates_args=())
def group_advantages_backward_triton(
    grad: torch.Tensor,
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    estimator: str,
    eps: float,
    norm_by_std: bool,
) -> torch.Tensor:
    s = scores.contiguous()
    g = grad.to(acc_dtype(s)).contiguous()
    out = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    ids = group_ids.contiguous()
    return _launch(s, ids, g, out, num_groups, estimator, eps, norm_by_std, True)


# ------------------------------------------------------------ ahead-of-time compile table
# forward: out in the accumulator dtype; backward: out (d scores) in the dtype of the scores
_SIG = {"scores_ptr": "*T", "ids_ptr": "*i64", "g_ptr": "*A", "B": "i64", "eps": "fp32"}
_F64 = lambda dt: dt == "fp64"  # noqa: E731
_VARIANTS = [
    dict(EST=0, NORM_BY_STD=True),
    dict(EST=0, NORM_BY_STD=False),
    dict(EST=1, NORM_BY_STD=True),
]
AOT = aot_table(
    _group_advantages_group_kernel,
    {**_SIG, "out_ptr": "*A"},
    lambda dt: CONFIG,
    variants=[dict(v, BACKWARD=False, F64=_F64) for v in _VARIANTS],
) + aot_table(
    _group_advantages_group_kernel,
    {**_SIG, "out_ptr": "*T"},
    lambda dt: CONFIG,
    variants=[dict(v, BACKWARD=True, F64=_F64) for v in _VARIANTS],
)
