"""Per-token math shared by the Triton kernels of the ppo_loss family (as ppo_loss.h)."""

from __future__ import annotations

import triton
import triton.language as tl

from ppokernels.triton._common import expm1
from ppokernels.triton.kl import _value as _kl_value

AGG = {
    "token-mean": 0,
    "token-sum": 1,
    "seq-mean-token-mean": 2,
    "seq-mean-token-sum": 3,
    "seq-mean-token-sum-norm": 4,
}
# Launch table of the ppo_loss kernels (read by the launchers and the AOT tables): the row and
# backward kernels step over BLOCK tokens, the finalize kernels over BLOCK_B rows (both fixed, so
# the reduction order never depends on the batch).
ROW_CONFIG = dict(BLOCK=1024, num_warps=4, num_stages=3)
FINALIZE_CONFIG = dict(BLOCK_B=256, num_warps=4, num_stages=3)
K = 8  # per-row partials: n, loss, kl, entropy, clipped, -logratio, dual, (pad)


@triton.jit
def _surrogate(ratio, adv, clip_low, clip_high, dual, HAS_DUAL: tl.constexpr):
    """Clipped surrogate of one token: (L, dL/dratio, clipped flag, dual-clip flag)."""
    neg = -adv
    l1 = neg * ratio
    l2 = neg * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = l2 > l1
    loss = tl.maximum(l1, l2)
    d = tl.where(clipped, 0.0, neg)
    if HAS_DUAL:
        l3 = neg * dual
        active = (adv < 0) & (loss > l3)
        loss = tl.where(active, l3, loss)
        d = tl.where(active, 0.0, d)
    else:
        active = clipped & (adv != adv)  # all false (adv is finite on valid tokens)
    return loss, d, clipped, active


@triton.jit
def _kl_grad(x, clamp, EST: tl.constexpr, HAS_CLAMP: tl.constexpr, ST: tl.constexpr):
    """d KL / d logprobs, as kl.h's kl_grad."""
    if ST:
        d = x
    else:
        if EST == 0:
            d = x * 0.0 + 1.0
        elif EST == 1:
            d = x
        elif EST == 2:
            d = -expm1(-x)
        else:
            d = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)
        if HAS_CLAMP:
            k = _kl_value(x, EST)
            d = tl.where((k < -clamp) | (k > clamp), 0.0, d)
    return d


@triton.jit
def _agg_scale(n_row, n_total, num_tokens, num_seqs, rows, width, AGG: tl.constexpr):
    """Weight of each valid token of a row (ppo_loss.h agg_row_scale); 0 for empty rows."""
    seqs = tl.where(num_seqs > 0, num_seqs, rows * 1.0)
    if AGG == 0:
        d = tl.where(num_tokens > 0, num_tokens, n_total) + n_row * 0.0
        w = tl.where(d > 0, 1.0 / tl.maximum(d, 1e-30), 0.0)
    elif AGG == 1:
        w = n_row * 0.0 + 1.0
    elif AGG == 2:
        w = tl.where(n_row > 0, 1.0 / tl.maximum(n_row * seqs, 1e-30), 0.0)
    elif AGG == 3:
        w = tl.where(n_row * 0.0 + seqs > 0, 1.0 / tl.maximum(seqs, 1e-30), 0.0)
    else:  # seqs or width (T) may be 0: an empty batch weighs 0, not 1 / 0
        d = n_row * 0.0 + seqs * width
        w = tl.where(d > 0, 1.0 / tl.maximum(d, 1e-30), 0.0)
    return w
