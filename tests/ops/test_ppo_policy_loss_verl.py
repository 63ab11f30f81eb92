"""ppo_policy_loss against veRL 0.9.1's vanilla policy loss and agg_loss, written out as scalar
loops (no veRL import: the formula itself; tests/compat/test_verl.py runs the real package)."""

import math

import pytest
import torch

import ppokernels

from .test_ppo_policy_loss import AGGS, CLIPS, _policy_inputs


def _verl_policy(lp, old, adv, mask, agg, clip_low, clip_high, dual_clip):
    """veRL 0.9.1's compute_policy_loss_vanilla + agg_loss (trainer/ppo/core_algos.py), as loops."""
    B, T = lp.shape
    per_tok = torch.zeros(B, T, dtype=torch.float64)
    clipped = dual_n = nlr = 0.0
    n = 0
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            d = max(min(float(lp[i, t] - old[i, t]), 20.0), -20.0)
            r, a = math.exp(d), float(adv[i, t])
            l1, l2 = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
            lc = max(l1, l2)
            loss = lc
            if dual_clip is not None and a < 0:
                loss = min(lc, -a * dual_clip)
                dual_n += lc > -a * dual_clip
            per_tok[i, t] = loss
            clipped += l2 > l1
            nlr -= d
            n += 1
    m = mask.double()
    if agg == "token-mean":
        total = (per_tok * m).sum() / m.sum()
    elif agg == "token-sum":
        total = (per_tok * m).sum()
    else:
        rows = []
        for i in range(B):
            s = (per_tok[i] * m[i]).sum()
            if agg == "seq-mean-token-mean":
                s = s / (m[i].sum() + 1e-8)
            rows.append(s * (m[i].sum() > 0))
        total = sum(rows) / B
        if agg == "seq-mean-token-sum-norm":
            total = total / T
    return float(total), clipped / n, nlr / n, dual_n / n


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", list(CLIPS))
def test_matches_verl_formulas(agg, clip):
    lp, old, adv, mask = _policy_inputs(4, 23, torch.float64, "cpu", garbage=False)
    spec = CLIPS[clip]["loss"]
    out = ppokernels.ppo_policy_loss(lp, old, adv, mask, agg=agg, loss=spec)
    loss, clipfrac, approx_kl, dual = _verl_policy(
        lp, old, adv, mask, agg, spec.clip_low, spec.clip_high, spec.dual_clip
    )
    assert math.isclose(out.loss.item(), loss, rel_tol=1e-7, abs_tol=1e-9)
    assert math.isclose(out.clipfrac.item(), clipfrac, rel_tol=1e-9)
    assert math.isclose(out.approx_kl.item(), approx_kl, rel_tol=1e-9)
    assert math.isclose(out.dual_clipfrac.item(), dual, rel_tol=1e-9, abs_tol=1e-12)
