"""ppo_policy_loss: the conformance blocks from ``ppokernels.testing`` over every loss spec
(ppokernels.losses) x aggregation, PPO's clip variants, per-row advantages and importance
weights, the KL and entropy terms (gradients to ref_logprobs and entropy), global normalisers;
NaN / -inf padding at masked positions, all-masked rows and batches, bad input. Then what is
special to the op: the log-ratio clamp, low-precision and mixed dtypes, batch invariance, exact
zero gradients off the mask. (test_ppo_policy_loss_modes.py: what is special to the modes.)"""

import inspect
import math

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.losses import (
    AGG_MODES,
    CISPO,
    DPPOKL,
    DPPOTV,
    DRO,
    GPG,
    GSPO,
    SAPO,
    Clip,
    GeoMean,
    Vespo,
)
from ppokernels.ops.ppo_policy_loss import policy_options
from ppokernels.testing import (
    TOL,
    OpSpec,
    Sample,
    assert_close_to_reference,
    backend_params,
    binary_skip_reason,
    conformance_tests,
)

PARAMS = backend_params()
KERNELS = [p for p in PARAMS if p[1] != "reference"]
AGGS = list(AGG_MODES)
CLIPS = {
    "symmetric": dict(loss=Clip(0.2)),
    "asymmetric": dict(loss=Clip(0.2, 0.28)),
    "dual": dict(loss=Clip(0.1, 0.3, dual_clip=3.0)),
}
# one configuration per loss spec, with its own options; clip_high != clip_low everywhere
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
# the modes whose gradient is the derivative of their forward (no stop-gradient inside)
GRADCHECK_MODES = ["vanilla", "sapo", "gpg", "dro", "geo_mean"]


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


def _mode_inputs(B, T, dtype, device, *, adv_per_seq=False, garbage=True):
    lp, old, adv, mask = _policy_inputs(
        B, T, dtype, device, adv_per_seq=adv_per_seq, garbage=garbage
    )
    # probabilities stay below 1 (DPPO's binary KL takes log(1 - p_old))
    old = torch.where(mask, old.clamp(max=-1e-3), old)
    if not adv_per_seq:  # GMPO and SAPO branch on the sign of A: some exact zeros
        adv = torch.where(torch.rand(adv.shape, device=adv.device) < 0.1, 0.0, adv)
    return lp, old, adv, mask


def _extras(lp, *, seed=1):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.nan_to_num(lp.detach().cpu().double(), nan=-1.0)
    ref = clean + 0.3 * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    ent = torch.rand(clean.shape, generator=gen, dtype=torch.float64) * 2
    w = torch.rand(clean.shape, generator=gen, dtype=torch.float64) + 0.5
    return [x.to(device=lp.device, dtype=lp.dtype) for x in (ref, ent, w)]


def _sample(name, inputs, *, ref=False, ent=False, weights=None, **kw):
    """A Sample of ``inputs`` (lp, old, adv, mask) with the optional tensors of _extras:
    ``ref`` / ``ent`` (keyword tensors that take gradients), ``weights`` "token" or "row"."""
    r, e, w = _extras(inputs[0])
    if ref:
        kw["ref_logprobs"] = r
    if ent:
        kw["entropy"] = e
    if weights:
        kw["is_weights"] = w if weights == "token" else w[:, 0]
    return Sample(tuple(inputs), kw, name)


FEATURES = {
    "adv_per_seq": dict(adv_per_seq=True),
    "sequence_ratio": dict(loss=GSPO(), agg="seq-mean-token-mean"),
    "sequence_ratio_token_mean_dual": dict(loss=GSPO(dual_clip=2.0)),
    "kl_k3": dict(ref=True, kl_coef=0.1),
    "kl_k1plus_clamped": dict(ref=True, kl_coef=0.5, kl_estimator="k1+", kl_clamp=0.2),
    "kl_abs_k2": dict(ref=True, kl_coef=0.3, kl_estimator="k2"),
    "entropy": dict(ent=True, entropy_coef=0.01),
    "entropy_metric_only": dict(ent=True, agg="seq-mean-token-sum"),
    "is_weights_token": dict(weights="token", loss=Clip(dual_clip=3.0)),
    "is_weights_row": dict(weights="row"),
    "num_tokens": dict(num_tokens=500.0),
    "num_seqs": dict(num_seqs=16.0, agg="seq-mean-token-mean"),
    "no_logratio_clamp": dict(logratio_clamp=None),
    "everything": dict(
        ref=True,
        kl_coef=0.05,
        ent=True,
        entropy_coef=0.02,
        weights="token",
        loss=Clip(0.2, 0.3, dual_clip=2.5),
        agg="seq-mean-token-sum-norm",
        num_seqs=8.0,
    ),
}
MODE_FEATURES = {
    "adv_per_seq": dict(adv_per_seq=True),
    "weights_token": dict(weights="token"),
    "weights_row": dict(weights="row", adv_per_seq=True),
    "kl_entropy": dict(ref=True, kl_coef=0.1, ent=True, entropy_coef=0.02, weights="token"),
}


def samples(device, dtype):
    out = []
    for clip, kw in CLIPS.items():
        for agg in AGGS:
            out.append(
                _sample(f"{clip}-{agg}", _policy_inputs(5, 37, dtype, device), **kw, agg=agg)
            )
    for name, kw in FEATURES.items():
        kw = dict(kw)
        inputs = _policy_inputs(5, 37, dtype, device, adv_per_seq=kw.pop("adv_per_seq", False))
        out.append(_sample(name, inputs, **kw))
    for mode, kw in MODES.items():
        for agg in AGGS:
            out.append(_sample(f"{mode}-{agg}", _mode_inputs(5, 37, dtype, device), **kw, agg=agg))
    for mode, kw in MODES.items():
        if mode != kw["loss"].mode:  # each spec's own options once
            continue
        for name, feature in MODE_FEATURES.items():
            feature = dict(feature)
            per_seq = feature.pop("adv_per_seq", False)
            inputs = _mode_inputs(5, 37, dtype, device, adv_per_seq=per_seq)
            kw = dict(kw, agg="seq-mean-token-mean", num_seqs=7.0)
            out.append(_sample(f"{mode}-{name}", inputs, **kw, **feature))
    # gradcheck-sized: every term at once, and the modes without a stop-gradient
    small = _policy_inputs(3, 6, dtype, device, garbage=False)
    everything = dict(ref=True, kl_coef=0.1, ent=True, entropy_coef=0.05, weights="token")
    clip = Clip(0.2, 0.3, dual_clip=2.0)
    out.append(_sample("small-everything", small, **everything, loss=clip, agg=AGGS[2]))
    for mode in GRADCHECK_MODES:
        inputs = _mode_inputs(3, 7, dtype, device, garbage=False)
        out.append(_sample(f"small-{mode}", inputs, weights="token", **MODES[mode]))
    # for opcheck and compile (no NaN padding): the defaults, and every optional argument
    out.append(_sample("clean-default", _policy_inputs(4, 19, dtype, device, garbage=False)))
    out.append(
        _sample(
            "clean-gspo-everything",
            _policy_inputs(4, 19, dtype, device, garbage=False),
            ref=True,
            ent=True,
            weights="row",
            loss=GSPO(0.2, 0.3, dual_clip=3.0),
            agg="seq-mean-token-mean",
            num_seqs=7.0,
            kl_coef=0.1,
            kl_estimator="k3+",
            kl_clamp=10.0,
            entropy_coef=0.01,
        )
    )
    for mode in ["geo_mean", "vespo", "sapo", "dro"]:
        inputs = _mode_inputs(4, 19, dtype, device, garbage=False)
        kw = dict(MODES[mode], agg="seq-mean-token-mean", num_seqs=7.0, kl_coef=0.1)
        out.append(_sample(f"clean-{mode}", inputs, ref=True, weights="token", **kw))
    z = torch.zeros(0, 5, dtype=dtype, device=device)
    out.append(Sample((z, z, z, z.bool()), dict(agg="seq-mean-token-mean"), "empty"))
    return out


def masked_samples(device, dtype):
    """All-masked rows, then an all-masked batch, under every aggregation and every loss spec,
    with the KL, entropy and importance-weight terms; NaN goes to every [B, T] float tensor's
    masked positions (the harness)."""
    out = []
    terms = dict(ref=True, kl_coef=0.1, ent=True, entropy_coef=0.1, weights="token")
    for agg in AGGS:
        lp, old, adv, mask = _policy_inputs(3, 9, dtype, device, garbage=False)
        out.append(_sample(f"rows-{agg}", (lp, old, adv, mask), **terms, agg=agg))
        none = torch.zeros_like(mask)
        out.append(_sample(f"all-{agg}", (lp, old, adv, none), **terms, agg=agg))
    for mode, kw in MODES.items():
        inputs = _mode_inputs(3, 9, dtype, device, garbage=False)
        out.append(_sample(f"rows-{mode}", inputs, **terms, **kw))
    return out


_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(ppokernels.ppo_policy_loss).parameters.items()
    if p.kind is p.KEYWORD_ONLY and k != "backend"
}


def _opcheck(s):
    """The C++ op's arguments for a sample: its tensors (the differentiable ones leaves), then
    the checked scalars of ``policy_options``."""
    kw = _DEFAULTS | s.kwargs
    tensors = [kw.pop(k) for k in ("ref_logprobs", "entropy", "is_weights")]
    _, options = policy_options(
        "ppo_policy_loss",
        **kw,
        has_ref=tensors[0] is not None,
        has_entropy=tensors[1] is not None,
    )
    lp, old, adv, mask = s.args
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
    ref, ent, w = leaf(tensors[0]), leaf(tensors[1]), tensors[2]
    args = (leaf(lp), old, adv, mask, ref, ent, w, *options)
    return [(torch.ops.ppokernels.ppo_policy_loss.default, args)]


def _bad_inputs():
    lp, old, adv, mask = _policy_inputs(3, 5, torch.float32, "cpu", garbage=False)

    def call(**change):
        args = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask) | change
        pos = [args.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
        return lambda: ppokernels.ppo_policy_loss(*pos, **args)

    meta = dict(logprobs=lp.to("meta"), old_logprobs=old.to("meta"))
    name = "ppo_policy_loss"
    return [
        (call(old_logprobs=old[:, :4]), ValueError, f"{name}: old_logprobs has shape"),
        (call(logprobs=lp[0]), ValueError, f"{name}: logprobs must have 2 dimensions"),
        (call(advantages=adv[:2]), ValueError, f"{name}: advantages must have shape"),
        (call(mask=mask[:2]), ValueError, f"{name}: mask has shape"),
        (call(logprobs=lp.long()), TypeError, f"{name}: logprobs must be float"),
        (call(**meta), ValueError, f"{name}: logprobs is on the meta device"),
        (call(old_logprobs=old.to("meta")), ValueError, f"{name}: old_logprobs is on the meta"),
        (call(loss=0.2), TypeError, f"{name}: loss must be a loss spec"),
        (call(loss="seq"), ValueError, f"{name}: loss: unknown loss mode 'seq'"),
        (call(agg="mean"), ValueError, f"{name}: agg must be one of"),
        (call(num_tokens=0), ValueError, f"{name}: num_tokens must be > 0"),
        (call(num_seqs=-3), ValueError, f"{name}: num_seqs must be > 0"),
        (call(kl_coef=0.1), ValueError, f"{name}: kl_coef = 0.1 needs ref_logprobs"),
        (call(entropy_coef=0.1), ValueError, f"{name}: entropy_coef = 0.1 needs entropy"),
        (call(ref_logprobs=lp, kl_estimator="k4"), ValueError, f"{name}: kl_estimator"),
        (call(ref_logprobs=lp[:2]), ValueError, f"{name}: ref_logprobs has shape"),
        (call(is_weights=adv[:, :2]), ValueError, f"{name}: is_weights must have shape"),
        (
            call(advantages=adv.clone().requires_grad_()),
            ValueError,
            f"{name}: advantages requires grad",
        ),
        (call(backend="fast"), ValueError, f"{name}: backend"),
    ]


SPEC = OpSpec(
    name="ppo_policy_loss",
    fn=ppokernels.ppo_policy_loss,
    reference=reference.ppo_policy_loss,
    samples=samples,
    differentiable=(0, "ref_logprobs", "entropy"),
    masked_sample=masked_samples,
    mask_arg=3,
    bad_inputs=_bad_inputs(),
    opcheck=_opcheck,
    tolerances=_tol,
    gradcheck_samples=["small-everything"] + [f"small-{m}" for m in GRADCHECK_MODES],
    opcheck_samples=["clean-default", "clean-gspo-everything"]
    + [f"clean-{m}" for m in ["geo_mean", "vespo", "sapo", "dro"]],
    compile_samples=["clean-default", "clean-gspo-everything", "clean-sapo"],
)
globals().update(conformance_tests(SPEC))


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("mode", list(MODES))
def test_no_gradient_off_the_mask(device, backend, mode):
    """Exactly 0 (not merely close to it) at masked positions, where the padding is NaN."""
    lp, old, adv, mask = _mode_inputs(5, 37, torch.float32, device)
    ref, ent, _ = _extras(lp)
    xs = [t.detach().requires_grad_() for t in (lp, ref, ent)]
    kw = dict(MODES[mode], ref_logprobs=xs[1], kl_coef=0.1, entropy=xs[2], entropy_coef=0.1)
    out = ppokernels.ppo_policy_loss(xs[0], old, adv, mask, **kw, backend=backend)
    for g in torch.autograd.grad(out.loss, xs):
        assert torch.isfinite(g).all() and (g[~mask] == 0).all()


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
