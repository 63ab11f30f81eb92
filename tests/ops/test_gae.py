import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import TOL, backend_params, binary_skip_reason

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


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_backward(device, backend, mode, shape, dtype):
    B, T = shape
    r, v, m = _inputs(B, T, dtype, device)
    r.requires_grad_(True)
    v.requires_grad_(True)
    gamma, lam = 0.99, 0.95
    adv, ret = ppokernels.gae(r, v, m, gamma=gamma, lam=lam, mode=mode, backend=backend)
    r64, v64 = r.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    e_adv, e_ret = reference.gae(r64, v64, m, gamma=gamma, lam=lam, mode=mode)
    # long scans accumulate rounding: fp32 error grows ~ with the effective horizon 1/(1-gamma lam)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert adv.dtype == ret.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(adv.double(), e_adv, **tol)
    torch.testing.assert_close(ret.double(), e_ret, **tol)
    g_adv, g_ret = torch.randn_like(e_adv), torch.randn_like(e_ret)
    grads = torch.autograd.grad((adv, ret), (r, v), (g_adv.to(adv.dtype), g_ret.to(adv.dtype)))
    expect = torch.autograd.grad((e_adv, e_ret), (r64, v64), (g_adv, g_ret))
    for got, want in zip(grads, expect, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(4, 300), (18, 256)], ids=str)
def test_discounted_returns(device, backend, mode, shape):
    r, _, m = _inputs(*shape, torch.float64, device)
    r.requires_grad_(True)
    out = ppokernels.discounted_returns(r, m, gamma=0.9, mode=mode, backend=backend)
    r64 = r.detach().clone().requires_grad_()
    expect = reference.discounted_returns(r64, m, gamma=0.9, mode=mode)
    torch.testing.assert_close(out, expect, **TOL[torch.float64])
    via_gae = reference.gae(r64, torch.zeros_like(r64), m, gamma=0.9, lam=1.0, mode=mode)[0]
    torch.testing.assert_close(expect, via_gae)
    g = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, r, g)[0],
        torch.autograd.grad(expect, r64, g)[0],
        **TOL[torch.float64],
    )


@pytest.mark.parametrize("device, backend", PARAMS)
def test_gradcheck(device, backend):
    # the Triton interpreter is slow: fewer elements and gradcheck's fast mode there
    fast = backend == "triton" and device == "cpu"
    r, v, m = (
        _inputs(2, 5, torch.float64, device, "padded")
        if fast
        else _inputs(3, 9, torch.float64, device, "padded")
    )
    for mode in MODES:

        def fn(r, v, mode=mode):
            return ppokernels.gae(r, v, m, gamma=0.9, lam=0.8, mode=mode, backend=backend)

        assert torch.autograd.gradcheck(
            fn, (r.requires_grad_(), v.requires_grad_()), fast_mode=fast
        )

        def fn2(r, mode=mode):
            return ppokernels.discounted_returns(r, m, gamma=0.7, mode=mode, backend=backend)

        assert torch.autograd.gradcheck(fn2, (r,), fast_mode=fast)


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
def test_nan_handling_and_empty(device, backend):
    r, v, m = _inputs(2, 10, torch.float32, device, "full")
    m[:, -3:] = False
    r[:, -2] = float("nan")  # padding may hold anything: never read
    adv, _ = ppokernels.gae(r, v, m, gamma=0.9, lam=0.9, mode="skip", backend=backend)
    assert torch.isfinite(adv).all()
    r[0, 3] = float("nan")  # a NaN reward at a valid position propagates backwards
    adv, _ = ppokernels.gae(r, v, m, gamma=0.9, lam=0.9, mode="zero", backend=backend)
    assert torch.isnan(adv[0, :4]).all() and torch.isfinite(adv[0, 4:]).all()
    assert torch.isfinite(adv[1]).all()
    for shape in [(0, 5), (3, 0)]:
        z = torch.zeros(shape, device=device)
        a, ret = ppokernels.gae(z, z, z.bool(), gamma=0.9, lam=0.9, backend=backend)
        assert a.shape == ret.shape == shape
        assert ppokernels.discounted_returns(z, z, gamma=0.5, backend=backend).shape == shape


def test_opcheck_and_compile():
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    r, v, m = _inputs(3, 11, torch.float32, "cpu")
    for mode in MODES:
        torch.library.opcheck(
            torch.ops.ppokernels.gae.default,
            (r.requires_grad_(), v.requires_grad_(), m, 0.9, 0.8, mode),
        )
        torch.library.opcheck(torch.ops.ppokernels.discounted_returns.default, (r, m, 0.9, mode))

    def loss(r, v):
        adv, ret = ppokernels.gae(r, v, m, gamma=0.9, lam=0.8, backend="cpp")
        return adv.sum() + ret.square().sum() + ppokernels.discounted_returns(r, m).sum()

    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(compiled(r, v), loss(r, v))
    g1 = torch.autograd.grad(compiled(r, v), (r, v))
    g2 = torch.autograd.grad(loss(r, v), (r, v))
    torch.testing.assert_close(g1, g2)


@pytest.mark.cuda
def test_opcheck_cuda():
    r, v, m = _inputs(3, 11, torch.float32, "cuda")
    for name in ["gae", "gae_triton"]:
        torch.library.opcheck(
            getattr(torch.ops.ppokernels, name).default,
            (r.requires_grad_(), v.requires_grad_(), m, 0.9, 0.8, "skip"),
        )


def test_bad_input():
    r, v, m = _inputs(2, 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="gae: gamma must be in"):
        ppokernels.gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match="gae: lam must be in"):
        ppokernels.gae(r, v, m, lam=-0.1)
    with pytest.raises(TypeError, match="gae: gamma must be a Python float"):
        ppokernels.gae(r, v, m, gamma=torch.tensor(0.9))
    with pytest.raises(ValueError, match="gae: mode must be one of"):
        ppokernels.gae(r, v, m, mode="carry")
    with pytest.raises(ValueError, match="gae: values has shape"):
        ppokernels.gae(r, v[:, :4], m)
    with pytest.raises(ValueError, match="gae: mask has shape"):
        ppokernels.gae(r, v, m[:1])
    with pytest.raises(TypeError, match="gae: rewards must be float"):
        ppokernels.gae(r.long(), v, m)
    with pytest.raises(TypeError, match="gae: values is torch.float64"):
        ppokernels.gae(r, v.double(), m)
    with pytest.raises(ValueError, match="gae: mask is on meta"):
        ppokernels.gae(r, v, m.to("meta"))
    with pytest.raises(ValueError, match="gae: rewards must have a time dimension"):
        ppokernels.gae(r[0, 0], v[0, 0], m[0, 0])
    with pytest.raises(ValueError, match="discounted_returns: gamma must be in"):
        ppokernels.discounted_returns(r, m, gamma=2.0)
