"""ppo_policy_loss's loss modes on every backend against the fp64 reference: loss, metrics and
gradients, with masks with holes, right padding, an all-masked row, every aggregation, per-token
and per-row advantages and importance weights, KL and entropy terms, bf16 inputs and bad input.
(tests/compat/test_verl_modes.py and tests/compat/test_trl.py check the modes against the
trainers' own functions.)"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.losses import CISPO, DPPOKL, DPPOTV, DRO, GPG, GSPO, SAPO, Clip, GeoMean, Vespo
from ppokernels.testing import binary_skip_reason

from .test_ppo_policy_loss import AGGS, PARAMS, _extras, _policy_inputs, _tol

KERNELS = [p for p in PARAMS if p[1] != "reference"]
# one configuration per mode, with its own options; clip_high != clip_low everywhere
MODES = {
    "vanilla": dict(loss=Clip(0.2, 0.28, dual_clip=3.0)),
    "gspo": dict(loss=GSPO(0.2, 0.28, seq_logratio_max=0.05), logratio_clamp=None),
    "gspo_dual": dict(loss=GSPO(0.2, 0.28, dual_clip=2.0)),
    "sapo": dict(loss=SAPO(1.0, 1.05)),
    "sapo_sharp": dict(loss=SAPO(3.0, 0.5), logratio_clamp=0.3),
    "cispo": dict(loss=CISPO(0.2, 0.28)),
    "cispo_trl": dict(loss=CISPO(ratio_cap=1.1), logratio_clamp=None),
    "gpg": dict(loss=GPG()),
    "geo_mean": dict(loss=GeoMean(0.2, 0.28), logratio_clamp=None),
    "geo_mean_clamped": dict(loss=GeoMean(0.1, 0.28), logratio_clamp=0.3),
    "dppo_tv": dict(loss=DPPOTV(0.05, 0.1, ratio_cap=1.2)),
    "dppo_kl": dict(loss=DPPOKL(0.02, 0.05)),
    "dro": dict(loss=DRO(0.3), logratio_clamp=0.5),
    "vespo": dict(loss=Vespo()),
    "vespo_params": dict(loss=Vespo(1.5, 2.0, 2.5, 0.5)),
}


def _mode(name):
    return dict(MODES[name])


def _inputs(B, T, dtype, device, adv_per_seq=False, garbage=True):
    lp, old, adv, mask = _policy_inputs(
        B, T, dtype, device, adv_per_seq=adv_per_seq, garbage=garbage
    )
    # probabilities stay below 1 (DPPO's binary KL takes log(1 - p_old))
    old = torch.where(mask, old.clamp(max=-1e-3), old)
    if not adv_per_seq:  # GMPO and SAPO branch on the sign of A: some exact zeros
        adv = torch.where(torch.rand(adv.shape, device=adv.device) < 0.1, 0.0, adv)
    return lp, old, adv, mask


def _check(
    device, backend, dtype, kw, *, B=5, T=37, adv_per_seq=False, weights=None, ref=False, ent=False
):
    lp, old, adv, mask = _inputs(B, T, dtype, device, adv_per_seq)
    r, e, w = _extras(lp)
    if weights == "row":
        w = w[:, 0]
    lp, r, e = (x.detach().requires_grad_() for x in (lp, r, e))
    extra = dict(
        ref_logprobs=r if ref else None,
        kl_coef=0.1 if ref else 0.0,
        entropy=e if ent else None,
        entropy_coef=0.02 if ent else 0.0,
        is_weights=w if weights else None,
    )
    out = ppokernels.ppo_policy_loss(lp, old, adv, mask, **kw, **extra, backend=backend)
    c64 = lambda x: None if x is None else x.detach().cpu().double()  # noqa: E731
    lp64, r64, e64 = (c64(x).requires_grad_() for x in (lp, r, e))
    extra64 = dict(
        extra,
        ref_logprobs=r64 if ref else None,
        entropy=e64 if ent else None,
        is_weights=c64(extra["is_weights"]),
    )
    exp = reference.ppo_policy_loss(lp64, c64(old), c64(adv), mask.cpu(), **kw, **extra64)
    tol = _tol(dtype, backend)
    for name in exp._fields:
        a, b = getattr(out, name), getattr(exp, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(c64(a), b, **tol, msg=name)
    gscale = torch.randn((), dtype=torch.float64) - 2.0
    wrt = [(lp, lp64)] + ([(r, r64)] if ref else []) + ([(e, e64)] if ent else [])
    got = torch.autograd.grad(out.loss, [a for a, _ in wrt], gscale.to(out.loss.dtype))
    want = torch.autograd.grad(exp.loss, [b for _, b in wrt], gscale)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all() and (a[~mask] == 0).all()
        torch.testing.assert_close(c64(a), b, **tol)
    return out, exp


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mode_agg(device, backend, mode, agg, dtype):
    _check(device, backend, dtype, dict(_mode(mode), agg=agg))


FEATURES = {
    "adv_per_seq": dict(adv_per_seq=True),
    "weights_token": dict(weights="token"),
    "weights_row": dict(weights="row", adv_per_seq=True),
    "kl_entropy": dict(ref=True, ent=True, weights="token"),
}


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("mode", [m for m in MODES if m == MODES[m]["loss"].mode])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_mode_features(device, backend, mode, feature):
    kw = dict(_mode(mode), agg="seq-mean-token-mean", num_seqs=7.0)
    _check(device, backend, torch.float32, kw, **FEATURES[feature])


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("mode", ["vanilla", "sapo", "gpg", "dro", "geo_mean"])
def test_gradcheck_modes(device, backend, mode):
    """Modes without a stop-gradient: the fused backward is the derivative of the forward."""
    lp, old, adv, mask = _inputs(3, 7, torch.float64, device, garbage=False)
    _, _, w = _extras(lp)
    kw = _mode(mode)

    def f(x):
        return ppokernels.ppo_policy_loss(
            x, old, adv, mask, **kw, is_weights=w, backend=backend
        ).loss

    assert torch.autograd.gradcheck(f, (lp.requires_grad_(),))


@pytest.mark.parametrize("device, backend", PARAMS)
def test_mode_name_is_the_default_spec(device, backend):
    lp, old, adv, mask = _inputs(4, 21, torch.float32, device)
    a = ppokernels.ppo_policy_loss(lp, old, adv, mask, loss="gspo", backend=backend)
    b = ppokernels.ppo_policy_loss(lp, old, adv, mask, loss=GSPO(), backend=backend)
    for x, y in zip(a, b, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


def test_the_cpp_op_checks_its_loss_params():
    """A direct call of the op with a wrong mode or parameter count is a clear error."""
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    lp, old, adv, mask = _inputs(3, 11, torch.float64, "cpu", garbage=False)
    args = (None, None, None)
    tail = (20.0, "token-mean", None, None, 0.0, "k3", None, 0.0)
    op = torch.ops.ppokernels.ppo_policy_loss
    with pytest.raises(RuntimeError, match="ppo_policy_loss: loss_mode 'sapo' takes 2 loss_params"):
        op(lp, old, adv, mask, *args, "sapo", [1.0], *tail)
    with pytest.raises(RuntimeError, match="ppo_policy_loss: unknown loss_mode 'ppo'"):
        op(lp, old, adv, mask, *args, "ppo", [], *tail)
    with pytest.raises(RuntimeError, match="ppo_policy_loss: loss_params must not be NaN"):
        op(lp, old, adv, mask, *args, "dro", [float("nan")], *tail)


@pytest.mark.parametrize("device, backend", KERNELS)
@pytest.mark.parametrize("mode", ["gspo", "sapo", "cispo", "geo_mean", "dppo_kl", "dro", "vespo"])
def test_bf16_inputs(device, backend, mode):
    """bf16 data run in fp32: the fp64 reference of the same (bf16) inputs, to fp32 accuracy."""
    lp, old, adv, mask = _inputs(6, 200, torch.bfloat16, device, garbage=False)
    kw = _mode(mode)
    x = lp.requires_grad_()
    out = ppokernels.ppo_policy_loss(x, old, adv, mask, **kw, backend=backend)
    c = lambda t: t.detach().cpu().double()  # noqa: E731
    x64 = c(lp).requires_grad_()
    exp = reference.ppo_policy_loss(x64, c(old), c(adv), mask.cpu(), **kw)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(c(out.loss), exp.loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(c(out.clipfrac), exp.clipfrac, rtol=2e-5, atol=2e-6)
    (g,) = torch.autograd.grad(out.loss, x)
    (g64,) = torch.autograd.grad(exp.loss, x64)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(c(g), g64, rtol=1e-2, atol=1e-5)  # the bf16 rounding of g


BAD = [
    (ValueError, "ppo_policy_loss: loss: unknown loss mode 'ppo'", dict(loss="ppo")),
    (TypeError, "ppo_policy_loss: loss must be a loss spec", dict(loss=0.2)),
    (ValueError, "ppo_policy_loss: loss: DRO .'dro'.: .* missing 1 required", dict(loss="dro")),
]


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("exc, msg, kw", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_mode_options(device, backend, exc, msg, kw):
    lp, old, adv, mask = _inputs(3, 5, torch.float32, device)
    with pytest.raises(exc, match=msg):
        ppokernels.ppo_policy_loss(lp, old, adv, mask, **kw, backend=backend)


@pytest.mark.parametrize("mode", ["geo_mean", "vespo", "sapo", "dro"])
def test_opcheck_and_compile_modes(mode):
    """The C++ op with each mode's loss_params: schema, fake kernel ([B, 4] row stats),
    autograd; and a mode through torch.compile(fullgraph=True) equals eager."""
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    lp, old, adv, mask = _inputs(4, 19, torch.float32, "cpu", garbage=False)
    ref, ent, w = _extras(lp)
    x = lp.clone().requires_grad_()
    r = ref.clone().requires_grad_()
    args = (
        x,
        old,
        adv,
        mask,
        r,
        None,
        w,
        MODES[mode]["loss"].mode,
        list(MODES[mode]["loss"].params()),
        20.0,
        "seq-mean-token-mean",
        None,
        7.0,
        0.1,
        "k3",
        None,
        0.0,
    )
    torch.library.opcheck(torch.ops.ppokernels.ppo_policy_loss.default, args)
    kw = _mode(mode)

    def step(a):
        return ppokernels.ppo_policy_loss(a, old, adv, mask, is_weights=w, **kw, backend="cpp").loss

    y = lp.clone().requires_grad_()
    eager, compiled = step(x), torch.compile(step, fullgraph=True)(y)
    torch.testing.assert_close(compiled, eager)
    (gx,) = torch.autograd.grad(eager, x)
    (gy,) = torch.autograd.grad(compiled, y)
    torch.testing.assert_close(gy, gx)
