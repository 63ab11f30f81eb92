import pytest
import torch

import ppokernels
from ppokernels import reference
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
CPP = pytest.mark.skipif(bool(binary_skip_reason()), reason=str(binary_skip_reason()))


def _vocab(backend, V):
    """The Triton interpreter runs on tiny shapes only."""
    return min(V, 37) if backend == "triton" else V


def _inputs(shape, V, dtype=torch.float32, device="cpu", scale=3.0, holes=True):
    logits = (torch.randn(*shape, V, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, shape, device=device)
    if holes and labels.numel() > 1:
        labels.view(-1)[::3] = -100
    return logits, labels


def _ref64(logits, labels, temperature=1.0, ignore_index=-100):
    x = logits.detach().double().requires_grad_()
    lp, ent = reference.token_logprobs(
        x, labels, temperature=temperature, with_entropy=True, ignore_index=ignore_index
    )
    return x, lp, ent


def _check_fwd_bwd(logits, labels, backend, temperature, with_entropy, inplace=False, tol=None):
    tol = tol or TOL[torch.float32 if logits.dtype != torch.float64 else torch.float64]
    x = logits.detach().clone().requires_grad_()
    src = x.clone() if inplace else x  # a non-leaf to be overwritten by the in-place backward
    lp, ent = ppokernels.token_logprobs(
        src,
        labels,
        temperature=temperature,
        with_entropy=with_entropy,
        backend=backend,
        inplace_backward=inplace,
    )
    x64, lp64, ent64 = _ref64(logits, labels, temperature)
    torch.testing.assert_close(lp.double(), lp64, **tol)
    g_lp = torch.randn_like(lp64)
    g_ent = torch.randn_like(ent64)
    if with_entropy:
        torch.testing.assert_close(ent.double(), ent64, **tol)
        torch.autograd.backward((lp, ent), (g_lp.to(lp.dtype), g_ent.to(ent.dtype)))
        torch.autograd.backward((lp64, ent64), (g_lp, g_ent))
    else:
        assert ent is None
        lp.backward(g_lp.to(lp.dtype))
        lp64.backward(g_lp)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    return x.grad


def samples(device, dtype):
    out = []
    for temperature in [1.0, 0.7]:
        for with_entropy in [False, True]:
            kw = dict(temperature=temperature, with_entropy=with_entropy)
            name = f"T{temperature}-entropy{int(with_entropy)}"
            out.append(Sample(_inputs((3, 5), 37, dtype, device), kw, name))
    kw = dict(temperature=0.7, with_entropy=True)
    out.append(Sample(_inputs((2, 3), 1271, dtype, device), kw, "V1271"))  # several vocab blocks
    out.append(Sample(_inputs((2, 3), 7, dtype, device), kw, "small"))
    logits, labels = _inputs((3, 4), 53, dtype, device)
    kw = dict(with_entropy=True, ignore_index=-1)
    out.append(Sample((logits, labels.fill_(-1)), kw, "all-ignored"))
    out.append(Sample(_inputs((0,), 53, dtype, device), dict(with_entropy=True), "empty"))
    return out


def _opcheck(s):
    kw = dict(temperature=1.0, with_entropy=False, ignore_index=-100) | s.kwargs
    logits, labels = s.args
    args = (logits.requires_grad_(), labels, kw["temperature"], kw["with_entropy"])
    return [(torch.ops.ppokernels.token_logprobs.default, (*args, kw["ignore_index"], False))]


def _bad_inputs():
    logits, labels = _inputs((4,), 11, holes=False)
    name = "token_logprobs"
    f = ppokernels.token_logprobs
    return [
        (lambda: f(logits, labels[:3]), ValueError, f"{name}: labels has shape"),
        (lambda: f(logits, labels.float()), TypeError, f"{name}: labels must be int64 or int32"),
        (lambda: f(logits.long(), labels), TypeError, f"{name}: logits must be float"),
        (lambda: f(logits, labels.to("meta")), ValueError, f"{name}: labels is on meta"),
        (
            lambda: f(logits, labels, temperature=0.0),
            ValueError,
            f"{name}: temperature must be > 0",
        ),
        (
            lambda: f(logits, labels, ignore_index=1.5),
            TypeError,
            f"{name}: ignore_index must be an int",
        ),
        (lambda: f(logits, labels, backend="fast"), ValueError, f"{name}: backend"),
    ]


SPEC = OpSpec(
    name="token_logprobs",
    fn=ppokernels.token_logprobs,
    reference=reference.token_logprobs,
    samples=samples,
    bad_inputs=_bad_inputs(),
    opcheck=_opcheck,
    gradcheck_samples=["small"],
    opcheck_samples=["T0.7-entropy0", "T0.7-entropy1"],
)
globals().update(conformance_tests(SPEC))


@pytest.mark.parametrize("device, backend", KERNELS)
@pytest.mark.parametrize("V", [151936, 152064])
def test_large_vocab(device, backend, V):
    logits, labels = _inputs((2,), V, device=device, holes=False)
    _check_fwd_bwd(logits, labels, backend, 0.7, True)


@pytest.mark.parametrize("device, backend", KERNELS)
def test_inplace_backward_same_gradient(device, backend):
    logits, labels = _inputs((4, 3), _vocab(backend, 1271), device=device)
    torch.manual_seed(1)  # the same upstream gradients in both calls
    g1 = _check_fwd_bwd(logits, labels, backend, 0.7, True)
    torch.manual_seed(1)
    g2 = _check_fwd_bwd(logits, labels, backend, 0.7, True, inplace=True)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    # the logits buffer holds the gradient afterwards, and a second backward is refused
    x = logits.clone().requires_grad_()
    src = x * 1.0
    lp, _ = ppokernels.token_logprobs(src, labels, backend=backend, inplace_backward=True)
    lp.sum().backward(retain_graph=True)
    torch.testing.assert_close(src.detach(), x.grad, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()


@pytest.mark.parametrize("device, backend", PARAMS)
def test_strided_rows(device, backend):
    V = _vocab(backend, 1271)
    full, labels = _inputs((2, 5), V, device=device)
    for logits, lab in [
        (full[:, :-1], labels[:, 1:]),  # shifted slice of [B, S, V]: no copy
        (full.transpose(0, 1), labels.t()),  # [S, B, V] view
        (
            torch.randn(2, 3, 4, 2 * V, device=device)[:, :-1, 1:, :V],  # copied
            torch.randint(0, V, (2, 2, 3), device=device),
        ),
    ]:
        g = _check_fwd_bwd(logits, lab, backend, 0.7, True)
        assert g.shape == logits.shape
        if backend != "reference":  # a row gives the same bits strided or contiguous
            a, _ = ppokernels.token_logprobs(logits, lab, backend=backend)
            b, _ = ppokernels.token_logprobs(logits.contiguous(), lab, backend=backend)
            assert torch.equal(a, b)


@pytest.mark.parametrize("device, backend", PARAMS)
def test_masked_vocab_and_nan(device, backend):
    V = _vocab(backend, 300)
    logits, labels = _inputs((4,), V, device=device, holes=False)
    logits[:, 5:20] = float("-inf")  # banned tokens (never the label)
    labels[labels.ge(5) & labels.lt(20)] = 0
    logits[2, :] = float("-inf")
    logits[2, labels[2]] = 1.0  # a one-hot row: log p = 0, entropy 0
    _check_fwd_bwd(logits, labels, backend, 0.7, True)
    logits[1, 7] = float("nan")
    lp, ent = ppokernels.token_logprobs(logits, labels, with_entropy=True, backend=backend)
    assert lp[1].isnan() and ent[1].isnan() and lp[[0, 2, 3]].isfinite().all()


@pytest.mark.parametrize("device, backend", KERNELS)
def test_batch_invariance_bitwise(device, backend):
    V = _vocab(backend, 5003)
    logits, labels = _inputs((9,), V, device=device, holes=False)
    batch = ppokernels.token_logprobs(logits, labels, with_entropy=True, backend=backend)
    for i in (0, 4, 8):
        alone = ppokernels.token_logprobs(
            logits[i : i + 1].clone(), labels[i : i + 1], with_entropy=True, backend=backend
        )
        assert torch.equal(alone[0], batch[0][i : i + 1])
        assert torch.equal(alone[1], batch[1][i : i + 1])


@pytest.mark.parametrize("device, backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, backend, dtype):
    logits, labels = _inputs((6,), _vocab(backend, 1271), dtype=dtype, device=device)
    x = logits.clone().requires_grad_()
    lp, ent = ppokernels.token_logprobs(
        x, labels, temperature=0.7, with_entropy=True, backend=backend
    )
    assert lp.dtype == ent.dtype == torch.float32
    x64, lp64, ent64 = _ref64(logits, labels, 0.7)
    e = logits.clone().requires_grad_()  # what a trainer computes eagerly in the input dtype
    logp_e = torch.log_softmax(e / 0.7, -1)
    valid = labels != -100
    lp_e = logp_e.gather(-1, labels.clamp(min=0)[:, None])[:, 0] * valid
    ent_e = -(logp_e.exp() * logp_e).sum(-1) * valid
    assert_close_to_reference(lp, lp64, lp_e)
    assert_close_to_reference(ent, ent64, ent_e)
    g = torch.randn_like(lp64)
    torch.autograd.backward((lp, ent), (g.float(), g.float()))
    torch.autograd.backward((lp64, ent64), (g, g))
    torch.autograd.backward((lp_e, ent_e), (g.to(dtype), g.to(dtype)))
    assert_close_to_reference(x.grad, x64.grad, e.grad)


@pytest.mark.parametrize("device, backend", KERNELS)
def test_confident_target_gradient(device, backend):
    """1 - p_y at p_y -> 1 is not taken from a rounded p_y (Liger#1329)."""
    V = _vocab(backend, 1271)
    logits = torch.randn(3, V).to(device)
    labels = torch.tensor([3, 4, 5], device=device)
    logits[0, 3], logits[1, 4], logits[2, 5] = 9.0, 12.0, 15.0  # p_y ~ 0.999 ... 0.99999
    logits = logits.bfloat16()
    x = logits.clone().requires_grad_()
    ppokernels.token_logprobs(x, labels, backend=backend)[0].sum().backward()
    x64, lp64, _ = _ref64(logits, labels)
    lp64.sum().backward()
    target = x.grad[torch.arange(3), labels].double()
    expect = x64.grad[torch.arange(3), labels]
    torch.testing.assert_close(target, expect, rtol=0.02, atol=2e-7)


@CPP
def test_opcheck_backward_and_compile_inplace():
    """The backward ops (the forward: the conformance block) and the in-place backward compiled."""
    logits, labels = _inputs((3, 4), 53)
    ops = torch.ops.ppokernels
    lp, ent, lse = ops.token_logprobs(logits, labels, 0.7, True, -100, False)
    g = torch.randn_like(lp)
    bwd_args = (g, g, logits.detach(), labels, lse, ent, 0.7, -100)
    torch.library.opcheck(ops.token_logprobs_backward.default, bwd_args)
    torch.library.opcheck(
        ops.token_logprobs_backward_.default, (g, None, logits.detach().clone(), *bwd_args[3:])
    )

    def loss(x, inplace):
        lp, ent = ppokernels.token_logprobs(
            x * 2.0,
            labels,
            temperature=0.7,
            with_entropy=True,
            backend="cpp",
            inplace_backward=inplace,
        )
        return lp.sum() + 0.1 * ent.sum()

    expect = logits.detach().clone().requires_grad_()
    loss(expect, False).backward()
    for inplace in (False, True):  # compiled, the in-place backward is functionalised
        x = logits.detach().clone().requires_grad_()
        torch.compile(lambda t, inplace=inplace: loss(t, inplace), fullgraph=True)(x).backward()
        torch.testing.assert_close(x.grad, expect.grad)


@CPP
def test_int64_offsets():
    """N * V > 2^31 elements (4.3 GB of bf16): offsets must not wrap. The backward runs in place,
    so there is only the one buffer."""
    V = 32768
    n = 2**31 // V + 1
    logits = torch.zeros(n, V, dtype=torch.bfloat16)
    tail = (torch.randn(2, V) * 3).bfloat16()
    logits[-2:] = tail
    labels = torch.zeros(n, dtype=torch.long)
    labels[-2:] = torch.tensor([5, 77])
    lp, ent, lse = torch.ops.ppokernels.token_logprobs(logits, labels, 1.0, True, -100, False)
    x64, lp64, ent64 = _ref64(tail, labels[-2:])
    torch.testing.assert_close(lp[-2:].double(), lp64, **TOL[torch.float32])
    torch.testing.assert_close(ent[-2:].double(), ent64, **TOL[torch.float32])
    torch.testing.assert_close(lp[0].item(), -torch.tensor(float(V)).log().item())
    g = torch.zeros(n)
    g[-2:] = 1.0
    torch.ops.ppokernels.token_logprobs_backward_(g, None, logits, labels, lse, None, 1.0, -100)
    lp64.sum().backward()
    torch.testing.assert_close(logits[-2:].double(), x64.grad, rtol=1e-2, atol=1e-6)
    assert (logits[0] == 0).all()
    del logits


def test_labels_out_of_range_on_every_backend():
    logits, labels = _inputs((4,), 11, holes=False)
    name = "token_logprobs"
    for _, backend in PARAMS:
        for bad in (11, -3):
            lab = labels.clone()
            lab[2] = bad
            with pytest.raises(IndexError, match=f"{name}: labels contains {bad}"):
                ppokernels.token_logprobs(logits, lab, backend=backend)
    lp, _ = ppokernels.token_logprobs(logits, labels.int())  # int32 labels are accepted
    torch.testing.assert_close(lp, ppokernels.token_logprobs(logits, labels)[0])
