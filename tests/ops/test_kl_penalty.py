"""kl_penalty: the conformance blocks from ``ppokernels.testing`` (every estimator with and
without a clamp, odd shapes, bad input), then what is special to the op: k3 without cancellation
near 0, bf16/fp16 error against eager, NaN staying where it is."""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import (
    OpSpec,
    Sample,
    assert_close_to_reference,
    backend_params,
    conformance_tests,
)

ESTIMATORS = ["k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+"]
PARAMS = backend_params()


def _inputs(shape, dtype, device, scale=1.0):
    lp = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    ref = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return lp, ref


def samples(device, dtype):
    out = []
    for estimator in ESTIMATORS:
        for clamp in [None, 1.5]:
            name = estimator + ("" if clamp is None else f"-clamp{clamp}")
            kw = dict(estimator=estimator, clamp=clamp)
            out.append(Sample(_inputs((7, 129), dtype, device, scale=2.0), kw, name))
    # gradcheck-sized, clamped ("+" estimators are biased by design: their gradient is not d/dx)
    for estimator in ["k1", "k2", "k3", "abs"]:
        kw = dict(estimator=estimator, clamp=2.0)
        out.append(Sample(_inputs((3, 5), dtype, device), kw, f"small-{estimator}"))
    out.append(Sample(_inputs((0, 4), dtype, device), {}, "empty"))
    out.append(Sample(_inputs((1000,), dtype, device), {}, "1d"))
    return out


def _bad_inputs():
    lp, ref = _inputs((4,), torch.float32, "cpu")
    kl = ppokernels.kl_penalty
    return [
        (lambda: kl(lp, ref[:3]), ValueError, "kl_penalty: ref_logprobs has shape"),
        (lambda: kl(lp.long(), ref.long()), TypeError, "kl_penalty: logprobs must be float"),
        (lambda: kl(lp, ref.double()), TypeError, "kl_penalty: ref_logprobs is torch.float64"),
        (lambda: kl(lp, ref.to("meta")), ValueError, "kl_penalty: ref_logprobs is on meta"),
        (lambda: kl(lp, ref, estimator="k4"), ValueError, "kl_penalty: estimator"),
        (lambda: kl(lp, ref, clamp=-1.0), ValueError, "kl_penalty: clamp must be > 0"),
        (lambda: kl(lp, ref, backend="fast"), ValueError, "kl_penalty: backend"),
    ]


def _opcheck(s):
    kw = dict(estimator="k3", clamp=None) | s.kwargs
    return [(torch.ops.ppokernels.kl_penalty.default, (*s.args, kw["estimator"], kw["clamp"]))]


SPEC = OpSpec(
    name="kl_penalty",
    fn=ppokernels.kl_penalty,
    reference=reference.kl_penalty,
    samples=samples,
    differentiable=(0, 1),
    bad_inputs=_bad_inputs(),
    opcheck=_opcheck,
    gradcheck_samples=["small-k1", "small-k2", "small-k3", "small-abs"],
    opcheck_samples=["k3", "k1+-clamp1.5"],
)
globals().update(conformance_tests(SPEC))


@pytest.mark.parametrize("device, backend", [p for p in PARAMS if p[1] != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, backend, dtype):
    lp, ref = _inputs((1000,), dtype, device)
    out = ppokernels.kl_penalty(lp, ref, estimator="k3", backend=backend)
    expect = reference.kl_penalty(lp.double(), ref.double(), estimator="k3")
    eager = torch.expm1(-(lp - ref)) + (lp - ref)  # what a trainer computes in the input dtype
    assert out.dtype == torch.float32
    assert_close_to_reference(out, expect, eager)


@pytest.mark.parametrize("device, backend", [p for p in PARAMS if p[1] != "reference"])
def test_k3_no_cancellation_near_zero(device, backend):
    """The reference is the naive formula; the kernels keep k3's relative accuracy near 0."""
    x = torch.tensor([1e-7, -3e-6, 1e-4, -0.01, 0.2, -0.24, 0.26, 3.0], dtype=torch.float64)
    lp = (x + 0.5).float()
    ref = torch.full_like(lp, 0.5)
    out = ppokernels.kl_penalty(lp.to(device), ref.to(device), estimator="k3", backend=backend)
    expect = reference.kl_penalty(lp.double(), ref.double(), estimator="k3")
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device, backend", PARAMS)
def test_nan_stays_in_place(device, backend):
    lp, ref = _inputs((4,), torch.float32, device)
    lp[1] = float("nan")
    out = ppokernels.kl_penalty(lp, ref, backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
