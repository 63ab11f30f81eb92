"""Vocabulary-parallel (tensor-parallel) glue of linear_logprobs.

Rank r of ``process_group`` holds rows ``[v0, v1)`` of the lm_head weight (ranks in order, as
Megatron's vocab-parallel embedding). Each rank computes per-row partial statistics over its shard:
the label logit (0 unless the rank owns the label), ``lse_r`` and the shard entropy ``H_r``. They
are all-gathered and merged in the same fixed rank order on every rank:

    lse = logsumexp_r lse_r,   w_r = exp(lse_r - lse),   H = sum_r w_r (H_r + lse - lse_r)

(the entropy of a mixture: every term is >= 0, so nothing cancels). Autograd: the loss is
replicated on every rank, so the gathered tensor carries only the local slot's graph and the
shard's gradients come out exact; ``grad_hidden`` is summed over ranks by a hook (Megatron's
"copy to tensor-parallel region").
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_range(weight: torch.Tensor, group) -> tuple[int, int]:
    """``(vocab_start, vocab_total)`` of this rank's shard."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([weight.shape[0]], dtype=torch.int64), group=group)
    rank = dist.get_rank(group)
    sizes = [int(s) for s in sizes]
    return sum(sizes[:rank]), sum(sizes)


def _all_reduce(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def reduce_grad_hidden(hidden: torch.Tensor, group) -> torch.Tensor:
    """``hidden`` unchanged; its gradient is summed over the ranks of ``group``."""
    if not hidden.requires_grad:
        return hidden
    out = hidden.view_as(hidden)
    out.register_hook(lambda g: _all_reduce(g, group))
    return out


def combine(label_logit, lse, entropy, valid, group):
    """Global ``(label_logit, lse, entropy)`` per row from every rank's shard statistics."""
    local = torch.stack([label_logit, lse, entropy])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = local  # only the local slot carries this rank's graph
    g = torch.stack(parts)  # [ranks, 3, N]
    lse_r, ent_r = g[:, 1], g[:, 2]
    lse_all = torch.logsumexp(lse_r, dim=0)
    w = torch.exp(lse_r - lse_all)
    ent_all = (w * (ent_r + (lse_all - lse_r))).sum(0)
    zero = torch.zeros_like(lse_all)
    return (
        torch.where(valid, g[:, 0].sum(0), zero),
        torch.where(valid, lse_all, zero),
        torch.where(valid, ent_all, zero),
    )
