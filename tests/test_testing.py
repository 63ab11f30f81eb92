"""The conformance harness (ppokernels.testing) can fail: fed a deliberately wrong op, each
generated block raises; fed the right one, it passes. The generated functions are called
directly, with the arguments pytest would give them."""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import OpSpec, Sample, conformance_tests

CPU64 = dict(device="cpu", backend="reference", dtype=torch.float64)


def _kl_samples(device, dtype):
    lp = torch.randn(3, 5, dtype=torch.float64).to(device=device, dtype=dtype)
    ref = torch.randn(3, 5, dtype=torch.float64).to(device=device, dtype=dtype)
    return [Sample((lp, ref), dict(estimator="k3"), "k3")]


def _kl_spec(fn, **kw):
    return OpSpec(
        name="kl_penalty",
        fn=fn,
        reference=reference.kl_penalty,
        samples=_kl_samples,
        differentiable=(0, 1),
        **kw,
    )


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def _off_by_1e3(lp, ref, *, backend="auto", **kw):
    return ppokernels.kl_penalty(lp, ref, backend=backend, **kw) + 1e-3


def _wrong_grad(lp, ref, *, backend="auto", **kw):
    return ppokernels.kl_penalty(_ScaleGrad.apply(lp), ref, backend=backend, **kw)


def _wrong_dtype(lp, ref, *, backend="auto", **kw):
    return ppokernels.kl_penalty(lp, ref, backend=backend, **kw).to(torch.float16)


def test_the_right_op_passes():
    tests = conformance_tests(_kl_spec(ppokernels.kl_penalty))
    tests["test_forward_backward"](**CPU64, sample="k3")
    tests["test_forward_backward"](
        device="cpu", backend="reference", dtype=torch.float32, sample="k3"
    )
    tests["test_gradcheck"](device="cpu", backend="reference", sample="k3")


def test_a_wrong_forward_fails():
    tests = conformance_tests(_kl_spec(_off_by_1e3))
    with pytest.raises(AssertionError, match="output 0"):
        tests["test_forward_backward"](**CPU64, sample="k3")


def test_a_wrong_gradient_fails():
    tests = conformance_tests(_kl_spec(_wrong_grad))
    with pytest.raises(AssertionError, match="gradient of argument 0"):
        tests["test_forward_backward"](**CPU64, sample="k3")
    with pytest.raises(Exception, match="Jacobian mismatch"):
        tests["test_gradcheck"](device="cpu", backend="reference", sample="k3")


def test_a_wrong_output_dtype_fails():
    tests = conformance_tests(_kl_spec(_wrong_dtype))
    with pytest.raises(AssertionError, match="output 0 is torch.float16"):
        tests["test_forward_backward"](**CPU64, sample="k3")


def test_a_bad_input_that_passes_fails():
    lp = torch.randn(4)
    spec = _kl_spec(
        ppokernels.kl_penalty,
        bad_inputs=[(lambda: ppokernels.kl_penalty(lp, lp), ValueError, "kl_penalty: ")],
    )
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        conformance_tests(spec)["test_bad_input"](case=0)
    spec.bad_inputs = [(lambda: ppokernels.kl_penalty(lp, lp[:3]), ValueError, "kl_penalty: x")]
    with pytest.raises(AssertionError, match="Regex pattern did not match"):
        conformance_tests(spec)["test_bad_input"](case=0)


# A toy masked op: the row sums of x over its mask. x * mask spreads NaN from masked positions.
def _masked_rowsum_reference(x, mask):
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum(-1)


def _masked_rowsum(x, mask, *, backend="auto"):
    return _masked_rowsum_reference(x, mask)


def _masked_rowsum_nan(x, mask, *, backend="auto"):
    return (x * mask).sum(-1)


def _masked_sample(device, dtype):
    x = torch.randn(3, 6, dtype=dtype, device=device)
    mask = torch.rand(3, 6, device=device) < 0.7
    mask[1] = False
    return Sample((x, mask), {}, "masked")


def _masked_spec(fn):
    return OpSpec(
        name="rowsum",
        fn=fn,
        reference=_masked_rowsum_reference,
        samples=lambda device, dtype: [_masked_sample(device, dtype)],
        masked_sample=_masked_sample,
        mask_arg=1,
    )


def test_nan_spreading_from_masked_positions_fails():
    conformance_tests(_masked_spec(_masked_rowsum))["test_all_masked"](**CPU64)
    tests = conformance_tests(_masked_spec(_masked_rowsum_nan))
    with pytest.raises(AssertionError, match="NaN at masked positions"):
        tests["test_all_masked"](**CPU64)


def test_sample_names_must_be_unique():
    spec = _kl_spec(ppokernels.kl_penalty)
    spec.samples = lambda device, dtype: _kl_samples(device, dtype) * 2
    with pytest.raises(AssertionError, match="sample names repeat"):
        conformance_tests(spec)
