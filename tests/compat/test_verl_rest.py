"""Parity of ppokernels.compat.verl's bypass_mode policy loss and optimal-token-baseline advantage
estimators with the released verl 0.9.1 functions (issue 17): multi-turn masks with holes, right
padding, an empty sample, singleton groups, every aggregation and global-batch info; loss,
gradient and metrics dict, advantages and returns. (tests/compat/test_verl_modes.py covers the
other modes and estimators.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ._compat_data import data as _data
from ._compat_data import mask as _mask

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")  # the reason names the import error
from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import ppokernels.compat.verl as cv  # noqa: E402
from ppokernels.losses import AGG_MODES  # noqa: E402

AGG = list(AGG_MODES)
INFO = [{}, dict(dp_size=2, batch_num_tokens=71, global_batch_size=11, loss_scale_factor=20)]
# veRL's own functions, captured before any patch() in this process can replace them
VERL_BYPASS = core_algos.compute_policy_loss_bypass_mode
VERL_OTB = core_algos.compute_optimal_token_baseline_advantage
VERL_TIR = core_algos.compute_multi_turn_optimal_token_baseline_advantage


def _close(got, want):
    """fp32 rounding: torch's default fp32 tolerances (rtol 1.3e-6, atol 1e-5)."""
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------- bypass_mode
# (rollout_is, rollout_is_threshold, rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold)
CORRECTIONS = {
    "token_tis": ("token", 1.4, False, None, None),
    "seq_tis_norm": ("sequence", 3.0, True, None, None),
    "token_icepop_rs": ("token", "0.7_1.5", False, "token_k1,seq_mean_k3", "0.6_1.8,0.08"),
    "rs_only": (None, 2.0, False, "seq_max_k2,seq_sum_k1", "0.3,0.4_2.5"),
    "seq_norm_rs": ("sequence", 5.0, True, "token_k3", 0.2),
}


def _config(info, loss_type, correction="token_tis", **kw):
    rollout_is, thr, norm, rs, rs_thr = CORRECTIONS[correction]
    rc = RolloutCorrectionConfig(
        rollout_is=rollout_is,
        rollout_is_threshold=thr,
        rollout_is_batch_normalize=norm,
        rollout_rs=rs,
        rollout_rs_threshold=rs_thr,
        bypass_mode=True,
        loss_type=loss_type,
    )
    pl = PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc)
    base = dict(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_low=0.15,
        clip_ratio_high=0.3,
        global_batch_info=dict(info),
        policy_loss=pl,
    )
    base.update(kw)
    return ActorConfig(**base)


def _inputs(seed=6, spread=0.4):
    """Rollout log-probs and current ones around them (ratios on both sides of the IS and RS
    thresholds), advantages with exact zeros, garbage (finite) at masked positions."""
    _, adv, noise, mask = _data(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    old = -(torch.rand(mask.shape, generator=g) * 2.0 + 0.01)
    lp = old + spread * noise
    adv[0, :3] = 0.0
    old = torch.where(mask.bool(), old, 7.0)
    return old, lp, adv, mask


def _run(fn, old, lp, adv, mask, agg, cfg, weights=None):
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(old, x, adv, mask, agg, cfg, weights)
    return loss, metrics, torch.autograd.grad(loss, [x])[0]


def _compare(agg, cfg, weights=None, seed=6, spread=0.4):
    old, lp, adv, mask = _inputs(seed, spread)
    lw, mw, gw = _run(VERL_BYPASS, old, lp, adv, mask, agg, cfg, weights)
    lo, mo, go = _run(cv.compute_policy_loss_bypass_mode, old, lp, adv, mask, agg, cfg, weights)
    assert lo.dtype == lw.dtype and lo.dim() == 0
    _close(lo, lw)
    _close(go, gw)
    assert list(mo) == list(mw)  # the same keys in the same order
    for k in mw:
        assert mo[k] == pytest.approx(mw[k], rel=1e-6, abs=1e-6), k
    return mw


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("agg", AGG)
@pytest.mark.parametrize("info", INFO, ids=["local", "global"])
def test_bypass_mode(loss_type, agg, info):
    _compare(agg, _config(info, loss_type))


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("correction", list(CORRECTIONS))
def test_bypass_mode_corrections(loss_type, correction):
    """Token/sequence IS, truncation and IcePop, batch normalisation, chained rejection
    sampling; the rejections really drop tokens or whole sequences, and a passed
    rollout_is_weights is ignored by both."""
    weights = torch.rand(_mask().shape, generator=torch.Generator().manual_seed(2)) + 0.5
    for agg in ("token-mean", "seq-mean-token-mean"):
        metrics = _compare(agg, _config(INFO[1], loss_type, correction), weights, spread=0.6)
        if CORRECTIONS[correction][3] is not None:
            assert 0.0 < metrics["rollout_corr/rollout_rs_masked_fraction"] < 1.0


def test_bypass_mode_wide_ratios():
    """Log-ratios beyond veRL's +-20 clamp of vanilla; dual clip (clip_ratio_c) active."""
    for loss_type in ("ppo_clip", "reinforce"):
        cfg = _config({}, loss_type, "seq_tis_norm", clip_ratio_c=1.5)
        _compare("token-mean", cfg, spread=12.0, seed=3)


def test_bypass_mode_errors():
    old, lp, adv, mask = _inputs()
    cfg = _config({}, "ppo_clip")
    cfg_none = _config({}, "ppo_clip", policy_loss=PolicyLossConfig(rollout_correction=None))
    for bad in (cfg_none, _config({}, "dpo"), None):  # veRL's type and message, exactly
        errors = []
        for fn in (VERL_BYPASS, cv.compute_policy_loss_bypass_mode):
            with pytest.raises((ValueError, AssertionError)) as e:
                fn(old, lp, adv, mask, "token-mean", bad)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1]
    with pytest.raises(AssertionError, match="config is required"):
        cv.compute_policy_loss_bypass_mode(old, lp, adv, mask, "token-mean", None)
    cv.compute_policy_loss_bypass_mode(old, lp, adv, mask, "token-mean", cfg)  # valid config


# --------------------------------------------------------------- optimal token baseline
# groups: a = {0, 2, 5} (row 0 the unique longest), b = {1, 4, 7} (4 and 7 tie for the longest),
# c, e singletons, d = {6, 9} with row 9 empty (TIR: d is a singleton)
INDEX = np.array(["a", "b", "a", "c", "b", "a", "d", "b", "e", "d"], dtype=object)


def _otb_inputs(seed):
    B, T = len(INDEX), 11
    mask = _mask(B=B, T=T, seed=seed)
    mask[0] = 1.0
    mask[[2, 5], -1] = 0.0
    mask[7] = mask[4]
    mask[9] = 0.0
    g = torch.Generator().manual_seed(seed)
    last = (mask * torch.arange(1, T + 1)).argmax(-1)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), last] = torch.randn(B, generator=g)
    rewards[2] += 0.3 * torch.randn(T, generator=g)  # token-level rewards on one row
    old = -(torch.rand(B, T, generator=g) * 3.0 + 0.01)
    pi = old.exp()
    sum_pi_sq = pi**2 + torch.rand(B, T, generator=g) * (1 - pi**2)  # a valid sum over a vocab
    weights = torch.rand(B, T, generator=g) * 1.5 + 0.2
    off = ~mask.bool()
    rewards[off] = 9.0  # finite garbage where the mask is 0: ignored by both
    old[off] = 4.0
    return rewards, mask, old, sum_pi_sq, weights


def _same_adv(verl_fn, ours_fn, *args, **kw):
    want = verl_fn(*args, **kw)
    got = ours_fn(*args, **kw)
    for w, o in zip(want, got, strict=True):
        assert o.dtype == w.dtype and o.shape == w.shape
        _close(o, w)
    return got


ESTIMATOR_PAIRS = {
    "otb": (VERL_OTB, cv.compute_optimal_token_baseline_advantage),
    "tir": (VERL_TIR, cv.compute_multi_turn_optimal_token_baseline_advantage),
}


@pytest.mark.parametrize("name", list(ESTIMATOR_PAIRS))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("is_weights", [False, True])
def test_optimal_token_baseline(name, seed, zero_tail, is_weights):
    r, m, old, s2, w = _otb_inputs(seed)
    verl_fn, ours_fn = ESTIMATOR_PAIRS[name]
    w = w if is_weights else None
    for eps in (1e-8, 0.1):
        _same_adv(verl_fn, ours_fn, r, m, INDEX, old, s2, w, zero_tail, eps)
    # the trainer's call: keywords, the config and no handle_zero_tail / epsilon
    kw = dict(
        token_level_rewards=r,
        response_mask=m,
        index=INDEX,
        old_log_probs=old,
        sum_pi_squared=s2,
        rollout_is_weights=w,
        config=None,
    )
    _same_adv(verl_fn, ours_fn, **kw)


def test_optimal_token_baseline_cases_exercised():
    """The inputs reach every branch: the zero tail changes row 0 (unique longest of a) only
    from the second-longest length on, not the tied b rows; singletons keep A = G; the empty
    row 9 has A = 0 (and leaves TIR's group d a singleton)."""
    r, m, old, s2, _ = _otb_inputs(0)
    lengths = m.sum(-1).long()
    for fn in (
        cv.compute_optimal_token_baseline_advantage,
        cv.compute_multi_turn_optimal_token_baseline_advantage,
    ):
        a1, g = fn(r, m, INDEX, old, s2, handle_zero_tail=True)
        a0, _ = fn(r, m, INDEX, old, s2, handle_zero_tail=False)
        diff = (a1 != a0).any(-1)
        assert diff[0] and not diff[[1, 2, 4, 5, 7]].any()
        _close(a1[[3, 8]], (g * m)[[3, 8]])
        assert (a1[9] == 0).all()
    second = int(lengths[[2, 5]].max())
    otb, _ = cv.compute_optimal_token_baseline_advantage(r, m, INDEX, old, s2)
    otb0, _ = cv.compute_optimal_token_baseline_advantage(r, m, INDEX, old, s2, None, False)
    assert (otb[0, :second] == otb0[0, :second]).all()
    assert (otb[0, second:] != otb0[0, second:]).any()
    tir, g = cv.compute_multi_turn_optimal_token_baseline_advantage(r, m, INDEX, old, s2)
    _close(tir[6], (g * m)[6])  # d without its empty member: a singleton in TIR


def test_optimal_token_baseline_float64():
    r, m, old, s2, w = (x.double() for x in _otb_inputs(1))
    for verl_fn, ours_fn in ESTIMATOR_PAIRS.values():
        _same_adv(verl_fn, ours_fn, r, m, INDEX, old, s2, w)


# ----------------------------------------------------------------------------- patching
def test_patch_installs_rest():
    names = {
        "optimal_token_baseline": "compute_optimal_token_baseline_advantage",
        "tir_optimal_token_baseline": "compute_multi_turn_optimal_token_baseline_advantage",
    }
    verl_adv = {k: core_algos.get_adv_estimator_fn(k) for k in names}
    assert verl_adv["optimal_token_baseline"] is VERL_OTB
    assert core_algos.get_policy_loss_fn("bypass_mode") is VERL_BYPASS
    cv.patch()
    try:
        fn = cv.compute_policy_loss_bypass_mode
        assert core_algos.get_policy_loss_fn("bypass_mode") is fn
        assert core_algos.compute_policy_loss_bypass_mode is fn
        for key, attr in names.items():
            assert core_algos.get_adv_estimator_fn(key) is getattr(cv, attr)
            assert getattr(core_algos, attr) is getattr(cv, attr)
    finally:
        cv.unpatch()
    assert core_algos.get_policy_loss_fn("bypass_mode") is VERL_BYPASS
    assert core_algos.compute_policy_loss_bypass_mode is VERL_BYPASS
    for key, attr in names.items():
        assert core_algos.get_adv_estimator_fn(key) is verl_adv[key]
        assert getattr(core_algos, attr) is verl_adv[key]
