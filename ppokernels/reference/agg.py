"""Reference aggregation of a per-token loss into a scalar, shared by the policy and the value loss
(the C++ twin: csrc/include/ppokernels/agg.h; the vocabulary: ppokernels.losses.AGG_MODES)."""

from __future__ import annotations

import torch


def agg_loss(values, mask, agg="token-mean", *, num_tokens=None, num_seqs=None):
    """Aggregates a [B, T] per-token loss over the valid tokens (veRL's agg_loss).

    token-mean: sum / (num_tokens or number of valid tokens); token-sum: sum;
    seq-mean-token-mean: sum over rows with a valid token of the row's masked mean / (num_seqs or
    B); seq-mean-token-sum: sum of row sums / (num_seqs or B); seq-mean-token-sum-norm: that / T.
    No valid token gives 0.
    """
    m = mask.bool()
    x = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    rows, width = x.shape
    seqs = num_seqs if num_seqs is not None else max(rows, 1)
    if agg == "token-mean":
        d = m.sum().to(x.dtype) if num_tokens is None else num_tokens
        return x.sum() / (d.clamp(min=1) if num_tokens is None else d)
    if agg == "token-sum":
        return x.sum()
    row_sum = x.sum(-1)
    if agg == "seq-mean-token-mean":
        return (row_sum / m.sum(-1).clamp(min=1).to(x.dtype)).sum() / seqs
    if agg == "seq-mean-token-sum":
        return row_sum.sum() / seqs
    if agg == "seq-mean-token-sum-norm":
        return row_sum.sum() / (seqs * max(width, 1))
    raise ValueError(f"agg_loss: unknown agg {agg!r}")


def metric_mean(x, mask):
    """Mean of x over the valid tokens, 0 when there is none: the losses' metrics (clipfrac,
    approx_kl), which are token means whatever the loss's aggregation. (Not the op
    ``masked_mean``, whose empty mean is NaN as torch.mean's.)"""
    m = mask.bool()
    return torch.where(m, x, 0).sum() / m.sum().clamp(min=1)
