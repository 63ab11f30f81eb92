"""Reference linear_logprobs: log-probs and entropy from hidden states and the lm_head weight."""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype as _acc


def linear_logprobs_stats(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    vocab_start=0,
    cache_bytes=0,
):
    """Per-row ``(label_logit, lse, entropy)`` of ``z = (hidden @ weight.T + bias) / temperature``
    over the vocabulary shard ``[vocab_start, vocab_start + V)`` held by ``weight [V, H]``.

    ``label_logit`` is 0 where the label lies outside the shard; rows labelled ``ignore_index``
    give zeros. Materialises the ``[N, V]`` logits (this is the specification, not a kernel), so
    autograd keeps what its backward needs whatever ``cache_bytes`` says: the kernels' logits
    cache budget is accepted for the same signature and changes no number.
    """
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"linear_logprobs: cache_bytes must be an int >= 0, got {cache_bytes!r}")
    dtype = _acc(hidden, weight)
    z = hidden.reshape(-1, hidden.shape[-1]).to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z / temperature
    y = labels.reshape(-1).long()
    valid = y != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    # p * z with p = 0 at a -inf logit (a masked vocabulary entry) counts 0, not 0 * -inf
    entropy = lse - (p * torch.where(p > 0, z, 0.0)).sum(-1)
    local = y - vocab_start
    owned = valid & (local >= 0) & (local < weight.shape[0])
    label_logit = z.gather(1, torch.where(owned, local, 0)[:, None]).squeeze(1)
    zero = torch.zeros_like(lse)
    return (
        torch.where(owned, label_logit, zero),
        torch.where(valid, lse, zero),
        torch.where(valid, entropy, zero),
    )


def linear_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    with_entropy=False,
    ignore_index=-100,
    cache_bytes=0,
):
    """``(logprobs, entropy or None)`` of ``labels`` under ``softmax((hidden @ weight.T + bias) /
    temperature)``, shape of ``labels``; 0 where ``labels == ignore_index``. ``cache_bytes``: see
    :func:`linear_logprobs_stats` (accepted, no effect on the numbers)."""
    label_logit, lse, entropy = linear_logprobs_stats(
        hidden,
        weight,
        labels,
        bias=bias,
        temperature=temperature,
        ignore_index=ignore_index,
        cache_bytes=cache_bytes,
    )
    logprobs = (label_logit - lse).view(labels.shape)
    return logprobs, entropy.view(labels.shape) if with_entropy else None
