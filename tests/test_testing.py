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


# Keyword tensors: their gradients are checked, and NaN padding reaches them too.
def _policy_samples(device, dtype):
    g = lambda: torch.randn(3, 5, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    lp, old, adv, ref = g(), g(), g(), g()
    mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    mask[1, 2:] = False
    kw = dict(ref_logprobs=ref, kl_coef=0.1)
    return [Sample((lp, old, adv, mask), kw, "kl")]


def _wrong_ref_grad(lp, old, adv, mask, *, ref_logprobs, backend="auto", **kw):
    ref = _ScaleGrad.apply(ref_logprobs)
    return ppokernels.ppo_policy_loss(lp, old, adv, mask, ref_logprobs=ref, backend=backend, **kw)


def test_a_wrong_gradient_of_a_keyword_tensor_fails():
    spec = OpSpec(
        name="ppo_policy_loss",
        fn=ppokernels.ppo_policy_loss,
        reference=reference.ppo_policy_loss,
        samples=_policy_samples,
        differentiable=(0, "ref_logprobs"),
    )
    conformance_tests(spec)["test_forward_backward"](**CPU64, sample="kl")
    spec.fn = _wrong_ref_grad
    tests = conformance_tests(spec)
    with pytest.raises(AssertionError, match="gradient of ref_logprobs"):
        tests["test_forward_backward"](**CPU64, sample="kl")
    with pytest.raises(Exception, match="Jacobian mismatch"):
        tests["test_gradcheck"](device="cpu", backend="reference", sample="kl")


def _weighted_rowsum_reference(x, mask, *, weights):
    zero = torch.zeros_like(x)
    return (torch.where(mask.bool(), x, zero) * torch.where(mask.bool(), weights, zero)).sum(-1)


def _weighted_rowsum(x, mask, *, weights, backend="auto"):
    return _weighted_rowsum_reference(x, mask, weights=weights)


def _weighted_rowsum_nan(x, mask, *, weights, backend="auto"):
    return (torch.where(mask.bool(), x, torch.zeros_like(x)) * weights).sum(-1)


def _weighted_sample(device, dtype):
    s = _masked_sample(device, dtype)
    s.kwargs = dict(weights=torch.rand(3, 6, dtype=dtype, device=device))
    return s


def test_nan_padding_reaches_keyword_tensors():
    spec = OpSpec(
        name="rowsum",
        fn=_weighted_rowsum,
        reference=_weighted_rowsum_reference,
        samples=lambda device, dtype: [_weighted_sample(device, dtype)],
        masked_sample=_weighted_sample,
        mask_arg=1,
    )
    conformance_tests(spec)["test_all_masked"](**CPU64)
    spec.fn = _weighted_rowsum_nan
    with pytest.raises(AssertionError, match="NaN at masked positions"):
        conformance_tests(spec)["test_all_masked"](**CPU64)
