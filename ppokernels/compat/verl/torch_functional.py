"""veRL 0.9.1 ``verl.utils.torch_functional`` helpers on ppokernels ops (see the package doc)."""

from __future__ import annotations

import torch

import ppokernels as ppk
from ppokernels.compat import float_dtype


def masked_sum(values, mask, axis=None):
    """sum(values * mask) over ``axis``; out-of-mask entries (NaN included) count as 0."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis)


def masked_mean(values, mask, axis=None):
    """``masked_sum / (sum(mask) + 1e-8)`` (0 for an empty mask), as veRL."""
    if axis is not None:
        return masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)
    mean = ppk.masked_mean(values, mask)
    # veRL divides by sum(mask) + 1e-8: an empty mask gives 0, not NaN
    mean = torch.where(mask.sum() > 0, mean, torch.zeros_like(mean))
    return mean.to(float_dtype(values, mask))


def _check_var(mask):
    n = mask.sum()
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")


def masked_var(values, mask, unbiased=True):
    """Variance over the valid entries, Bessel-corrected when ``unbiased`` (raises as veRL)."""
    if unbiased:
        _check_var(mask)
    return ppk.masked_var(values, mask, unbiased=unbiased).to(float_dtype(values, mask))


def masked_whiten(values, mask, shift_mean=True):
    """``(values - mean) * rsqrt(var + 1e-8)`` (+ mean if not ``shift_mean``), unbiased var."""
    _check_var(mask)
    out = ppk.masked_whiten(values, mask, shift_mean=shift_mean, unbiased=True, eps=1e-8)
    return out.to(float_dtype(values, mask))


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """``log_softmax(logits)[labels]`` as float32 (-100 labels give 0), like veRL's flash-attn
    path; ``inplace_backward`` writes the logits gradient into the logits' memory."""
    lp, _ = ppk.token_logprobs(logits, labels, inplace_backward=inplace_backward)
    return lp


def _entropy(logits):
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return ppk.token_logprobs(logits, labels, with_entropy=True)[1]


def entropy_from_logits(logits):
    """Entropy of ``softmax(logits)`` per row, (...), in the logits' dtype (computed in fp32)."""
    return _entropy(logits).to(logits.dtype)


def entropy_from_logits_with_chunking(logits, chunk_size=2048):
    """Entropy per row of 2-D logits as float32 (no chunking needed: no [N, V] temporaries)."""
    return _entropy(logits).float()
