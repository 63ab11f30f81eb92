"""Reference value_loss: the clipped value loss (veRL compute_value_loss, OpenRLHF ValueLoss)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppokernels._dtypes import acc_dtype as _acc
from ppokernels.reference._clamp import clamp
from ppokernels.reference.agg import agg_loss, metric_mean


class ValueLossOutput(NamedTuple):
    """Result of ``value_loss``: the loss (0-d, differentiable) and the detached clip fraction."""

    loss: torch.Tensor
    clipfrac: torch.Tensor


def value_loss(
    values,
    old_values,
    returns,
    mask,
    *,
    clip=None,
    agg="token-mean",
    num_tokens=None,
    num_seqs=None,
):
    """Clipped value loss (veRL compute_value_loss, OpenRLHF ValueLoss).

    vc = clip(v, v_old - clip, v_old + clip); per token 0.5 max((v - R)^2, (vc - R)^2) (plain
    0.5 (v - R)^2 without clip), aggregated by :func:`agg_loss`; clipfrac = masked mean of
    ((vc - R)^2 > (v - R)^2).
    """
    dtype = _acc(values, old_values)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v, vo, ret = (torch.where(m, x.to(dtype), zero) for x in (values, old_values, returns))
    err = (v - ret).square()
    clipped = torch.zeros_like(m)
    loss = err
    if clip is not None:
        vc = clamp(v, vo - clip, vo + clip)
        errc = (vc - ret).square()
        clipped = errc > err
        loss = torch.maximum(err, errc)
    return ValueLossOutput(
        loss=0.5 * agg_loss(loss, m, agg, num_tokens=num_tokens, num_seqs=num_seqs),
        clipfrac=metric_mean(clipped.to(dtype), m).detach(),
    )
