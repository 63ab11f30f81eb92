"""Rollout correction drop-ins against the real trainers: veRL 0.9.1's rollout_corr_helper,
TRL 1.16's vLLM importance sampling (its own lines of GRPOTrainer), OpenRLHF 0.11.2's
PolicyLoss gating. Inputs with holes, an all-masked row, |delta| up to 50."""

import itertools
from types import SimpleNamespace

import pytest
import torch

verl_rc = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")

import ppokernels.compat.verl as ppk_verl  # noqa: E402
from ppokernels.compat.verl import rollout_corr as ours  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-6)


def _data(B=8, T=29, seed=0, big=50.0, mask_dtype=torch.int64):
    """old / rollout log-probs with holes, one all-masked row, |delta| up to ``big``; masked
    positions hold finite garbage (veRL multiplies by the mask, so NaN there would be its own
    NaN)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    rollout = old + 0.2 * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    m = torch.arange(T)[None] < lengths[:, None]
    m &= torch.rand(B, T, generator=g) > 0.2
    m[0, 0] = True
    m[3] = False
    rollout[1, 2], old[2, 4], rollout[4, 0] = old[1, 2] - big, rollout[2, 4] + big, old[4, 0] + 30
    m[1, 2] = m[2, 4] = m[4, 0] = True
    return old, rollout, m.to(mask_dtype)


def _same_dict(got, want, **tol):
    assert list(got) == list(want) or set(got) == set(want), set(got) ^ set(want)
    for k in want:
        torch.testing.assert_close(
            torch.tensor(float(got[k]), dtype=torch.float64),
            torch.tensor(float(want[k]), dtype=torch.float64),
            **(tol or dict(rtol=1e-4, atol=1e-5)),
            msg=lambda m, k=k: f"{k}: {m}",
        )


IS_FORMS = [
    (None, 2.0),
    ("token", 2.0),
    ("token", "0.5_2.0"),
    ("token", 5.0),
    ("sequence", 2.0),
    ("sequence", "0.2_5.0"),
    ("sequence", "1e-30_1e30"),
]
RS_OPTIONS = sorted(verl_rc.SUPPORTED_ROLLOUT_RS_OPTIONS)
RS_THRESHOLD = {
    "token_k1": "0.5_2.0",
    "seq_sum_k1": "0.1_10.0",
    "seq_mean_k1": "0.8_1.25",
    "token_k2": "0.3",
    "seq_sum_k2": "2.0",
    "seq_mean_k2": "0.05",
    "seq_max_k2": "1.5",
    "token_k3": "0.2",
    "seq_sum_k3": "3.0",
    "seq_mean_k3": "0.04",
    "seq_max_k3": "2.0",
}
RS_FORMS = [None] + [(o,) for o in RS_OPTIONS] + list(itertools.combinations(RS_OPTIONS, 2))


def _rs_args(rs):
    if rs is None:
        return dict(rollout_rs=None, rollout_rs_threshold=None)
    return dict(rollout_rs=",".join(rs), rollout_rs_threshold=",".join(RS_THRESHOLD[o] for o in rs))


def _combined(fn, old, rollout, m, is_form, rs, norm=False):
    rollout_is, thr = is_form
    return fn(
        old,
        rollout,
        m,
        rollout_is=rollout_is,
        rollout_is_threshold=thr,
        rollout_is_batch_normalize=norm,
        **_rs_args(rs),
    )


def _compare_combined(got, want):
    gw, gm, gmet = got
    ww, wm, wmet = want
    assert (gw is None) == (ww is None)
    if ww is not None:
        a, b = gw.batch["rollout_is_weights"], ww.batch["rollout_is_weights"]
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL)
    assert gm.dtype == wm.dtype
    assert torch.equal(gm, wm)
    _same_dict(gmet, wmet)


@pytest.mark.parametrize("is_form", IS_FORMS)
@pytest.mark.parametrize("norm", [False, True])
def test_verl_is_forms(is_form, norm):
    old, rollout, m = _data()
    got = _combined(
        ours.compute_rollout_correction_and_rejection_mask, old, rollout, m, is_form, None, norm
    )
    want = _combined(
        verl_rc.compute_rollout_correction_and_rejection_mask, old, rollout, m, is_form, None, norm
    )
    _compare_combined(got, want)


@pytest.mark.parametrize("rs", RS_FORMS, ids=lambda r: "none" if r is None else "+".join(r))
@pytest.mark.parametrize("is_form", [("token", "0.5_2.0"), ("sequence", 2.0)])
def test_verl_rs_options(rs, is_form):
    old, rollout, m = _data(seed=1)
    got = _combined(
        ours.compute_rollout_correction_and_rejection_mask, old, rollout, m, is_form, rs
    )
    want = _combined(
        verl_rc.compute_rollout_correction_and_rejection_mask, old, rollout, m, is_form, rs
    )
    _compare_combined(got, want)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_verl_parts_and_mask_dtypes(mask_dtype):
    old, rollout, m = _data(seed=2, mask_dtype=mask_dtype)
    x = old - rollout
    for level, thr in [("token", 2.0), ("sequence", "0.5_3.0")]:
        got = ours.compute_rollout_correction_weights(x, m, level, thr, True)
        want = verl_rc.compute_rollout_correction_weights(x, m, level, thr, True)
        assert got[0].dtype == want[0].dtype
        torch.testing.assert_close(got[0], want[0], **TOL)
        _same_dict(got[1], want[1])
    rs = dict(rollout_rs="token_k1,seq_max_k3", rollout_rs_threshold="0.5_2.0,1.0")
    got = ours.compute_rollout_rejection_mask(x, m, **rs)
    want = verl_rc.compute_rollout_rejection_mask(x, m, **rs)
    assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0])
    _same_dict(got[1], want[1])
    _same_dict(
        ours.compute_offpolicy_metrics(old, rollout, m),
        verl_rc.compute_offpolicy_metrics(old, rollout, m),
    )
    _same_dict(
        ours.compute_offpolicy_metrics(old, None, m),
        verl_rc.compute_offpolicy_metrics(old, None, m),
    )


def test_verl_errors_match():
    old, rollout, m = _data()
    cases = [
        dict(rollout_is="tok"),
        dict(rollout_is="token", rollout_is_threshold="2.0_0.5"),
        dict(rollout_is="token", rollout_is_threshold=True),
        dict(rollout_rs="token_k4", rollout_rs_threshold="1.0"),
        dict(rollout_rs="token_k2", rollout_rs_threshold=None),
        dict(rollout_rs="token_k2,seq_sum_k3", rollout_rs_threshold="1.0,2.0,3.0"),
        dict(rollout_rs="token_k2", rollout_rs_threshold="0.5_1.0"),
    ]
    for kw in cases:
        errors = []
        for fn in (
            ours.compute_rollout_correction_and_rejection_mask,
            verl_rc.compute_rollout_correction_and_rejection_mask,
        ):
            with pytest.raises((ValueError, TypeError)) as e:
                fn(old, rollout, m, **kw)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1], kw
    for fn in (
        ours.compute_rollout_correction_and_rejection_mask,
        verl_rc.compute_rollout_correction_and_rejection_mask,
    ):
        with pytest.raises(ValueError, match="at least one valid token"):
            fn(old, rollout, torch.zeros_like(m), rollout_is="token")


def test_verl_patch_resolves_to_ppokernels():
    from verl.trainer.ppo import rollout_corr_helper as h

    names = ours.__all__
    originals = {n: getattr(h, n) for n in names}
    ppk_verl.patch()
    try:
        for n in names:
            assert getattr(h, n) is getattr(ours, n)
        old, rollout, m = _data(seed=3)
        batch = SimpleNamespace(
            batch={"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": m},
            union=lambda proto: (proto, batch)[1],
        )
        cfg = dict(
            rollout_is="sequence",
            rollout_is_threshold=2.0,
            rollout_rs="seq_mean_k3",
            rollout_rs_threshold=0.04,
        )
        _, metrics = h.compute_rollout_correction_and_add_to_batch(batch, cfg)
    finally:
        ppk_verl.unpatch()
    for n in names:
        assert getattr(h, n) is originals[n]
    want = _combined(
        verl_rc.compute_rollout_correction_and_rejection_mask,
        old,
        rollout,
        m,
        ("sequence", 2.0),
        ("seq_mean_k3",),
    )
    # the patched call chain (add_to_batch -> the drop-in) gives veRL's metrics
    _same_dict(metrics, {k: v for k, v in want[2].items()})


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_verl_loss_with_correction(loss_agg_mode):
    """veRL's vanilla loss with IS weights and the rejection mask from the op equals veRL's
    loss with its own helper's weights and mask."""
    from verl.trainer.ppo import core_algos

    old, rollout, m = _data(seed=4)
    g = torch.Generator().manual_seed(9)
    lp = old + 0.1 * torch.randn(old.shape, generator=g)
    adv = torch.randn(old.shape, generator=g)
    cfg = SimpleNamespace(
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        global_batch_info={},
        get=lambda k, d=None: d,
    )
    losses = []
    for fn in (
        ours.compute_rollout_correction_and_rejection_mask,
        verl_rc.compute_rollout_correction_and_rejection_mask,
    ):
        proto, mask, _ = _combined(fn, old, rollout, m, ("token", 2.0), ("seq_mean_k3",))
        w = proto.batch["rollout_is_weights"]
        loss, _ = core_algos.compute_policy_loss_vanilla(old, lp, adv, mask, loss_agg_mode, cfg, w)
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], **TOL)
