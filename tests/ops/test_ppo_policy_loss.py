import math

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.losses import AGG_MODES, GSPO, Clip
from ppokernels.testing import TOL, assert_close_to_reference, backend_params, binary_skip_reason

PARAMS = backend_params()
KERNELS = [p for p in PARAMS if p[1] != "reference"]
AGGS = list(AGG_MODES)
CLIPS = {
    "symmetric": dict(loss=Clip(0.2)),
    "asymmetric": dict(loss=Clip(0.2, 0.28)),
    "dual": dict(loss=Clip(0.1, 0.3, dual_clip=3.0)),
}


def _tol(dtype, backend):
    # Triton takes its scalars (clip bounds, coefficients) as fp32 even for fp64 data
    return TOL[torch.float32] if backend == "triton" else TOL[dtype]


def _mask(B, T, device):
    m = torch.rand(B, T) < 0.75
    m[1] = False  # an all-masked row
    m[2, T // 2 :] = False  # right padding
    m[0, :3] = False  # a hole at the start
    return m.to(device)


def _policy_inputs(B, T, dtype, device, *, adv_per_seq=False, garbage=True):
    g = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    lp = -torch.rand(B, T, dtype=torch.float64) * 3
    old = lp + 0.4 * g(B, T)
    adv = g(B) if adv_per_seq else g(B, T)
    mask = _mask(B, T, "cpu")
    if garbage:  # padding holds anything; it must not leak into the loss or the gradient
        lp = lp.masked_fill(~mask, float("nan"))
        old = old.masked_fill(~mask, float("-inf"))
    t = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return t(lp), t(old), t(adv), mask.to(device)


def _extras(lp, *, seed=1):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.nan_to_num(lp.detach().cpu().double(), nan=-1.0)
    ref = clean + 0.3 * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    ent = torch.rand(clean.shape, generator=gen, dtype=torch.float64) * 2
    w = torch.rand(clean.shape, generator=gen, dtype=torch.float64) + 0.5
    return [x.to(device=lp.device, dtype=lp.dtype) for x in (ref, ent, w)]


def _check_policy(device, backend, dtype, *, B=5, T=37, adv_per_seq=False, grads=("lp",), **kw):
    """ppo_policy_loss on ``backend`` vs the fp64 reference: loss, metrics, gradients."""
    lp, old, adv, mask = _policy_inputs(B, T, dtype, device, adv_per_seq=adv_per_seq)
    ref, ent, w = _extras(lp)
    use = {"ref": "ref_logprobs" in kw, "ent": "entropy" in kw, "w": "is_weights" in kw}
    if use["w"] and kw["is_weights"] == "row":
        w = w[:, 0]
    kw = {k: v for k, v in kw.items() if k not in ("ref_logprobs", "entropy", "is_weights")}
    lp = lp.requires_grad_()
    ref, ent = ref.requires_grad_(), ent.requires_grad_()
    opt = dict(
        ref_logprobs=ref if use["ref"] else None,
        entropy=ent if use["ent"] else None,
        is_weights=w if use["w"] else None,
    )
    out = ppokernels.ppo_policy_loss(lp, old, adv, mask, **kw, **opt, backend=backend)
    c64 = lambda x: x.detach().cpu().double()  # noqa: E731
    lp64, ref64, ent64 = (c64(x).requires_grad_() for x in (lp, ref, ent))
    opt64 = dict(
        ref_logprobs=ref64 if use["ref"] else None,
        entropy=ent64 if use["ent"] else None,
        is_weights=c64(w) if use["w"] else None,
    )
    exp = reference.ppo_policy_loss(lp64, c64(old), c64(adv), mask.cpu(), **kw, **opt64)
    tol = _tol(dtype, backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.loss.dtype == acc and out.loss.dim() == 0
    for name in exp._fields:
        e, o = getattr(exp, name), getattr(out, name)
        assert (e is None) == (o is None), name
        if e is not None:
            assert o.dim() == 0 and (name == "loss") == o.requires_grad, name
            torch.testing.assert_close(c64(o), e, **tol, msg=name)
    gscale = torch.randn((), dtype=torch.float64) + 2.0  # random upstream gradient
    wrt = {"lp": (lp, lp64), "ref": (ref, ref64), "ent": (ent, ent64)}
    ins = [wrt[g] for g in grads]
    got = torch.autograd.grad(out.loss, [a for a, _ in ins], gscale.to(out.loss.dtype))
    want = torch.autograd.grad(exp.loss, [b for _, b in ins], gscale)
    for g, a, b in zip(grads, got, want, strict=True):
        assert torch.isfinite(a).all(), g
        assert (a[~mask] == 0).all(), g
        torch.testing.assert_close(c64(a), b, **tol, msg=g)


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_clip_and_agg(device, backend, clip, agg, dtype):
    _check_policy(device, backend, dtype, agg=agg, **CLIPS[clip])


FEATURES = {
    "adv_per_seq": dict(adv_per_seq=True),
    "sequence_ratio": dict(loss=GSPO(), agg="seq-mean-token-mean"),
    "sequence_ratio_token_mean_dual": dict(loss=GSPO(dual_clip=2.0)),
    "kl_k3": dict(ref_logprobs=True, kl_coef=0.1, grads=("lp", "ref")),
    "kl_k1plus_clamped": dict(
        ref_logprobs=True, kl_coef=0.5, kl_estimator="k1+", kl_clamp=0.2, grads=("lp", "ref")
    ),
    "kl_abs_k2": dict(ref_logprobs=True, kl_coef=0.3, kl_estimator="k2", grads=("lp", "ref")),
    "entropy": dict(entropy=True, entropy_coef=0.01, grads=("lp", "ent")),
    "entropy_metric_only": dict(entropy=True, agg="seq-mean-token-sum"),
    "is_weights_token": dict(is_weights="token", loss=Clip(dual_clip=3.0)),
    "is_weights_row": dict(is_weights="row"),
    "num_tokens": dict(num_tokens=500.0),
    "num_seqs": dict(num_seqs=16.0, agg="seq-mean-token-mean"),
    "no_logratio_clamp": dict(logratio_clamp=None),
    "everything": dict(
        ref_logprobs=True,
        kl_coef=0.05,
        entropy=True,
        entropy_coef=0.02,
        is_weights="token",
        loss=Clip(0.2, 0.3, dual_clip=2.5),
        agg="seq-mean-token-sum-norm",
        num_seqs=8.0,
        grads=("lp", "ref", "ent"),
    ),
}


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_features(device, backend, feature, dtype):
    _check_policy(device, backend, dtype, **FEATURES[feature])


@pytest.mark.parametrize("device, backend", PARAMS)
def test_gradcheck(device, backend):
    lp, old, adv, mask = _policy_inputs(3, 6, torch.float64, device, garbage=False)
    ref, ent, w = _extras(lp)

    def policy(a, r, e):
        return ppokernels.ppo_policy_loss(
            a,
            old,
            adv,
            mask,
            loss=Clip(0.2, 0.3, dual_clip=2.0),
            ref_logprobs=r,
            kl_coef=0.1,
            entropy=e,
            entropy_coef=0.05,
            is_weights=w,
            agg="seq-mean-token-mean",
            backend=backend,
        ).loss

    assert torch.autograd.gradcheck(policy, tuple(x.requires_grad_() for x in (lp, ref, ent)))

    def gspo(a):
        return ppokernels.ppo_policy_loss(a, old, adv, mask, loss=GSPO(), backend=backend).loss

    # the sequence ratio's gradient is straight-through by design, so only check it runs
    gspo(lp).backward()


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked(device, backend, agg):
    lp, old, adv, mask = _policy_inputs(3, 9, torch.float32, device)
    ref, ent, _ = _extras(lp)
    for m in (torch.zeros_like(mask), mask):  # an all-masked batch, then all-masked rows
        x = lp.detach().clone().requires_grad_()
        kw = dict(agg=agg, ref_logprobs=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.1)
        out = ppokernels.ppo_policy_loss(x, old, adv, m, **kw, backend=backend)
        for name in out._fields:
            assert torch.isfinite(getattr(out, name)), name
            if not m.any():
                assert getattr(out, name).item() == 0.0, name
        (g,) = torch.autograd.grad(out.loss, x)
        assert torch.isfinite(g).all() and (g[~m] == 0).all()
    empty = torch.zeros(0, 5, device=device)
    out = ppokernels.ppo_policy_loss(empty, empty, empty, empty.bool(), agg=agg, backend=backend)
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("device, backend", PARAMS)
def test_logratio_clamped(device, backend):
    old = torch.full((2, 8), -5.0, device=device)
    delta = torch.tensor([50.0, -50.0, 19.0, -19.0, 0.1, -0.1, 25.0, -25.0], device=device)
    lp = (old + delta).requires_grad_()
    adv = torch.tensor([1.0, -1.0], device=device)[:, None].expand(2, 8).contiguous()
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    for dual in (None, 3.0):
        spec = Clip(dual_clip=dual)
        out = ppokernels.ppo_policy_loss(lp, old, adv, mask, loss=spec, backend=backend)
        exp = reference.ppo_policy_loss(
            lp.detach().cpu().double(),
            old.cpu().double(),
            adv.cpu().double(),
            mask.cpu(),
            loss=spec,
        )
        assert torch.isfinite(out.loss)
        torch.testing.assert_close(out.loss.cpu().double(), exp.loss, rtol=1e-5, atol=1e-5)
        clamped = delta.clamp(-20, 20).double()
        assert math.isclose(out.approx_kl.item(), -clamped.mean().item(), rel_tol=1e-5)
        (g,) = torch.autograd.grad(out.loss, lp)
        assert torch.isfinite(g).all()
        assert (g[:, delta.abs() > 20] == 0).all()  # clamped log-ratios pass no gradient


@pytest.mark.parametrize("device, backend", KERNELS)
def test_low_precision(device, backend):
    lp, old, adv, mask = _policy_inputs(8, 300, torch.bfloat16, device, garbage=False)
    out = ppokernels.ppo_policy_loss(lp, old, adv, mask, backend=backend)
    c = lambda x: x.cpu().double()  # noqa: E731
    exp = reference.ppo_policy_loss(c(lp), c(old), c(adv), mask.cpu())
    # what a trainer computes in the input dtype
    r = torch.exp(lp - old)
    pg = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    eager = (pg * mask).sum() / mask.sum()
    assert out.loss.dtype == torch.float32
    assert_close_to_reference(out.loss, exp.loss, eager.float())


@pytest.mark.parametrize("device, backend", KERNELS)
def test_mixed_dtypes(device, backend):
    lp, old, adv, mask = _policy_inputs(4, 50, torch.float32, device, garbage=False)
    ref, ent, _ = _extras(lp)
    x = lp.bfloat16().requires_grad_()
    kw = dict(ref_logprobs=ref, kl_coef=0.1, entropy=ent.bfloat16(), backend=backend)
    out = ppokernels.ppo_policy_loss(x, old, adv, mask, **kw)
    exp = ppokernels.ppo_policy_loss(x.detach().float(), old, adv, mask, **kw)
    torch.testing.assert_close(out.loss, exp.loss)
    (g,) = torch.autograd.grad(out.loss, x)
    assert g.dtype == torch.bfloat16
    v = ppokernels.value_loss(x, old.double(), adv, mask, clip=0.2, backend=backend)
    assert v.loss.dtype == torch.float64


def test_deterministic_and_batch_invariant():
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    lp, old, adv, mask = _policy_inputs(6, 333, torch.float32, "cpu", garbage=False)
    outs = [ppokernels.ppo_policy_loss(lp, old, adv, mask, agg="token-sum") for _ in range(2)]
    assert outs[0].loss.item() == outs[1].loss.item()
    x = lp[:3].clone().requires_grad_()
    (g3,) = torch.autograd.grad(
        ppokernels.ppo_policy_loss(x, old[:3], adv[:3], mask[:3], agg="token-sum").loss, x
    )
    y = lp.clone().requires_grad_()
    (g6,) = torch.autograd.grad(
        ppokernels.ppo_policy_loss(y, old, adv, mask, agg="token-sum").loss, y
    )
    assert torch.equal(g3, g6[:3])  # the same row gives the same bits whatever the batch


def test_opcheck_and_compile():
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    lp, old, adv, mask = _policy_inputs(4, 19, torch.float32, "cpu", garbage=False)
    ref, ent, w = _extras(lp)
    for args in [
        (
            None,
            None,
            None,
            "vanilla",
            [0.2, 0.2, math.inf],
            20.0,
            "token-mean",
            None,
            None,
            0.0,
            "k3",
            None,
            0.0,
        ),
        (
            ref,
            ent,
            w[:, 0],
            "gspo",
            [0.2, 0.3, 3.0, math.inf],
            None,
            "seq-mean-token-mean",
            None,
            7.0,
            0.1,
            "k3+",
            10.0,
            0.01,
        ),
    ]:
        x = lp.clone().requires_grad_()
        r, e = (None if t is None else t.clone().requires_grad_() for t in args[:2])
        torch.library.opcheck(
            torch.ops.ppokernels.ppo_policy_loss.default, (x, old, adv, mask, r, e, *args[2:])
        )

    def step(x, r, e):
        kw = dict(ref_logprobs=r, kl_coef=0.1, entropy=e, entropy_coef=0.01)
        kw["loss"] = Clip(dual_clip=3.0)
        out = ppokernels.ppo_policy_loss(x, old, adv, mask, **kw, backend="cpp")
        return out.loss + out.clipfrac

    fn = torch.compile(step, fullgraph=True)
    xs = [t.clone().requires_grad_() for t in (lp, ref, ent)]
    ys = [t.clone().requires_grad_() for t in (lp, ref, ent)]
    got, want = fn(*xs), step(*ys)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, xs), torch.autograd.grad(want, ys), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_opcheck_cuda():
    lp, old, adv, mask = _policy_inputs(4, 19, torch.float32, "cuda", garbage=False)
    args = (
        None,
        None,
        None,
        0.2,
        0.2,
        3.0,
        20.0,
        "token",
        "token-mean",
        None,
        None,
        0.0,
        "k3",
        None,
        0.0,
    )
    for name in ["ppo_policy_loss", "ppo_policy_loss_triton"]:
        torch.library.opcheck(
            getattr(torch.ops.ppokernels, name).default,
            (lp.clone().requires_grad_(), old, adv, mask, *args),
        )


def test_bad_input():
    lp, old, adv, mask = _policy_inputs(3, 5, torch.float32, "cpu", garbage=False)
    f = ppokernels.ppo_policy_loss
    cases = [
        (ValueError, "ppo_policy_loss: old_logprobs has shape", dict(old_logprobs=old[:, :4])),
        (ValueError, "ppo_policy_loss: logprobs must have 2 dimensions", dict(logprobs=lp[0])),
        (ValueError, "ppo_policy_loss: advantages must have shape", dict(advantages=adv[:2])),
        (ValueError, "ppo_policy_loss: mask has shape", dict(mask=mask[:2])),
        (TypeError, "ppo_policy_loss: logprobs must be float", dict(logprobs=lp.long())),
        (
            ValueError,
            "ppo_policy_loss: logprobs is on the meta device",
            dict(logprobs=lp.to("meta"), old_logprobs=old.to("meta")),
        ),
        (
            ValueError,
            "ppo_policy_loss: old_logprobs is on the meta",
            dict(old_logprobs=old.to("meta")),
        ),
        (TypeError, "ppo_policy_loss: loss must be a loss spec", dict(loss=0.2)),
        (ValueError, "ppo_policy_loss: loss: unknown loss mode 'seq'", dict(loss="seq")),
        (ValueError, "ppo_policy_loss: agg must be one of", dict(agg="mean")),
        (ValueError, "ppo_policy_loss: num_tokens must be > 0", dict(num_tokens=0)),
        (ValueError, "ppo_policy_loss: num_seqs must be > 0", dict(num_seqs=-3)),
        (ValueError, "ppo_policy_loss: kl_coef = 0.1 needs ref_logprobs", dict(kl_coef=0.1)),
        (ValueError, "ppo_policy_loss: entropy_coef = 0.1 needs entropy", dict(entropy_coef=0.1)),
        (ValueError, "ppo_policy_loss: kl_estimator", dict(ref_logprobs=lp, kl_estimator="k4")),
        (ValueError, "ppo_policy_loss: ref_logprobs has shape", dict(ref_logprobs=lp[:2])),
        (ValueError, "ppo_policy_loss: is_weights must have shape", dict(is_weights=adv[:, :2])),
        (
            ValueError,
            "ppo_policy_loss: advantages requires grad",
            dict(advantages=adv.clone().requires_grad_()),
        ),
        (ValueError, "ppo_policy_loss: backend", dict(backend="fast")),
    ]
    base = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
    for exc, msg, kw in cases:
        args = {**base, **kw}
        pos = [args.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
        with pytest.raises(exc, match=msg):
            f(*pos, **args)
