"""Parity of ppokernels.compat.verl's policy-loss modes and advantage estimators with the
released verl 0.9.1 functions: loss, gradient and metrics dict on multi-turn masks with holes and
right padding, every aggregation, global-batch info, rollout IS weights; advantages with
singleton groups. (tests/test_compat_verl.py covers vanilla, GAE, GRPO, RLOO, REINFORCE++.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _compat_data import close as _close
from _compat_data import data as _data
from _compat_data import mask as _mask

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")  # the reason names the import error
from omegaconf import OmegaConf  # noqa: E402  (a verl dependency)
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import ppokernels.compat.verl as cv  # noqa: E402
from ppokernels.compat.verl.policy_losses import POLICY_LOSSES  # noqa: E402

AGG = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
]
INFO = [{}, {"dp_size": 2, "batch_num_tokens": 71, "global_batch_size": 11, "loss_scale_factor": 20}]
# veRL's own functions, captured before any patch() in this process can replace them
VERL = {m: getattr(core_algos, f"compute_policy_loss_{m}") for m in POLICY_LOSSES}


def _config(info, **kw):
    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                clip_ratio_low=0.15, clip_ratio_high=0.3, global_batch_info=dict(info))  # fmt: skip
    base.update(kw)
    return ActorConfig(**base)


def _inputs(seed=6, spread=0.4):
    """Log-probs below 0 (DPPO's binary KL takes log(1 - p)), ratios around the clip range."""
    _, adv, noise, mask = _data(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    old = -(torch.rand(mask.shape, generator=g) * 2.0 + 0.01)
    lp = (old + spread * noise).clamp(max=-1e-3)
    adv[0, :3] = 0.0  # exact zeros: SAPO's and GMPO's sign branches
    return old, lp, adv, mask


def _run(fn, old, lp, adv, mask, agg, cfg, weights):
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(old, x, adv, mask, agg, cfg, weights)
    return loss, metrics, torch.autograd.grad(loss, [x])[0]


def _compare(mode, agg, cfg, weights=None, seed=6, spread=0.4):
    old, lp, adv, mask = _inputs(seed, spread)
    lw, mw, gw = _run(VERL[mode], old, lp, adv, mask, agg, cfg, weights)
    lo, mo, go = _run(POLICY_LOSSES[mode], old, lp, adv, mask, agg, cfg, weights)
    assert lo.dtype == lw.dtype and lo.dim() == 0
    _close(lo, lw)
    _close(go, gw)
    assert mo.keys() == mw.keys()
    for k in mw:
        assert mo[k] == pytest.approx(mw[k], abs=1e-6), k


@pytest.mark.parametrize("mode", list(POLICY_LOSSES))
@pytest.mark.parametrize("agg", AGG)
@pytest.mark.parametrize("info", INFO, ids=["local", "global"])
def test_policy_loss_modes(mode, agg, info):
    kw = dict(policy_loss=PolicyLossConfig(dro_beta=0.3)) if mode == "dro" else {}
    _compare(mode, agg, _config(info, **kw))


@pytest.mark.parametrize("mode", list(POLICY_LOSSES))
def test_policy_loss_modes_is_weights(mode):
    kw = dict(policy_loss=PolicyLossConfig(dro_beta=0.1)) if mode == "dro" else {}
    weights = torch.rand(_mask().shape, generator=torch.Generator().manual_seed(2)) + 0.5
    _compare(mode, "seq-mean-token-mean", _config({}, **kw), weights)


@pytest.mark.parametrize(
    "mode, kw",
    [
        ("sapo", dict(tau_pos=2.0, tau_neg=0.5)),
        ("dppo_tv", dict(clip_ratio_c=1.3, clip_ratio_low=0.02, clip_ratio_high=0.05)),
        ("dppo_kl", dict(clip_ratio_c=1.1, clip_ratio_low=0.01, clip_ratio_high=0.03)),
        ("geo_mean", dict(clip_ratio_low=0.05, clip_ratio_high=0.1)),
        ("gspo", dict(clip_ratio_low=0.01, clip_ratio_high=0.02)),
    ],
)
def test_policy_loss_mode_options(mode, kw):
    """Config fields each mode reads; wide log-ratios (GSPO's clamp at 10, the DPPO cap)."""
    _compare(mode, "token-mean", _config({}, **kw), spread=3.0, seed=3)


def test_dro_needs_beta():
    old, lp, adv, mask = _inputs()
    with pytest.raises(ValueError, match="dro_beta must be a positive value"):
        cv.compute_policy_loss_dro(old, lp, adv, mask, "token-mean", _config({}))


def test_patch_installs_every_mode():
    cv.patch()
    try:
        for mode, fn in POLICY_LOSSES.items():
            assert core_algos.get_policy_loss_fn(mode) is fn
            assert getattr(core_algos, fn.__name__) is fn
    finally:
        cv.unpatch()
    for mode, fn in VERL.items():
        assert core_algos.get_policy_loss_fn(mode) is fn


# ------------------------------------------------------------------------- advantages
INDEX = np.array(["a", "b", "a", "c", "b", "a", "d", "b", "e"], dtype=object)  # c, d, e alone
_ = OmegaConf  # AlgoConfig-like dict configs for the estimators
