"""gae and discounted_returns: the conformance blocks from ``ppokernels.testing`` (both modes,
odd and tiled shapes, empty input, all-masked rows with NaN padding, bad input), then what is
special to the scans: the trainers' own loops, long rows, low-precision inputs, NaN at a valid
position."""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import TOL, OpSpec, Sample, backend_params, conformance_tests

PARAMS = backend_params()
MODES = ["skip", "zero"]


def _mask(B, T, kind):
    if kind == "holes":
        m = torch.rand(B, T) > 0.3
    elif kind == "padded":  # left prompt-side zeros, right padding, a multi-turn hole
        m = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            lo, hi = b % 3, max(T - 1 - 2 * b, 1)
            m[b, lo:hi] = True
            if hi - lo > 6:
                m[b, lo + 2 : lo + 4] = False
    else:
        m = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        m[-1] = False  # an all-masked row
    return m


def _inputs(B, T, dtype, device, kind="holes"):
    r = torch.randn(B, T, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(B, T, dtype=torch.float64).to(device=device, dtype=dtype)
    return r, v, _mask(B, T, kind).to(device)


def _loop_verl(r, v, m, gamma, lam):
    """veRL 0.9.1's compute_gae_advantage_return (verl/trainer/ppo/core_algos.py), by scalars."""
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        nv = a = 0.0
        for t in reversed(range(T)):
            mt = float(m[b, t])
            delta = float(r[b, t]) + gamma * nv - float(v[b, t])
            a_new = delta + gamma * lam * a
            nv = mt * float(v[b, t]) + (1 - mt) * nv
            a = mt * a_new + (1 - mt) * a
            adv[b, t] = a
    return adv, adv + v.double()


def _loop_openrlhf(r, v, m, gamma, lam):
    """OpenRLHF 0.11.2's get_advantages_and_returns (ppo_utils/experience_maker.py)."""
    v, r = v.double() * m, r.double() * m
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = 0.0
        for t in reversed(range(T)):
            nv = float(v[b, t + 1]) if t + 1 < T else 0.0
            last = float(r[b, t]) + gamma * nv - float(v[b, t]) + gamma * lam * last
            adv[b, t] = last
    return adv, adv + v


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["holes", "padded", "full"])
def test_matches_trainer_loops(device, backend, mode, kind):
    r, v, m = _inputs(5, 23, torch.float64, device, kind)
    adv, ret = ppokernels.gae(r, v, m, gamma=0.97, lam=0.9, mode=mode, backend=backend)
    loop = _loop_verl if mode == "skip" else _loop_openrlhf
    e_adv, e_ret = loop(r.cpu(), v.cpu(), m.cpu(), 0.97, 0.9)
    torch.testing.assert_close(adv.cpu(), e_adv, **TOL[torch.float64])
    torch.testing.assert_close(ret.cpu(), e_ret, **TOL[torch.float64])


# (37, 512): two full groups of 16 SIMD rows and a partial one on the CPU, rows a multiple of
# 1 KiB (the skewed tiles of cpu_tile.h); (20, 300): unskewed, a partial last tile
SHAPES = [(1, 1), (3, 7), (4, 130), (2, 1500), (37, 512), (20, 300)]


def _tol(dtype, backend):
    # long scans accumulate rounding: fp32 error grows ~ with the effective horizon 1/(1-gamma lam)
    return TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def gae_samples(device, dtype):
    out = []
    for mode in MODES:
        for B, T in SHAPES:
            r, v, m = _inputs(B, T, dtype, device)
            kw = dict(gamma=0.99, lam=0.95, mode=mode)
            out.append(Sample((r, v, m), kw, f"{mode}-{B}x{T}"))
        # gradcheck-sized, prompt-side zeros, right padding and a multi-turn hole
        kw = dict(gamma=0.9, lam=0.8, mode=mode)
        out.append(Sample(_inputs(3, 9, dtype, device, "padded"), kw, f"{mode}-padded"))
    for B, T in [(0, 5), (3, 0)]:
        out.append(Sample(_inputs(B, T, dtype, device), dict(gamma=0.9, lam=0.9), f"empty-{B}x{T}"))
    return out


def gae_masked(device, dtype):
    return [
        Sample(_inputs(4, 12, dtype, device, kind), dict(gamma=0.9, lam=0.8, mode=mode), mode)
        for mode in MODES
        for kind in ["holes", "padded"]
    ]


def _gae_bad_inputs():
    r, v, m = _inputs(2, 5, torch.float32, "cpu")
    gae = ppokernels.gae
    return [
        (lambda: gae(r, v, m, gamma=1.5), ValueError, "gae: gamma must be in"),
        (lambda: gae(r, v, m, lam=-0.1), ValueError, "gae: lam must be in"),
        (
            lambda: gae(r, v, m, gamma=torch.tensor(0.9)),
            TypeError,
            "gae: gamma must be a Python float",
        ),
        (lambda: gae(r, v, m, mode="carry"), ValueError, "gae: mode must be one of"),
        (lambda: gae(r, v[:, :4], m), ValueError, "gae: values has shape"),
        (lambda: gae(r, v, m[:1]), ValueError, "gae: mask has shape"),
        (lambda: gae(r.long(), v, m), TypeError, "gae: rewards must be float"),
        (lambda: gae(r, v.double(), m), TypeError, "gae: values is torch.float64"),
        (lambda: gae(r, v, m.to("meta")), ValueError, "gae: mask is on meta"),
        (
            lambda: gae(r[0, 0], v[0, 0], m[0, 0]),
            ValueError,
            "gae: rewards must have a time dimension",
        ),
    ]


def _gae_opcheck(s):
    kw = dict(gamma=1.0, lam=1.0, mode="skip") | s.kwargs
    r, v, m = s.args
    args = (r.requires_grad_(), v.requires_grad_(), m, kw["gamma"], kw["lam"], kw["mode"])
    return [(torch.ops.ppokernels.gae.default, args)]


GAE = OpSpec(
    name="gae",
    fn=ppokernels.gae,
    reference=reference.gae,
    samples=gae_samples,
    differentiable=(0, 1),
    masked_sample=gae_masked,
    mask_arg=2,
    bad_inputs=_gae_bad_inputs(),
    opcheck=_gae_opcheck,
    tolerances=_tol,
    gradcheck_samples=["skip-padded", "zero-padded"],
    opcheck_samples=["skip-3x7", "zero-3x7"],
)
globals().update(conformance_tests(GAE))


def returns_samples(device, dtype):
    out = []
    for mode in MODES:
        for B, T in [(4, 300), (18, 256)]:
            r, _, m = _inputs(B, T, dtype, device)
            out.append(Sample((r, m), dict(gamma=0.9, mode=mode), f"{mode}-{B}x{T}"))
        r, _, m = _inputs(3, 9, dtype, device, "padded")
        out.append(Sample((r, m), dict(gamma=0.7, mode=mode), f"{mode}-padded"))
    r, _, m = _inputs(0, 5, dtype, device)
    out.append(Sample((r, m), dict(gamma=0.5), "empty"))
    return out


def returns_masked(device, dtype):
    return [
        Sample(_inputs(4, 12, dtype, device, "holes")[::2], dict(gamma=0.9, mode=mode), mode)
        for mode in MODES
    ]


def _returns_opcheck(s):
    kw = dict(gamma=1.0, mode="skip") | s.kwargs
    r, m = s.args
    return [(torch.ops.ppokernels.discounted_returns.default, (r, m, kw["gamma"], kw["mode"]))]


def _returns_bad_inputs():
    r, _, m = _inputs(2, 5, torch.float32, "cpu")
    dr = ppokernels.discounted_returns
    return [(lambda: dr(r, m, gamma=2.0), ValueError, "discounted_returns: gamma must be in")]


RETURNS = OpSpec(
    name="discounted_returns",
    fn=ppokernels.discounted_returns,
    reference=reference.discounted_returns,
    samples=returns_samples,
    differentiable=(0,),
    masked_sample=returns_masked,
    mask_arg=1,
    bad_inputs=_returns_bad_inputs(),
    opcheck=_returns_opcheck,
    tolerances=_tol,
    gradcheck_samples=["skip-padded", "zero-padded"],
    opcheck_samples=["skip-4x300", "zero-4x300"],
)
globals().update(conformance_tests(RETURNS, prefix="discounted_returns"))


@pytest.mark.parametrize("mode", MODES)
def test_discounted_returns_is_gae_with_zero_values(mode):
    r, _, m = _inputs(4, 300, torch.float64, "cpu")
    expect = reference.discounted_returns(r, m, gamma=0.9, mode=mode)
    via_gae = reference.gae(r, torch.zeros_like(r), m, gamma=0.9, lam=1.0, mode=mode)[0]
    torch.testing.assert_close(expect, via_gae)


@pytest.mark.parametrize("device, backend", [p for p in PARAMS if p[1] != "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_long_rows(device, backend, mode):
    """T >= 32768 on the C++ kernels (several tiles on GPUs; on CPUs the few rows are split into
    chunks, one per SIMD lane); Triton under the interpreter runs a shorter multi-tile row."""
    T = 32768 if backend == "cpp" or device == "cuda" else 3000
    r, v, m = _inputs(2, T, torch.float32, device, "holes")
    r.requires_grad_(True)
    v.requires_grad_(True)
    adv, ret = ppokernels.gae(r, v, m, gamma=1.0, lam=0.95, mode=mode, backend=backend)
    r64, v64 = r.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    e_adv, e_ret = reference.gae(r64, v64, m, gamma=1.0, lam=0.95, mode=mode)
    torch.testing.assert_close(adv.double(), e_adv, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ret.double(), e_ret, rtol=1e-4, atol=1e-3)
    g_adv, g_ret = torch.randn_like(e_adv), torch.randn_like(e_ret)
    grads = torch.autograd.grad((adv, ret), (r, v), (g_adv.float(), g_ret.float()))
    expect = torch.autograd.grad((e_adv, e_ret), (r64, v64), (g_adv, g_ret))
    for got, want in zip(grads, expect, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 50), (17, 256)], ids=str)
def test_low_precision_inputs(device, backend, dtype, shape):
    r, v, m = _inputs(*shape, dtype, device)
    r.requires_grad_(True)
    adv, ret = ppokernels.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    r64 = r.detach().double().requires_grad_()
    e_adv, e_ret = reference.gae(r64, v.double(), m, gamma=0.99, lam=0.95)
    assert adv.dtype == torch.float32  # fp32 scan whatever the input dtype
    torch.testing.assert_close(adv.double(), e_adv, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(e_adv)
    (dr,) = torch.autograd.grad((adv, ret), (r,), (g.float(), g.float()))
    (e_dr,) = torch.autograd.grad((e_adv, e_ret), (r64,), (g, g))
    assert dr.dtype == dtype  # the gradient in the input's dtype, rounded once
    torch.testing.assert_close(dr.double(), e_dr.to(dtype).double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device, backend", PARAMS)
def test_nan_at_a_valid_position_propagates(device, backend):
    r, v, m = _inputs(2, 10, torch.float32, device, "full")
    m[:, -3:] = False
    r[0, 3] = float("nan")  # a NaN reward at a valid position propagates backwards
    adv, _ = ppokernels.gae(r, v, m, gamma=0.9, lam=0.9, mode="zero", backend=backend)
    assert torch.isnan(adv[0, :4]).all() and torch.isfinite(adv[0, 4:]).all()
    assert torch.isfinite(adv[1]).all()
