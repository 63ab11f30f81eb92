"""Parity of ppokernels.compat.verl with the released verl 0.9.1 (pip install --no-deps, see
requirements-compat.txt): values and gradients within fp32 rounding on random inputs with right
padding and multi-turn masks with holes, singleton groups, every aggregation and KL mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ._compat_data import TOL
from ._compat_data import close as _close
from ._compat_data import data as _data
from ._compat_data import error as _error
from ._compat_data import mask as _mask

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")  # the reason names the import error
verl_F = pytest.importorskip("verl.utils.torch_functional")
from omegaconf import OmegaConf  # noqa: E402  (a verl dependency)

import ppokernels.compat.verl as cv  # noqa: E402

AGG = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
]
KL_MODES = [
    "kl",
    "k1",
    "abs",
    "mse",
    "k2",
    "low_var_kl",
    "k3",
    "kl+",
    "k1+",
    "abs+",
    "mse+",
    "k2+",
    "low_var_kl+",
    "k3+",
]


def _grads(fn, inputs, seed=1):
    """Gradients of sum(out * random) with respect to each of ``inputs`` (leaves)."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return out, torch.autograd.grad((out * g).sum(), xs, allow_unused=True)


# --------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae(gamma, lam):
    rewards, values, _, mask = _data()
    want = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    got = cv.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    for w, o in zip(want, got, strict=True):
        assert o.dtype == w.dtype
        _close(o, w)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_grpo(norm, eps):
    rewards, _, _, mask = _data(B=9)
    index = np.array(["a", "b", "a", "c", "b", "a", "d", "b", "e"], dtype=object)  # c, d, e alone
    want = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, eps, norm)
    got = cv.compute_grpo_outcome_advantage(rewards, mask, index, eps, norm)
    for w, o in zip(want, got, strict=True):
        _close(o, w)


def test_rloo():
    rewards, _, _, mask = _data(B=9, seed=3)
    index = np.array([7, 3, 7, 1, 3, 7, 5, 3, 9])  # 1, 5, 9 singletons keep their raw score
    want = core_algos.compute_rloo_outcome_advantage(rewards, mask, index)
    got = cv.compute_rloo_outcome_advantage(rewards, mask, index)
    for w, o in zip(want, got, strict=True):
        _close(o, w)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus(gamma):
    rewards, _, _, mask = _data(seed=4)
    cfg = OmegaConf.create({"gamma": gamma})
    want = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
    got = cv.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
    for w, o in zip(want, got, strict=True):
        _close(o, w)


# ----------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("mode", KL_MODES)
def test_kl_penalty(mode):
    lp, ref, _, _ = _data(seed=5, scale=6.0)  # |x| up to ~30: exercises both k3 clamps
    want, gw = _grads(lambda a, b: core_algos.kl_penalty(a, b, mode), [lp, ref])
    got, go = _grads(lambda a, b: cv.kl_penalty(a, b, mode), [lp, ref])
    _close(got, want)
    for a, b in zip(go, gw, strict=True):
        _close(a, b)


def test_kl_penalty_refusals_match_verl():
    lp, ref, _, _ = _data()
    for mode in ("full", "nope", "K3"):
        want = _error(lambda m=mode: core_algos.kl_penalty(lp, ref, m))
        assert _error(lambda m=mode: cv.kl_penalty(lp, ref, m)) == want


# ------------------------------------------------------------------------------- losses


def _policy_inputs(seed=6):
    old, adv, noise, mask = _data(seed=seed)
    lp = old + 0.4 * noise  # ratios spread around the clip range
    lp[0, 0] = old[0, 0] + 25.0  # beyond the +-20 log-ratio clamp
    return old, lp, adv, mask


@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize(
    "clip", [(0.2, None, None, 3.0), (None, 0.2, 0.28, 1.5), (0.1, 0.05, 0.3, 10.0)]
)
def test_compute_policy_loss(mode, clip):
    old, lp, adv, mask = _policy_inputs()
    cliprange, low, high, c = clip
    if cliprange is None:
        cliprange = 0.2

    def run(fn):
        xs = [lp.clone().requires_grad_(True)]
        out = fn(old, xs[0], adv, mask, cliprange, low, high, c, mode)
        (grad,) = torch.autograd.grad(out[0], xs)
        return out, grad

    want, gw = run(core_algos.compute_policy_loss)
    got, go = run(cv.compute_policy_loss)
    for w, o in zip(want, got, strict=True):
        _close(o, w)
    _close(go, gw)


@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize(
    "info",
    [{}, {"dp_size": 2, "batch_num_tokens": 71, "global_batch_size": 11, "loss_scale_factor": 20}],
)
def test_compute_policy_loss_vanilla(mode, info):
    old, lp, adv, mask = _policy_inputs(seed=7)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    cfg = OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.15,
            "clip_ratio_high": 0.3,
            "clip_ratio_c": 2.5,
            "global_batch_info": info,
        }
    )

    def run(fn):
        x = lp.clone().requires_grad_(True)
        loss, metrics = fn(old, x, adv, mask, mode, cfg, weights)
        return loss, metrics, torch.autograd.grad(loss, [x])[0]

    lw, mw, gw = run(core_algos.compute_policy_loss_vanilla)
    lo, mo, go = run(cv.compute_policy_loss_vanilla)
    _close(lo, lw)
    _close(go, gw)
    assert mo.keys() == mw.keys()
    for k in mw:
        assert mo[k] == pytest.approx(mw[k], abs=1e-6), k


@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize(
    "kw",
    [{}, {"dp_size": 4, "batch_num_tokens": 50, "global_batch_size": 12, "loss_scale_factor": 7}],
)
def test_agg_loss(mode, kw):
    x, _, _, mask = _data(seed=8)
    # out-of-mask garbage must not leak (veRL's seq-mean modes multiply by the mask, so NaN
    # there would poison veRL's own result; ppokernels selects masked entries away)
    x[mask == 0] = float("nan") if mode.startswith("token") else 1e6
    want, gw = _grads(lambda a: core_algos.agg_loss(a, mask, mode, **kw), [x])
    got, go = _grads(lambda a: cv.agg_loss(a, mask, mode, **kw), [x])
    _close(got, want)
    _close(go[0], gw[0], equal_nan=True, **TOL)


@pytest.mark.parametrize(
    "mode, kw",
    [
        ("token-mean", dict(dp_size=2)),
        ("seq-mean-token-mean", dict(dp_size=2)),
        ("seq-mean-token-sum", dict(dp_size=2, batch_num_tokens=40)),
        ("seq-mean-token-sum-norm", dict(dp_size=2)),
        ("nope", {}),
        ("nope", dict(dp_size=2)),
    ],
)
def test_agg_loss_refusals_match_verl(mode, kw):
    x, _, _, mask = _data()
    want = _error(lambda: core_algos.agg_loss(x, mask, mode, **kw))
    assert _error(lambda: cv.agg_loss(x, mask, mode, **kw)) == want


@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize(
    "kw",
    [{}, {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 8, "loss_scale_factor": 5}],
)
def test_compute_value_loss(mode, kw):
    vpreds, returns, values, mask = _data(seed=9)

    def run(fn):
        x = vpreds.clone().requires_grad_(True)
        loss, frac = fn(x, returns, values, mask, 0.5, mode, **kw)
        return loss, frac, torch.autograd.grad(loss, [x])[0]

    for w, o in zip(run(core_algos.compute_value_loss), run(cv.compute_value_loss), strict=True):
        _close(o, w)


# ------------------------------------------------------------------ torch_functional


@pytest.mark.parametrize("axis", [None, 1, 0])
def test_masked_mean_sum(axis):
    x, _, _, mask = _data(seed=10)
    _close(cv.masked_mean(x, mask, axis), verl_F.masked_mean(x, mask, axis))
    _close(cv.masked_sum(x, mask, axis), verl_F.masked_sum(x, mask, axis))
    empty = torch.zeros_like(mask)
    _close(cv.masked_mean(x, empty), verl_F.masked_mean(x, empty))


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_var_whiten(unbiased, shift_mean):
    x, _, _, mask = _data(seed=11)
    _close(cv.masked_var(x, mask, unbiased), verl_F.masked_var(x, mask, unbiased))
    _close(cv.masked_whiten(x, mask, shift_mean), verl_F.masked_whiten(x, mask, shift_mean))


def test_masked_var_errors():
    x, _, _, _ = _data()
    for n in (0, 1):
        mask = torch.zeros_like(x)
        mask[0, :n] = 1
        with pytest.raises(ValueError) as want:
            verl_F.masked_var(x, mask)
        with pytest.raises(ValueError) as got:
            cv.masked_var(x, mask)
        assert str(got.value) == str(want.value)
        with pytest.raises(ValueError):
            cv.masked_whiten(x, mask)


def _logits(N=3, T=5, V=1271, seed=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=g)
    return logits, labels


def test_logprobs_from_logits():
    logits, labels = _logits()
    want, gw = _grads(lambda z: verl_F.logprobs_from_logits(z, labels), [logits])
    got, go = _grads(lambda z: cv.logprobs_from_logits(z, labels, inplace_backward=False), [logits])
    assert got.dtype == torch.float32
    _close(got, want)
    _close(go[0], gw[0])


def test_logprobs_from_logits_inplace_backward():
    logits, labels = _logits(seed=13)
    _, gw = _grads(lambda z: verl_F.logprobs_from_logits(z, labels), [logits])
    leaf = logits.clone().requires_grad_(True)
    z = leaf * 1.0  # the in-place backward overwrites this buffer, not the leaf
    lp = cv.logprobs_from_logits(z, labels, inplace_backward=True)
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
    (lp * g).sum().backward()
    _close(leaf.grad, gw[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(dtype):
    logits, _ = _logits(seed=14, dtype=dtype)
    want, gw = _grads(verl_F.entropy_from_logits, [logits])
    got, go = _grads(cv.entropy_from_logits, [logits])
    assert got.dtype == want.dtype
    tol = TOL if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    _close(got, want, **tol)
    _close(go[0], gw[0], **tol)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    want = verl_F.entropy_from_logits_with_chunking(flat, chunk_size=4)
    _close(cv.entropy_from_logits_with_chunking(flat, chunk_size=4), want)


def test_compute_entropy_loss():
    logits, _ = _logits(seed=15)
    mask = _mask(3, 5, seed=15)
    for mode in AGG:
        _close(
            cv.compute_entropy_loss(logits, mask, mode),
            core_algos.compute_entropy_loss(logits, mask, mode),
        )


# ------------------------------------------------------------------ fused linear log-probs

needs_linear = pytest.mark.skipif(
    not hasattr(cv.ppk, "linear_logprobs"), reason="ppokernels.linear_logprobs has not landed yet"
)


@needs_linear
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(2, 5), (7,)])
def test_fused_linear_for_ppo(temperature, shape):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    g = torch.Generator().manual_seed(16)
    H, V = 32, 1271
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    ids = torch.randint(0, V, shape, generator=g)

    def run(module):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = module(h, w, ids, temperature)
        g1, g2 = torch.randn(lp.shape, generator=g), torch.randn(ent.shape, generator=g)
        grads = torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), [h, w])
        return lp, ent, *grads

    g = torch.Generator().manual_seed(0)
    want = run(FusedLinearForPPO(chunk_size=3))
    g = torch.Generator().manual_seed(0)
    got = run(cv.FusedLinearForPPO(chunk_size=3))
    for w, o in zip(want, got, strict=True):
        assert o.dtype == w.dtype and o.shape == w.shape
        _close(o, w, atol=1e-4, rtol=1e-4)
    # linear_cross_entropy (CUDA-only in veRL): same math, flattened outputs
    lp, ent = cv.linear_cross_entropy(hidden, weight, ids, temperature)
    _close(lp, want[0].reshape(-1), atol=1e-4, rtol=1e-4)
    _close(ent, want[1].reshape(-1), atol=1e-4, rtol=1e-4)
    total, _ = cv.linear_cross_entropy(hidden, weight, ids, temperature, "mean")
    _close(total, want[0].mean(), atol=1e-4, rtol=1e-4)


@needs_linear
def test_fused_linear_refusals_match_verl():
    """What veRL's fused linear log-probs refuse (a bad backend; hidden neither 2-D nor 3-D,
    ids of another shape, by its torch path's asserts or its Liger path's ValueErrors; a
    temperature or reduction of the wrong type) raises veRL's exception type and message."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    w, ids = torch.randn(11, 4), torch.zeros(2, 3, dtype=torch.long)
    assert _error(lambda: cv.FusedLinearForPPO(impl_backend="cuda")) == _error(
        lambda: FusedLinearForPPO(impl_backend="cuda")
    )
    for backend in ("torch", "liger"):
        for h, y in ((torch.randn(4), ids[0, :1]), (torch.randn(2, 3, 4), ids[0])):
            want = _error(lambda b=backend, h=h, y=y: FusedLinearForPPO(impl_backend=b)(h, w, y))
            got = _error(lambda b=backend, h=h, y=y: cv.FusedLinearForPPO(impl_backend=b)(h, w, y))
            assert got == want, backend
    h = torch.randn(2, 3, 4)
    for args in ((1, "none"), (1.0, None)):
        want = _error(lambda a=args: linear_cross_entropy(h, w, ids, *a))
        assert _error(lambda a=args: cv.linear_cross_entropy(h, w, ids, *a)) == want


# ------------------------------------------------------------------------------ patching


def test_patch_unpatch():
    import verl.utils.kernel.linear_cross_entropy as lce
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn

    before = (
        core_algos.compute_gae_advantage_return,
        get_adv_estimator_fn("grpo"),
        get_policy_loss_fn("vanilla"),
        verl_F.logprobs_from_logits,
        lce.linear_cross_entropy,
    )
    cv.patch()
    try:
        cv.patch()  # idempotent
        assert core_algos.compute_gae_advantage_return is cv.compute_gae_advantage_return
        assert get_adv_estimator_fn("gae") is cv.compute_gae_advantage_return
        assert get_adv_estimator_fn("rloo") is cv.compute_rloo_outcome_advantage
        assert get_policy_loss_fn("vanilla") is cv.compute_policy_loss_vanilla
        assert verl_F.masked_whiten is cv.masked_whiten
        assert lce.linear_cross_entropy is cv.linear_cross_entropy
        # veRL's own callers now reach ppokernels: its GRPO-vectorised estimator whitens nothing,
        # but compute_reinforce_plus_plus_baseline calls verl_F.masked_whiten (patched)
        rewards, _, _, mask = _data()
        index = np.arange(6) % 2
        adv, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
            rewards, mask, index
        )
        assert torch.isfinite(adv).all()
    finally:
        cv.unpatch()
    after = (
        core_algos.compute_gae_advantage_return,
        get_adv_estimator_fn("grpo"),
        get_policy_loss_fn("vanilla"),
        verl_F.logprobs_from_logits,
        lce.linear_cross_entropy,
    )
    assert all(a is b for a, b in zip(before, after, strict=True))
