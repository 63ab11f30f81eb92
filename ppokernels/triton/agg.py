"""The aggregation in Triton, shared by the policy and the value loss kernels (as agg.h; the
vocabulary: ppokernels.losses.AGG_MODES; the specification: ppokernels/reference/agg.py), and
the launch table both losses' kernels use."""

from __future__ import annotations

import triton
import triton.language as tl

from ppokernels.losses import AGG_MODES

AGG = {name: code for code, name in enumerate(AGG_MODES)}  # the AGG constexpr
# Launch table of both losses' kernels (read by the launchers and the AOT tables): the row and
# backward kernels step over BLOCK tokens, the finalize kernels over BLOCK_B rows (both fixed, so
# the reduction order never depends on the batch).
ROW_CONFIG = dict(BLOCK=1024, num_warps=4, num_stages=3)
FINALIZE_CONFIG = dict(BLOCK_B=256, num_warps=4, num_stages=3)


@triton.jit
def _agg_scale(n_row, n_total, num_tokens, num_seqs, rows, width, AGG: tl.constexpr):
    """Weight of each valid token of a row (agg.h agg_row_scale); 0 for empty rows."""
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
