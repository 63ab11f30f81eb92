"""Rollout correction drop-ins against the real trainers: veRL 0.9.1's rollout_corr_helper,
TRL 1.16's vLLM importance sampling (its own lines of GRPOTrainer), OpenRLHF 0.11.2's
PolicyLoss gating. Inputs with holes, an all-masked row, |delta| up to 50."""

import inspect
import itertools
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

from ._compat_data import error as _error

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


# ---------------------------------------------------------------------------- TRL 1.16
def _trl_block(start, end):
    """The lines of the installed TRL's GRPOTrainer._generate_and_score_completions from the one
    containing ``start`` to the one before ``end``, dedented: run as TRL's own code."""
    from trl.trainer import grpo_trainer

    src = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions)
    lines = src.splitlines()
    i = next(k for k, line in enumerate(lines) if start in line)
    j = next(k for k, line in enumerate(lines) if k > i and end in line)
    return textwrap.dedent("\n".join(lines[i:j])), grpo_trainer


VLLM_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("mode", VLLM_MODES)
@pytest.mark.parametrize("clip", [(None, 3.0), (0.5, 2.0), (0.2, None), (1.5, 4.0)])
@pytest.mark.parametrize("nan", [False, True])
def test_trl_vllm_importance_sampling(mode, clip, nan):
    from collections import defaultdict

    import ppokernels.compat.trl as ct

    ratio_src, grpo = _trl_block(
        "# Compute the importance sampling ratio when using vLLM",
        "# Compute the per-token log probabilities for the reference model",
    )
    metric_src, _ = _trl_block("delta = torch.abs(old_per_token_logps", "output = {")
    metric_src = "if True:\n" + textwrap.indent(metric_src, "    ")
    old, rollout, m = _data(seed=5, big=30.0)
    completion_mask = m.long()
    tool_mask = (torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) > 0.1).long()
    if nan:  # vLLM could not score some tokens
        rollout[0, 1] = rollout[5, 0] = float("nan")
    trainer = SimpleNamespace(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip[0],
        vllm_importance_sampling_clip_max=clip[1],
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=lambda t: t.reshape(1)),
    )
    ns = dict(
        self=trainer,
        torch=torch,
        math=math,
        completion_mask=completion_mask,
        tool_mask=tool_mask,
        old_per_token_logps=old,
        sampling_per_token_logps=rollout,
        nanmin=grpo.nanmin,
        nanmax=grpo.nanmax,
        device=old.device,
        mode="train",
    )
    exec(ratio_src, ns)  # noqa: S102  (TRL's own lines)
    exec(metric_src, ns)  # noqa: S102
    want = ns["vllm_importance_sampling_ratio"]
    got, metrics = ct.vllm_importance_sampling_ratio(
        old, rollout, completion_mask * tool_mask, mode=mode, clip_min=clip[0], clip_max=clip[1]
    )
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL)
    logged = {k: v[0] for k, v in trainer._metrics["train"].items()}
    assert set(logged) == set(metrics)
    _same_dict({k: v.item() for k, v in metrics.items()}, logged)


@pytest.mark.parametrize(
    "mode, clip",
    [
        ("token_mask", (2.0, 1.0)),
        ("sequence_truncate", (3.0, 3.0)),
        ("token_truncate", (None, None)),
        ("sequence_truncate", (None, None)),
        ("tok", (0.5, 2.0)),
        ("tok", (2.0, 0.5)),
    ],
)
def test_trl_vllm_importance_sampling_refusals(mode, clip):
    """What TRL refuses (GRPOConfig's checks of the bounds, then the mode where its ratio is
    computed) raises TRL's exception type and message, first refusal first."""
    import warnings

    from trl import GRPOConfig

    import ppokernels.compat.trl as ct

    ratio_src, _ = _trl_block(
        "# Compute the importance sampling ratio when using vLLM",
        "# Compute the per-token log probabilities for the reference model",
    )
    old, rollout, m = _data(seed=6)

    def trl():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = GRPOConfig(
                output_dir="unused",
                report_to="none",
                use_cpu=True,
                bf16=False,
                vllm_importance_sampling_mode=mode,
                vllm_importance_sampling_clip_min=clip[0],
                vllm_importance_sampling_clip_max=clip[1],
            )
        ns = dict(
            self=SimpleNamespace(**{**vars(config), "use_vllm": True}),
            torch=torch,
            math=math,
            completion_mask=m,
            tool_mask=torch.ones_like(m),
            old_per_token_logps=old,
            sampling_per_token_logps=rollout,
            device=old.device,
            mode="train",
        )
        exec(ratio_src, ns)  # noqa: S102  (TRL's own lines)

    want = _error(trl)
    got = _error(
        lambda: ct.vllm_importance_sampling_ratio(
            old, rollout, m, mode=mode, clip_min=clip[0], clip_max=clip[1]
        )
    )
    assert got == want


@pytest.mark.parametrize("mode", VLLM_MODES)
def test_trl_loss_with_correction(mode):
    """TRL's GRPO loss with the op's ratio equals it with TRL's own ratio (grpo_loss parity
    with TRL's _compute_loss is tests/compat/test_trl.py's)."""
    import ppokernels.compat.trl as ct

    ratio_src, _ = _trl_block(
        "# Compute the importance sampling ratio when using vLLM",
        "# Compute the per-token log probabilities for the reference model",
    )
    old, rollout, m = _data(seed=6, big=5.0)
    trainer = SimpleNamespace(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=0.5,
        vllm_importance_sampling_clip_max=2.0,
    )
    ns = dict(
        self=trainer,
        torch=torch,
        math=math,
        completion_mask=m.long(),
        tool_mask=None,
        old_per_token_logps=old,
        sampling_per_token_logps=rollout,
    )
    exec(ratio_src, ns)  # noqa: S102
    want = ns["vllm_importance_sampling_ratio"]
    got, _ = ct.vllm_importance_sampling_ratio(
        old, rollout, m, mode=mode, clip_min=0.5, clip_max=2.0
    )
    g = torch.Generator().manual_seed(3)
    lp = old + 0.1 * torch.randn(old.shape, generator=g)
    adv = torch.randn(old.shape[0], generator=g)
    losses = [
        ct.grpo_loss(
            lp, old, adv, m.float(), loss_type="grpo", importance_sampling_ratio=r.expand_as(lp)
        )
        for r in (got, want)
    ]
    torch.testing.assert_close(losses[0], losses[1], **TOL)


# ---------------------------------------------------------------------------- OpenRLHF
GATES = [
    (level, mode, gating)
    for level in ("token", "seq")
    for mode in ("mask", "clip")
    for gating in ("ratio", "binary_kl", "tv")
    if mode == "mask" or (level == "token" and gating == "ratio")
]


@pytest.mark.parametrize("level,mode,gating", GATES)
def test_openrlhf_gating(level, mode, gating):
    from .test_openrlhf import orl_loss  # noqa: I001 (first: OpenRLHF imported with its GPU stubs)

    import ppokernels.compat.openrlhf as co

    old, rollout, m = _data(seed=7, big=50.0)
    m = m.float()
    g = torch.Generator().manual_seed(2)
    lp = old + 0.1 * torch.randn(old.shape, generator=g)
    adv = torch.randn(old.shape, generator=g)
    thr = (0.5, 2.0) if gating == "ratio" else (0.0, 0.02 if gating == "binary_kl" else 0.1)
    args = (0.2, 0.28, None, True, "ppo", level, mode, gating, thr)
    want = orl_loss.PolicyLoss(*args)(lp, old, adv, m, rollout)
    got = co.PolicyLoss(*args)(lp, old, adv, m, rollout)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
