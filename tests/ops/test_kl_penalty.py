import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import TOL, assert_close_to_reference, backend_params, binary_skip_reason

ESTIMATORS = ["k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+"]
PARAMS = backend_params()


def _inputs(shape, dtype, device, scale=1.0):
    lp = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    ref = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return lp, ref


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_backward(device, backend, estimator, clamp, dtype):
    lp, ref = _inputs((7, 129), dtype, device, scale=2.0)
    lp.requires_grad_(True)
    ref.requires_grad_(True)
    out = ppokernels.kl_penalty(lp, ref, estimator=estimator, clamp=clamp, backend=backend)
    lp64, ref64 = lp.detach().double().requires_grad_(), ref.detach().double().requires_grad_()
    expect = reference.kl_penalty(lp64, ref64, estimator=estimator, clamp=clamp)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), expect, **TOL[dtype])
    grad = torch.randn_like(expect)
    g_lp, g_ref = torch.autograd.grad(out, (lp, ref), grad.to(out.dtype))
    e_lp, e_ref = torch.autograd.grad(expect, (lp64, ref64), grad)
    torch.testing.assert_close(g_lp.double(), e_lp, **TOL[dtype])
    torch.testing.assert_close(g_ref.double(), e_ref, **TOL[dtype])


@pytest.mark.parametrize("device, backend", [p for p in PARAMS if p[1] != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, backend, dtype):
    lp, ref = _inputs((1000,), dtype, device)
    out = ppokernels.kl_penalty(lp, ref, estimator="k3", backend=backend)
    expect = reference.kl_penalty(lp.double(), ref.double(), estimator="k3")
    eager = torch.expm1(-(lp - ref)) + (lp - ref)  # what a trainer computes in the input dtype
    assert out.dtype == torch.float32
    assert_close_to_reference(out, expect, eager)


@pytest.mark.parametrize("device, backend", PARAMS)
def test_k3_no_cancellation_near_zero(device, backend):
    x = torch.tensor([1e-7, -3e-6, 1e-4, -0.01, 0.2, -0.24, 0.26, 3.0], dtype=torch.float64)
    lp = (x + 0.5).float()
    ref = torch.full_like(lp, 0.5)
    out = ppokernels.kl_penalty(lp.to(device), ref.to(device), estimator="k3", backend=backend)
    if backend == "reference":
        return  # the reference is the naive formula; this test is about the kernels
    expect = reference.kl_penalty(lp.double(), ref.double(), estimator="k3")
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device, backend", PARAMS)
def test_gradcheck(device, backend):
    lp, ref = _inputs((3, 5), torch.float64, device)
    for estimator in ["k1", "k2", "k3", "abs"]:  # "+" estimators are biased by design

        def fn(a, b, estimator=estimator):
            return ppokernels.kl_penalty(a, b, estimator=estimator, clamp=2.0, backend=backend)

        assert torch.autograd.gradcheck(fn, (lp.requires_grad_(), ref.requires_grad_()))


@pytest.mark.parametrize("device, backend", PARAMS)
def test_empty_and_nan(device, backend):
    lp, ref = _inputs((0, 4), torch.float32, device)
    assert ppokernels.kl_penalty(lp, ref, backend=backend).shape == (0, 4)
    lp, ref = _inputs((4,), torch.float32, device)
    lp[1] = float("nan")
    out = ppokernels.kl_penalty(lp, ref, backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


def test_opcheck_and_compile():
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    lp, ref = _inputs((4, 9), torch.float32, "cpu")
    for est, clamp in [("k3", None), ("k1+", 10.0)]:
        torch.library.opcheck(
            torch.ops.ppokernels.kl_penalty.default,
            (lp.requires_grad_(), ref.requires_grad_(), est, clamp),
        )
    fn = torch.compile(
        lambda a, b: ppokernels.kl_penalty(a, b, backend="cpp").sum(), fullgraph=True
    )
    torch.testing.assert_close(fn(lp, ref), ppokernels.kl_penalty(lp, ref).sum())


@pytest.mark.cuda
def test_opcheck_cuda():
    lp, ref = _inputs((4, 9), torch.float32, "cuda")
    for name in ["kl_penalty", "kl_penalty_triton"]:
        torch.library.opcheck(
            getattr(torch.ops.ppokernels, name).default,
            (lp.requires_grad_(), ref.requires_grad_(), "k3", None),
        )


def test_bad_input():
    lp, ref = _inputs((4,), torch.float32, "cpu")
    with pytest.raises(ValueError, match="kl_penalty: ref_logprobs has shape"):
        ppokernels.kl_penalty(lp, ref[:3])
    with pytest.raises(TypeError, match="kl_penalty: logprobs must be float"):
        ppokernels.kl_penalty(lp.long(), ref.long())
    with pytest.raises(TypeError, match="kl_penalty: ref_logprobs is torch.float64"):
        ppokernels.kl_penalty(lp, ref.double())
    with pytest.raises(ValueError, match="kl_penalty: ref_logprobs is on meta"):
        ppokernels.kl_penalty(lp, ref.to("meta"))
    with pytest.raises(ValueError, match="kl_penalty: estimator"):
        ppokernels.kl_penalty(lp, ref, estimator="k4")
    with pytest.raises(ValueError, match="kl_penalty: clamp must be > 0"):
        ppokernels.kl_penalty(lp, ref, clamp=-1.0)
    with pytest.raises(ValueError, match="kl_penalty: backend"):
        ppokernels.kl_penalty(lp, ref, backend="fast")
