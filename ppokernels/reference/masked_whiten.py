"""Reference masked_mean, masked_var and masked_whiten: masked statistics and whitening."""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype as _acc


def _valid(x, mask):
    """(x in the accumulation dtype with masked entries set to 0, mask as bool)."""
    m = mask != 0
    xa = x.to(_acc(x))
    return torch.where(m, xa, torch.zeros_like(xa)), m


def masked_mean(x, mask):
    """sum(x * m) / sum(m) over all entries (NaN when no entry is valid, as torch.mean).

    Masked entries are selected away, so inf/NaN padding does not leak into the result.
    """
    xv, m = _valid(x, mask)
    return xv.sum() / m.sum()


def masked_var(x, mask, *, unbiased=True):
    """sum(m (x - mean)^2) / (n - 1 if unbiased else n), n = sum(m); NaN without enough entries."""
    xv, m = _valid(x, mask)
    n = m.sum()
    mean = xv.sum() / n
    d = n - 1 if unbiased else n
    sq = torch.where(m, (xv - mean).square(), torch.zeros_like(xv)).sum()
    return torch.where(d > 0, sq / d.clamp(min=1), torch.full_like(sq, float("nan")))


def masked_whiten(x, mask, *, shift_mean=True, unbiased=True, eps=1e-8):
    """(x - mean) * rsqrt(var + eps) (+ mean if not shift_mean), statistics over the valid
    entries, every entry transformed (veRL's / TRL's masked_whiten).

    A masked entry holding inf/NaN padding is transformed too (its output is inf/NaN), but it
    does not feed the gradient of the statistics: its output is computed from detached mean and
    rstd, so its g * (x - mean) can never reach (and poison) the valid entries' gradients.
    """
    mean = masked_mean(x, mask)
    r = torch.rsqrt(masked_var(x, mask, unbiased=unbiased) + eps)
    xa = x.to(_acc(x))
    feed = (mask != 0) | torch.isfinite(xa)  # masked_whiten.h feeds_stats_grad
    xs = torch.where(feed, xa, 0.0)  # the branch autograd differentiates is finite
    shift = 0.0 if shift_mean else 1.0
    y = (xs - mean) * r + shift * mean
    y_pad = (xa - mean.detach()) * r.detach() + shift * mean.detach()
    return torch.where(feed, y, y_pad)
