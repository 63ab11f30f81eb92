"""Parity of ppokernels.compat.verl's policy-loss modes and advantage estimators with the
released verl 0.9.1 functions: loss, gradient and metrics dict on multi-turn masks with holes and
right padding, every aggregation, global-batch info, rollout IS weights; advantages with
singleton groups. (tests/compat/test_verl.py covers vanilla, GAE, GRPO, RLOO, REINFORCE++.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ._compat_data import close as _close
from ._compat_data import data as _data
from ._compat_data import error as _error
from ._compat_data import mask as _mask

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")  # the reason names the import error
from omegaconf import OmegaConf  # noqa: E402  (a verl dependency)
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import ppokernels.compat.verl as cv  # noqa: E402
from ppokernels.compat.verl.advantages import ESTIMATORS  # noqa: E402
from ppokernels.compat.verl.policy_losses import POLICY_LOSSES  # noqa: E402
from ppokernels.losses import AGG_MODES  # noqa: E402

AGG = list(AGG_MODES)
INFO = [{}, dict(dp_size=2, batch_num_tokens=71, global_batch_size=11, loss_scale_factor=20)]
# veRL's own functions, captured before any patch() in this process can replace them
VERL = {m: getattr(core_algos, f"compute_policy_loss_{m}") for m in POLICY_LOSSES}
# veRL's PPO clip and REINFORCE++, captured before any patch() likewise
VERL_VANILLA = core_algos.compute_policy_loss_vanilla
VERL_RPP = core_algos.compute_reinforce_plus_plus_outcome_advantage
# bypass_mode needs a rollout_correction config: tests/compat/test_verl_rest.py
MODES = [m for m in POLICY_LOSSES if m != "bypass_mode"]


def _config(info, **kw):
    base = dict(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_low=0.15,
        clip_ratio_high=0.3,
        global_batch_info=dict(info),
    )
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
    torch.manual_seed(0)  # clip_cov's random subset: the same generator state for both
    loss, metrics = fn(old, x, adv, mask, agg, cfg, weights)
    return loss, metrics, torch.autograd.grad(loss, [x])[0]


def _compare(mode, agg, cfg, weights=None, seed=6, spread=0.4, adv_scale=1.0):
    old, lp, adv, mask = _inputs(seed, spread)
    adv = adv * adv_scale
    lw, mw, gw = _run(VERL[mode], old, lp, adv, mask, agg, cfg, weights)
    lo, mo, go = _run(POLICY_LOSSES[mode], old, lp, adv, mask, agg, cfg, weights)
    assert lo.dtype == lw.dtype and lo.dim() == 0
    _close(lo, lw)
    _close(go, gw)
    assert mo.keys() == mw.keys()
    for k in mw:
        assert mo[k] == pytest.approx(mw[k], abs=1e-6), k


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGG)
@pytest.mark.parametrize("info", INFO, ids=["local", "global"])
def test_policy_loss_modes(mode, agg, info):
    kw = dict(policy_loss=PolicyLossConfig(dro_beta=0.3)) if mode == "dro" else {}
    _compare(mode, agg, _config(info, **kw))


@pytest.mark.parametrize("mode", MODES)
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


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("agg", AGG)
def test_covariance_modes_select_tokens(mode, agg):
    """Wide advantages put many tokens in clip_cov's covariance band; ratios of 5-10 % select
    several tokens (veRL's defaults select one)."""
    pl = PolicyLossConfig(clip_cov_ratio=0.1, kl_cov_ratio=0.05, ppo_kl_coef=0.7)
    weights = torch.rand(_mask().shape, generator=torch.Generator().manual_seed(3)) + 0.5
    for w in (None, weights):
        _compare(mode, agg, _config(INFO[1], policy_loss=pl), w, spread=1.0, adv_scale=4.0)


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
PAIRS = np.array([4, 2, 4, 9, 2, 4, 9, 2, 7, 7])  # every group has >= 2 samples (Pass@k)
VERL_ADV = {k: core_algos.get_adv_estimator_fn(k) for k in ESTIMATORS}


def _rewards(B, seed, binary=False):
    """Outcome rewards on the last valid token of multi-turn masks with holes (one sequence
    with a single valid token); binary rewards tie within groups."""
    mask = _mask(B=B, T=11, seed=seed)
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(B, generator=g) < 0.5).float() if binary else torch.randn(B, generator=g)
    last = (mask * torch.arange(1, 12)).argmax(-1)
    r = torch.zeros_like(mask)
    r[torch.arange(B), last] = s
    r[2] += 0.1 * torch.randn(11, generator=g) * mask[2]  # token-level rewards on one row
    return r, mask


def _same(name, *args, **kw):
    want = VERL_ADV[name](*args, **kw)
    got = ESTIMATORS[name](*args, **kw)
    for w, o in zip(want, got, strict=True):
        assert o.dtype == w.dtype and o.shape == w.shape
        _close(o, w)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_group_estimators(binary, norm):
    r, m = _rewards(9, seed=1, binary=binary)
    cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": norm, "gamma": 1.0})
    for eps in (1e-6, 0.1):
        _same("grpo_vectorized", r, m, INDEX, eps, norm, cfg)
        _same("gdpo", r, m, INDEX, eps, norm, cfg)
    for name in ("reinforce_plus_plus_baseline", "rloo_vectorized", "opo", "gpg"):
        _same(name, r, m, INDEX, 1e-6, config=cfg)
    _same("gpg", r, m, INDEX, 1e-6, f_norm=2.0, config=cfg)
    r, m = _rewards(10, seed=2, binary=binary)
    _same("grpo_passk", r, m, PAIRS, 1e-6, config=cfg)


def test_remax():
    r, m = _rewards(9, seed=3)
    baselines = torch.randn(9, generator=torch.Generator().manual_seed(4))
    _same("remax", r, baselines, m, config=OmegaConf.create({}))


def test_gdpo_reward_components():
    r, m = _rewards(9, seed=5)
    g = np.random.default_rng(0)
    att = torch.cat([torch.ones(9, 3), (m.cumsum(-1) > 0).float().flip(-1).cummin(-1)[0]], -1)
    batch = {"prompts": torch.zeros(9, 3), "attention_mask": att.long()}
    extra = {"fmt": g.random(9).tolist(), "acc": (g.random(9) > 0.5).astype(float).tolist()}
    for weights in (None, [0.3, 1.5]):
        cfg = OmegaConf.create({"gdpo_reward_keys": ["fmt", "acc"], "gdpo_reward_weights": weights})
        _same("gdpo", r, m, INDEX, 1e-6, True, cfg, non_tensor_batch=extra, batch=batch)


def test_estimator_refusals_match_verl():
    """What veRL's estimators refuse (Pass@k groups of one, no config, GDPO's reward keys)
    raises veRL's exception type and message."""
    r, m = _rewards(9, seed=6)
    att = torch.ones(9, 3 + m.shape[1], dtype=torch.long)
    batch = {"prompts": torch.zeros(9, 3), "attention_mask": att}
    extra = {"fmt": [0.5] * 9}
    cases = [
        ("grpo_passk", dict(config=OmegaConf.create({}))),
        ("grpo_passk", dict(config=None)),
        ("reinforce_plus_plus", dict(config=None)),
        ("gdpo", dict(config=OmegaConf.create({}), non_tensor_batch=extra, batch=batch)),
        (
            "gdpo",
            dict(
                config=OmegaConf.create({"gdpo_reward_keys": ["fmt", "acc"]}),
                non_tensor_batch=extra,
                batch=batch,
            ),
        ),
    ]
    for name, kw in cases:
        args = (r, m) if name == "reinforce_plus_plus" else (r, m, INDEX)
        ours = ESTIMATORS.get(name) or cv.compute_reinforce_plus_plus_outcome_advantage
        theirs = VERL_ADV.get(name) or VERL_RPP
        want = _error(lambda f=theirs, a=args, k=kw: f(*a, **k))
        assert _error(lambda f=ours, a=args, k=kw: f(*a, **k)) == want, name


def test_patch_installs_every_estimator():
    cv.patch()
    try:
        for name, fn in ESTIMATORS.items():
            assert core_algos.get_adv_estimator_fn(name) is fn
    finally:
        cv.unpatch()
    for name, fn in VERL_ADV.items():
        assert core_algos.get_adv_estimator_fn(name) is fn


REFUSED = [  # (mode, the config's fields veRL refuses; None: no config)
    *[(m, None) for m in ["vanilla", *MODES]],
    ("vanilla", dict(clip_ratio_c=1.0)),
    ("clip_cov", dict(policy_loss=dict(clip_cov_ratio=0.0))),
    ("kl_cov", dict(policy_loss=dict(kl_cov_ratio=-0.1))),
    ("dro", dict(policy_loss=dict(dro_beta=0.0))),
    ("dro", dict(policy_loss=dict(dro_beta=-1.0))),
]


@pytest.mark.parametrize("mode, bad", REFUSED, ids=lambda x: str(x))
def test_refused_configs_raise_verl_own_errors(mode, bad):
    """What veRL's policy losses refuse raises veRL's exception type and message."""
    old, lp, adv, mask = _inputs()
    if bad is None:
        cfg = None
    else:
        bad = dict(bad)
        if "policy_loss" in bad:
            bad["policy_loss"] = PolicyLossConfig(**bad["policy_loss"])
        cfg = _config({}, **bad)
    ours = getattr(cv, f"compute_policy_loss_{mode}")
    theirs = VERL_VANILLA if mode == "vanilla" else VERL[mode]
    want = _error(lambda: theirs(old, lp, adv, mask, "token-mean", cfg))
    assert _error(lambda: ours(old, lp, adv, mask, "token-mean", cfg)) == want
