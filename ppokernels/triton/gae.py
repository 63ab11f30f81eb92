"""Triton kernels of the gae family: GAE and discounted returns as a parallel scan.

The recursion is a scan of 2x2 lower-triangular affine maps (see csrc/include/ppokernels/gae.h):
each position t applies ``nv' = P nv + c0``, ``a' = Q nv + D a + c1``. One program owns one row
and walks it in tiles of BLOCK_T positions; inside a tile ``tl.associative_scan`` composes the
maps in parallel, and the state carried between tiles links them. The forward scan runs backwards
in time, so tiles are loaded with reversed offsets and scanned forwards (the combine order of a
forward scan is the documented one). The backward pass is the transposed scan, forwards in time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ppokernels._dtypes import acc_dtype, bool_mask
from ppokernels.triton._common import aot_table, launch

MODES = {"skip": 0, "zero": 1}
MAX_BLOCK_T = 1024  # time tile of rows with T >= 1024


@triton.jit
def _compose(aP, aQ, aD, a0, a1, bP, bQ, bD, b0, b1):
    """b after a (a covers earlier scan positions)."""
    return bP * aP, bQ * aP + bD * aQ, bD * aD, bP * a0 + b0, bQ * a0 + bD * a1 + b1


@triton.jit
def _coeffs(m, gamma, lam, MODE: tl.constexpr):
    """(p, q, d) of positions with mask m in {0, 1} (float)."""
    if MODE == 0:  # skip
        p = 1.0 - m
        q = gamma * m
        d = 1.0 - m + m * gamma * lam
    else:  # zero
        p = m * 0.0
        q = m * 0.0 + gamma
        d = m * 0.0 + gamma * lam
    return p, q, d


@triton.jit
def _scan_tile(P, Q, D, c0, c1, x0, x1):
    """States after each position of a tile, from the incoming state (x0, x1)."""
    sP, sQ, sD, s0, s1 = tl.associative_scan((P, Q, D, c0, c1), 0, _compose)
    return sP * x0 + s0, sQ * x0 + sD * x1 + s1


@triton.jit
def _last(x, k, BLOCK_T: tl.constexpr):
    """x at the last scan position of the tile (the state carried to the next tile)."""
    return tl.sum(tl.where(k == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _gae_fwd_kernel(
    # inputs
    rewards_ptr,  # [R, T] fp32/fp64/bf16/fp16, contiguous rows
    values_ptr,  # [R, T] same dtype (ignored when not HAS_VALUES)
    mask_ptr,  # [R, T] bool
    # outputs
    advantages_ptr,  # [R, T] fp32 (fp64 for fp64 inputs)
    returns_ptr,  # [R, T] same (ignored when not HAS_VALUES)
    # shapes and scalars
    T,
    gamma,
    lam,
    # meta
    MODE: tl.constexpr,  # 0 skip, 1 zero
    HAS_VALUES: tl.constexpr,  # False: discounted returns (values = 0, lam = 1)
    BLOCK_T: tl.constexpr,
):
    # int64 row offset: R * T may exceed 2^31
    row = tl.program_id(0).to(tl.int64) * T
    acc = advantages_ptr.dtype.element_ty
    k = tl.arange(0, BLOCK_T)
    x0 = tl.zeros((), acc)
    x1 = tl.zeros((), acc)
    for start in range(0, T, BLOCK_T):
        t = T - 1 - start - k  # scan position k covers time t (backwards)
        live = t >= 0
        m = tl.load(mask_ptr + row + t, mask=live, other=0).to(acc)
        r = tl.load(rewards_ptr + row + t, mask=live, other=0.0).to(acc)
        if HAS_VALUES:
            v = tl.load(values_ptr + row + t, mask=live, other=0.0).to(acc)
        else:
            v = tl.zeros_like(r)
        p, q, d = _coeffs(m, gamma, lam, MODE)
        valid = m != 0.0  # masked rewards and values are selected away, never multiplied
        c0 = tl.where(valid, v, 0.0)
        c1 = tl.where(valid, r - v, 0.0)
        # positions past the row start are identity maps
        p = tl.where(live, p, 1.0)
        q = tl.where(live, q, 0.0)
        d = tl.where(live, d, 1.0)
        nv, a = _scan_tile(p, q, d, c0, c1, x0, x1)
        tl.store(advantages_ptr + row + t, a, mask=live)
        if HAS_VALUES:
            if MODE == 0:  # skip: returns = advantages + values (all of them, as veRL)
                ret = a + v
            else:  # zero: returns = advantages + masked values
                ret = a + tl.where(valid, v, 0.0)
            tl.store(returns_ptr + row + t, ret, mask=live)
        x0 = _last(nv, k, BLOCK_T)
        x1 = _last(a, k, BLOCK_T)


@triton.jit
def _gae_bwd_kernel(
    # inputs
    grad_advantages_ptr,  # [R, T] fp32/fp64 (ignored when not HAS_VALUES)
    grad_returns_ptr,  # [R, T] fp32/fp64
    mask_ptr,  # [R, T] bool
    # outputs
    grad_rewards_ptr,  # [R, T] dtype of rewards
    grad_values_ptr,  # [R, T] dtype of values (ignored when not HAS_VALUES)
    # shapes and scalars
    T,
    gamma,
    lam,
    # meta
    MODE: tl.constexpr,
    HAS_VALUES: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * T
    acc = grad_returns_ptr.dtype.element_ty
    k = tl.arange(0, BLOCK_T)
    la = tl.zeros((), acc)  # adjoint of the advantage state
    lnv = tl.zeros((), acc)  # adjoint of the next-value state
    for start in range(0, T, BLOCK_T):
        t = start + k
        live = t < T
        m = tl.load(mask_ptr + row + t, mask=live, other=0).to(acc)
        m_prev = tl.load(mask_ptr + row + t - 1, mask=live & (t > 0), other=0).to(acc)
        g_ret = tl.load(grad_returns_ptr + row + t, mask=live, other=0.0)
        g = g_ret
        if HAS_VALUES:
            g += tl.load(grad_advantages_ptr + row + t, mask=live, other=0.0)
        p, q, d = _coeffs(m_prev, gamma, lam, MODE)
        # transposed map in the basis (la, lnv): la' = d la + g, lnv' = q la + p lnv
        d = tl.where(live, d, 1.0)
        q = tl.where(live, q, 0.0)
        p = tl.where(live, p, 1.0)
        g = tl.where(live, g, 0.0)
        a_adj, nv_adj = _scan_tile(d, q, p, g, tl.zeros_like(g), la, lnv)
        tl.store(
            grad_rewards_ptr + row + t, (m * a_adj).to(grad_rewards_ptr.dtype.element_ty), mask=live
        )
        if HAS_VALUES:
            if MODE == 0:  # the returns' upstream gradient reaches every value directly
                dv = m * (nv_adj - a_adj) + g_ret
            else:
                dv = m * (nv_adj - a_adj + g_ret)
            tl.store(grad_values_ptr + row + t, dv.to(grad_values_ptr.dtype.element_ty), mask=live)
        la = _last(a_adj, k, BLOCK_T)
        lnv = _last(nv_adj, k, BLOCK_T)


def _config(T: int) -> dict:
    """Launch table of both scans for rows of length T (read by the launchers and the AOT table):
    the time tile is T rounded up to a power of two, between 16 and MAX_BLOCK_T."""
    block = max(16, min(MAX_BLOCK_T, triton.next_power_of_2(max(T, 1))))
    return dict(BLOCK_T=block, num_warps=4, num_stages=3)


def _launch_fwd(rewards, values, mask, gamma, lam, mode):
    r = rewards.contiguous()
    m = bool_mask(mask).contiguous()
    adv = torch.empty(r.shape, dtype=acc_dtype(r), device=r.device)
    ret = torch.empty_like(adv) if values is not None else adv
    T = r.shape[-1] if r.dim() else 1
    rows = r.numel() // T if T else 0
    if rows:
        v = values.contiguous() if values is not None else r
        launch(_gae_fwd_kernel)[(rows,)](
            r,
            v,
            m,
            adv,
            ret,
            T,
            gamma,
            lam,
            MODE=MODES[mode],
            HAS_VALUES=values is not None,
            **_config(T),
        )
    return adv, ret


def _launch_bwd(grad_advantages, grad_returns, mask, gamma, lam, mode, dtype, has_values):
    acc = acc_dtype(dtype)
    gr = grad_returns.to(acc).contiguous()
    ga = grad_advantages.to(acc).contiguous() if has_values else gr
    m = bool_mask(mask).contiguous()
    grad_r = torch.empty(gr.shape, dtype=dtype, device=gr.device)
    grad_v = torch.empty_like(grad_r) if has_values else grad_r
    T = gr.shape[-1] if gr.dim() else 1
    rows = gr.numel() // T if T else 0
    if rows:
        launch(_gae_bwd_kernel)[(rows,)](
            ga,
            gr,
            m,
            grad_r,
            grad_v,
            T,
            gamma,
            lam,
            MODE=MODES[mode],
            HAS_VALUES=has_values,
            **_config(T),
        )
    return grad_r, grad_v


@triton_op("ppokernels::gae_triton", mutates_args=())
def gae_triton(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(rewards, values, mask, gamma, lam, mode)


@triton_op("ppokernels::gae_backward_triton", mutates_args=())
def gae_backward_triton(
    grad_advantages: torch.Tensor,
    grad_returns: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    mode: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(grad_advantages, grad_returns, mask, gamma, lam, mode, dtype, True)


@triton_op("ppokernels::discounted_returns_triton", mutates_args=())
def discounted_returns_triton(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float, mode: str
) -> torch.Tensor:
    return _launch_fwd(rewards, None, mask, gamma, 1.0, mode)[0]


@triton_op("ppokernels::discounted_returns_backward_triton", mutates_args=())
def discounted_returns_backward_triton(
    grad_returns: torch.Tensor, mask: torch.Tensor, gamma: float, mode: str, dtype: torch.dtype
) -> torch.Tensor:
    return _launch_bwd(grad_returns, grad_returns, mask, gamma, 1.0, mode, dtype, False)[0]


# ------------------------------------------------------------ ahead-of-time compile table
_SCALARS = {"T": "i32", "gamma": "fp32", "lam": "fp32"}
_FWD_SIG = {
    "rewards_ptr": "*T",
    "values_ptr": "*T",
    "mask_ptr": "*i1",
    "advantages_ptr": "*A",
    "returns_ptr": "*A",
    **_SCALARS,
}
_BWD_SIG = {
    "grad_advantages_ptr": "*A",
    "grad_returns_ptr": "*A",
    "mask_ptr": "*i1",
    "grad_rewards_ptr": "*T",
    "grad_values_ptr": "*T",
    **_SCALARS,
}
_VARIANTS = [dict(MODE=m, HAS_VALUES=v) for v in (True, False) for m in MODES.values()]
AOT = aot_table(
    _gae_fwd_kernel, _FWD_SIG, lambda dt: _config(MAX_BLOCK_T), variants=_VARIANTS
) + aot_table(_gae_bwd_kernel, _BWD_SIG, lambda dt: _config(MAX_BLOCK_T), variants=_VARIANTS)
