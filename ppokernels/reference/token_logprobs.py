"""Reference token_logprobs: log-probs and entropy from logits."""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype as _acc


def token_logprobs(logits, labels, *, temperature=1.0, with_entropy=False, ignore_index=-100):
    """Log-prob of each label and (optionally) the entropy of each row's softmax.

    With z = logits / temperature (the temperature applies to log-probs and entropy alike):
    ``logprobs = log_softmax(z)[label]``, ``entropy = -sum_j p_j log p_j``, p = softmax(z).
    Tokens whose label is ``ignore_index`` give 0 for both and get no gradient.

    Args:
        logits: (..., V) float logits. labels: (...) integer token ids.

    Returns:
        ``(logprobs, entropy or None)``, each (...) float32 (float64 for float64 logits).
    """
    z = logits.to(_acc(logits)) / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    index = torch.where(valid, labels, 0).long().unsqueeze(-1)
    logprobs = torch.where(valid, logp.gather(-1, index).squeeze(-1), 0.0)
    entropy = None
    if with_entropy:
        p = logp.exp()
        # p log p = 0 where p = 0 (e.g. -inf logits), instead of 0 * -inf = NaN
        entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
        entropy = torch.where(valid, entropy, 0.0)
    return logprobs, entropy
