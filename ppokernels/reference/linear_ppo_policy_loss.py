"""Reference linear_ppo_policy_loss: the lm_head, the log-probs and the policy loss, naively."""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype as _acc
from ppokernels.losses import Clip
from ppokernels.reference.linear_logprobs import linear_logprobs_stats
from ppokernels.reference.ppo_policy_loss import ppo_policy_loss


def linear_ppo_policy_loss(
    hidden,
    weight,
    labels,
    old_logprobs,
    advantages,
    mask,
    *,
    loss=Clip(),
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    with_entropy=False,
    entropy_coef=0.0,
    **policy_options,
):
    """``ppo_policy_loss(lp, old_logprobs, advantages, valid, loss=loss, entropy=ent, ...)`` of
    ``z = (hidden @ weight.T + bias) / temperature``, ``lp = log_softmax(z)[labels]``,
    ``ent = -sum p log p`` (passed when ``with_entropy`` or ``entropy_coef != 0``).

    hidden [B, T, H], weight [V, H], labels [B, T]; a token counts where ``mask`` is set and its
    label is not ``ignore_index`` (``valid``). ``policy_options``: the other keywords of
    :func:`ppokernels.reference.ppo_policy_loss`. Builds the full ``[B, T, V]`` logits and
    differentiates by autograd: the specification the fused op is tested against.
    """
    valid = mask.bool() & (labels != ignore_index)
    y = torch.where(valid, labels.long(), ignore_index)
    label_logit, lse, entropy = linear_logprobs_stats(
        hidden, weight, y, bias=bias, temperature=temperature, ignore_index=ignore_index
    )
    zero = torch.zeros((), dtype=_acc(hidden, weight), device=hidden.device)
    lp = torch.where(valid, (label_logit - lse).view(labels.shape), zero)
    ent = None
    if with_entropy or entropy_coef != 0.0:
        ent = torch.where(valid, entropy.view(labels.shape), zero)
    return ppo_policy_loss(
        lp,
        old_logprobs,
        advantages,
        valid,
        loss=loss,
        entropy=ent,
        entropy_coef=entropy_coef,
        **policy_options,
    )
