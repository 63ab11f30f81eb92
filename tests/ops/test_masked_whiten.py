"""masked_whiten, masked_mean and masked_var: the conformance blocks from ``ppokernels.testing``
(shift_mean x unbiased on non-contiguous input, every mask dtype, all-masked rows with NaN
padding, bad input), then what is special to the statistics: undefined (NaN) statistics, low
precision against eager, many chunks and determinism on the C++ kernel, veRL / TRL's whiten."""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import (
    OpSpec,
    Sample,
    assert_close_to_reference,
    backend_params,
    binary_skip_reason,
    conformance_tests,
)

PARAMS = backend_params()
KERNELS = [p for p in PARAMS if p[1] != "reference"]
MASK_DTYPES = [torch.bool, torch.int64, torch.float32]


def _data(shape, dtype, device, p_valid=0.7, scale=3.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + 1.5).to(device=device, dtype=dtype)
    mask = (torch.rand(shape) < p_valid).to(device)
    return x, mask


def whiten_samples(device, dtype):
    out = []
    for shift_mean in [True, False]:
        for unbiased in [True, False]:
            x, mask = _data((5, 67), dtype, device)
            kw = dict(shift_mean=shift_mean, unbiased=unbiased, eps=1e-5)
            name = f"shift{int(shift_mean)}-unbiased{int(unbiased)}"
            out.append(Sample((x.t(), mask.t()), kw, name))  # non-contiguous input
            x, mask = _data((3, 7), dtype, device)
            out.append(Sample((x, mask), kw | dict(eps=1e-8), "small-" + name))
    x, mask = _data((4, 9), dtype, device)
    out.append(Sample((x, mask.long()), dict(shift_mean=False), "int64-mask"))
    x, mask = _data((0, 4), dtype, device)
    out.append(Sample((x, mask), {}, "empty"))
    return out


def _masked(device, dtype):
    x, mask = _data((4, 9), dtype, device)
    mask[1] = False  # an all-masked row
    return Sample((x, mask), {}, "rows")


def _whiten_opcheck(s):
    kw = dict(shift_mean=True, unbiased=True, eps=1e-8) | s.kwargs
    x, mask = s.args
    args = (x.requires_grad_(), mask, kw["shift_mean"], kw["unbiased"], kw["eps"])
    return [(torch.ops.ppokernels.masked_whiten.default, args)]


def _bad_inputs():
    x, mask = _data((4, 5), torch.float32, "cpu")
    return [
        (
            lambda: ppokernels.masked_whiten(x, mask.float()[:, :3]),
            ValueError,
            "masked_whiten: mask has shape",
        ),
        (lambda: ppokernels.masked_mean(x, mask[0]), ValueError, "masked_mean: mask has shape"),
        (lambda: ppokernels.masked_var(x.long(), mask), TypeError, "masked_var: x must be float"),
        (
            lambda: ppokernels.masked_whiten(x, mask.to("meta")),
            ValueError,
            "masked_whiten: mask is on meta",
        ),
        (
            lambda: ppokernels.masked_whiten(x, mask, eps=-1e-8),
            ValueError,
            "masked_whiten: eps must be >= 0",
        ),
        (
            lambda: ppokernels.masked_whiten(x, mask, shift_mean=None),
            TypeError,
            "masked_whiten: shift_mean must be a bool",
        ),
        (lambda: ppokernels.masked_var(x, mask, backend="fast"), ValueError, "masked_var: backend"),
        (
            lambda: ppokernels.masked_whiten(x, mask, backend="fast"),
            ValueError,
            "masked_whiten: backend",
        ),
    ]


SMALL = [f"small-shift{a}-unbiased{b}" for a in (1, 0) for b in (1, 0)]
WHITEN = OpSpec(
    name="masked_whiten",
    fn=ppokernels.masked_whiten,
    reference=reference.masked_whiten,
    samples=whiten_samples,
    masked_sample=_masked,
    mask_arg=1,
    nan_padding_against="reference",
    bad_inputs=_bad_inputs(),
    opcheck=_whiten_opcheck,
    gradcheck_samples=SMALL,
    opcheck_samples=["int64-mask"],
)
globals().update(conformance_tests(WHITEN))


def moments_samples(device, dtype):
    out = []
    for mask_dtype in MASK_DTYPES:
        x, mask = _data((6, 41), dtype, device)
        out.append(Sample((x, mask.to(mask_dtype)), {}, str(mask_dtype).removeprefix("torch.")))
    x, mask = _data((3, 7), dtype, device)
    out.append(Sample((x, mask), {}, "small"))
    return out


def var_samples(device, dtype):
    return [
        Sample(s.args, dict(unbiased=unbiased), f"{s.name}-unbiased{int(unbiased)}")
        for unbiased in [True, False]
        for s in moments_samples(device, dtype)
    ]


def _moments_opcheck(s):
    x, mask = s.args
    return [(torch.ops.ppokernels.masked_moments.default, (x.requires_grad_(), mask, True))]


MEAN = OpSpec(
    name="masked_mean",
    fn=ppokernels.masked_mean,
    reference=reference.masked_mean,
    samples=moments_samples,
    masked_sample=_masked,
    mask_arg=1,
    opcheck=_moments_opcheck,
    gradcheck_samples=["small"],
)
globals().update(conformance_tests(MEAN, prefix="masked_mean"))
VAR = OpSpec(
    name="masked_var",
    fn=ppokernels.masked_var,
    reference=reference.masked_var,
    samples=var_samples,
    masked_sample=_masked,
    mask_arg=1,
    opcheck=_moments_opcheck,
    gradcheck_samples=["small-unbiased1", "small-unbiased0"],
)
globals().update(conformance_tests(VAR, prefix="masked_var"))


def test_opcheck_backward_ops():
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    ops = torch.ops.ppokernels
    x, mask = _data((4, 9), torch.float32, "cpu")
    g3 = torch.randn(3)
    mom = ops.masked_moments(x, mask, True)
    torch.library.opcheck(ops.masked_moments_backward.default, (g3, x, mask, mom, True))
    g = torch.randn(4, 9)
    torch.library.opcheck(ops.masked_whiten_backward.default, (g, x, mask, True, True, 0.1))


@pytest.mark.parametrize("device, backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_whiten(device, backend, dtype):
    x, mask = _data((8, 125), dtype, device)
    out = ppokernels.masked_whiten(x, mask, backend=backend)
    expect = reference.masked_whiten(x.double(), mask)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, expect, _verl_whiten(x, mask))  # eager: in the input dtype
    mean = ppokernels.masked_mean(x, mask, backend=backend)
    assert_close_to_reference(mean, reference.masked_mean(x.double(), mask), _verl_mean(x, mask))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0 in the Triton interpreter
@pytest.mark.parametrize("device, backend", PARAMS)
def test_empty_and_undefined(device, backend):
    nan = float("nan")
    x, _ = _data((3, 5), torch.float32, device)
    zero = torch.zeros(3, 5, dtype=torch.bool, device=device)
    assert ppokernels.masked_mean(x, zero, backend=backend).isnan()
    assert ppokernels.masked_var(x, zero, unbiased=False, backend=backend).isnan()
    assert ppokernels.masked_var(x, zero, backend=backend).isnan()
    assert ppokernels.masked_whiten(x, zero, backend=backend).isnan().all()
    one = zero.clone()
    one[1, 2] = True  # a single valid entry: the unbiased variance is undefined
    assert ppokernels.masked_var(x, one, backend=backend).isnan()
    assert ppokernels.masked_var(x, one, unbiased=False, backend=backend).item() == 0.0
    assert ppokernels.masked_mean(x, one, backend=backend).item() == x[1, 2].item()
    empty = torch.empty(0, 4, device=device)
    e_mask = torch.empty(0, 4, dtype=torch.bool, device=device)
    assert ppokernels.masked_mean(empty, e_mask, backend=backend).isnan()
    assert ppokernels.masked_whiten(empty, e_mask, backend=backend).shape == (0, 4)
    # masked padding holding inf / NaN does not leak into the statistics
    y, mask = _data((4, 9), torch.float32, device)
    y[~mask] = nan
    y[0, 0], mask[0, 0] = float("inf"), False
    mean = ppokernels.masked_mean(y, mask, backend=backend)
    torch.testing.assert_close(mean, y[mask].mean())
    var = ppokernels.masked_var(y, mask, backend=backend)
    torch.testing.assert_close(var, y[mask].var())
    out = ppokernels.masked_whiten(y, mask, backend=backend)
    assert torch.isfinite(out[mask]).all()


@pytest.mark.parametrize("device", ["cpu"])
def test_cpp_large_and_deterministic(device):
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    x, mask = _data((64, 40_000), torch.float32, device, scale=100.0)  # many chunks of partials
    expect = reference.masked_whiten(x.double(), mask)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(ppokernels.masked_whiten(x, mask, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0].double(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # same bits
    m = ppokernels.masked_mean(x, mask, backend="cpp")
    torch.testing.assert_close(
        m.double(), reference.masked_mean(x.double(), mask), rtol=1e-6, atol=0
    )
    v = ppokernels.masked_var(x, mask, backend="cpp")
    torch.testing.assert_close(
        v.double(), reference.masked_var(x.double(), mask), rtol=1e-6, atol=0
    )
    # backward across many chunks (the merge of the chunk statistics)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    (g,) = torch.autograd.grad(ppokernels.masked_whiten(x, mask, backend="cpp"), x, grad)
    x64 = x.detach().double().requires_grad_()
    (e,) = torch.autograd.grad(reference.masked_whiten(x64, mask), x64, grad.double())
    torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


# -------------------------------------------- parity with veRL / TRL (an independent formula)
def _verl_mean(x, m):
    return (x * m).sum() / (m.sum() + 1e-8)  # veRL's masked_mean (no NaN: + 1e-8)


def _verl_whiten(x, m, shift_mean=True):
    """veRL / TRL masked_whiten: biased variance over the mask, then Bessel n / (n - 1)."""
    mean = _verl_mean(x, m)
    var = _verl_mean((x - mean) ** 2, m)
    n = m.sum()
    var = var * n / (n - 1)
    y = (x - mean) * torch.rsqrt(var + 1e-8)
    return y if shift_mean else y + mean


@pytest.mark.parametrize("device, backend", PARAMS)
def test_trainer_parity(device, backend):
    x, mask = _data((4, 33), torch.float64, "cpu")
    for shift_mean in [True, False]:
        out = ppokernels.masked_whiten(
            x.to(device), mask.to(device), shift_mean=shift_mean, backend=backend
        )
        # veRL's + 1e-8 in the mean's denominator is the only difference
        torch.testing.assert_close(
            out.cpu(), _verl_whiten(x, mask, shift_mean), rtol=1e-7, atol=1e-7
        )
