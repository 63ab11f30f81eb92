import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import ppokernels
from ppokernels import reference
from ppokernels.testing import assert_close_to_reference, backend_params, binary_skip_reason

PARAMS = backend_params()
KERNELS = [p for p in PARAMS if p[1] != "reference"]
CPP = pytest.mark.skipif(bool(binary_skip_reason()), reason=str(binary_skip_reason()))
TOL32 = dict(rtol=1e-4, atol=1e-5)  # fp32 kernels vs fp64: sums over V and H in other orders


def _inputs(n, H, V, dtype=torch.float32, device="cpu", bias=False, holes=True, scale=0.5):
    hidden = torch.randn(n, H, dtype=torch.float64) * scale
    weight = torch.randn(V, H, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (n,))
    if holes and n > 2:
        labels[1::3] = -100
    b = torch.randn(V, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), labels.to(device), cast(b)


def _check(device, backend, hidden, weight, labels, bias, temperature, tol, **kw):
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    lp, ent = ppokernels.linear_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        with_entropy=True,
        temperature=temperature,
        backend=backend,
        **kw,
    )
    ref = [t.detach().double().requires_grad_() for t in leaves]
    b64 = ref[2] if bias is not None else None
    e_lp, e_ent = reference.linear_logprobs(
        ref[0], ref[1], labels, bias=b64, with_entropy=True, temperature=temperature
    )
    assert lp.shape == labels.shape and lp.dtype == (
        torch.float64 if hidden.dtype == torch.float64 else torch.float32
    )
    torch.testing.assert_close(lp.double(), e_lp, **tol)
    torch.testing.assert_close(ent.double(), e_ent, **tol)
    g_lp, g_ent = torch.randn_like(e_lp), torch.randn_like(e_ent)
    got = torch.autograd.grad((lp, ent), leaves, (g_lp.to(lp.dtype), g_ent.to(lp.dtype)))
    want = torch.autograd.grad((e_lp, e_ent), ref, (g_lp, g_ent))
    ignored = labels == -100
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, **tol)
    assert (got[0][ignored] == 0).all() and (lp[ignored] == 0).all() and (ent[ignored] == 0).all()


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward(device, backend, temperature, bias):
    hidden, weight, labels, b = _inputs(2 * 9, 24, 1271, device=device, bias=bias)
    hidden = hidden.view(2, 9, 24)  # [B, T, H]
    _check(device, backend, hidden, weight, labels.view(2, 9), b, temperature, TOL32)


# the interpreter is too slow for real vocabularies: the CPU C++ kernel (its own skip without the
# binary, so the parameter set is never empty) and the GPU kernels
LARGE_VOCAB = [pytest.param("cpu", "cpp", marks=CPP), *(p for p in KERNELS if p[0] != "cpu")]


@pytest.mark.parametrize("device, backend", LARGE_VOCAB)
@pytest.mark.parametrize("V", [151936, 152064])
def test_large_vocab(device, backend, V):
    """Real vocabularies, no multiple of any tile (the interpreter is too slow for them; V = 1271
    covers the Triton tile padding)."""
    n = 3
    hidden, weight, labels, b = _inputs(n, 8, V, device=device, bias=True, holes=False)
    _check(device, backend, hidden, weight, labels, b, 0.7, TOL32)


@pytest.mark.parametrize("device, backend", PARAMS)
def test_gradcheck(device, backend):
    hidden, weight, labels, b = _inputs(5, 3, 7, torch.float64, device, bias=True)
    h, w, bb = (t.requires_grad_() for t in (hidden, weight, b))

    def fn(h, w, bb):
        return ppokernels.linear_logprobs(
            h, w, labels, bias=bb, temperature=0.7, with_entropy=True, backend=backend
        )

    assert torch.autograd.gradcheck(fn, (h, w, bb))


@pytest.mark.parametrize("device, backend", PARAMS)
def test_all_ignored_and_empty(device, backend):
    hidden, weight, labels, _ = _inputs(4, 8, 50, device=device)
    hidden.requires_grad_()
    lp, ent = ppokernels.linear_logprobs(
        hidden,
        weight,
        torch.full_like(labels, -1),
        ignore_index=-1,
        with_entropy=True,
        backend=backend,
    )
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (hidden.grad == 0).all()
    lp, ent = ppokernels.linear_logprobs(hidden[:0], weight, labels[:0], backend=backend)
    assert lp.shape == (0,) and ent is None


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "linear_logprobs_backward" in str(func):
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device, backend", KERNELS)
def test_frozen_weight_skips_grad_weight(device, backend):
    hidden, weight, labels, b = _inputs(6, 8, 40, device=device, bias=True)
    hidden.requires_grad_()
    lp, _ = ppokernels.linear_logprobs(hidden, weight, labels, bias=b, backend=backend)
    with _Record() as rec:
        lp.sum().backward()
    assert len(rec.calls) == 1 and list(rec.calls[0][-1]) == [True, False, False]
    e_lp, _ = reference.linear_logprobs(
        hidden.detach().double().requires_grad_(), weight.double(), labels, bias=b.double()
    )
    assert hidden.grad is not None


@pytest.mark.parametrize("device, backend", KERNELS)
def test_bitwise_deterministic(device, backend):
    n = 100 if backend == "cpp" else 40
    hidden, weight, labels, b = _inputs(
        n, 16, 300 if backend == "cpp" else 130, device=device, bias=True
    )

    def f(h, y, **kw):
        return ppokernels.linear_logprobs(
            h, weight, y, bias=b, with_entropy=True, backend=backend, **kw
        )

    lp, ent = f(hidden, labels)
    with torch.no_grad():  # PPO's old logprobs: the same bits as the training forward
        lp0, _ = f(hidden.requires_grad_(), labels)
    assert torch.equal(lp, lp0)
    for chunk in (16, 48, 1000):
        assert torch.equal(f(hidden, labels, chunk_size=chunk)[0], lp)
    cut = n // 3  # micro-batches, and single rows
    parts = [f(hidden[:cut], labels[:cut]), f(hidden[cut:], labels[cut:])]
    assert torch.equal(torch.cat([p[0] for p in parts]), lp)
    assert torch.equal(torch.cat([p[1] for p in parts]), ent)
    assert torch.equal(f(hidden[5:6], labels[5:6])[0], lp[5:6])


@CPP
def test_int64_offsets_cpu():
    """N * V > 2^31 with small H: never materialised, so quick."""
    n, V, H = 16384, 151936, 8
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (n,), generator=g)
    lp, _ = ppokernels.linear_logprobs(hidden, weight, labels, backend="cpp")
    lp.sum().backward()
    rows = torch.tensor([0, 7, n // 2, n - 1])
    h64 = hidden.detach()[rows].double().requires_grad_()
    e_lp, _ = reference.linear_logprobs(h64, weight.double(), labels[rows])
    e_lp.sum().backward()
    torch.testing.assert_close(lp[rows].double(), e_lp, **TOL32)
    torch.testing.assert_close(hidden.grad[rows].double(), h64.grad, **TOL32)


@pytest.mark.parametrize("device, backend", KERNELS)
def test_bf16_error_vs_eager(device, backend):
    hidden, weight, labels, _ = _inputs(12, 64, 500, torch.bfloat16, device, scale=1.0)
    lp, ent = ppokernels.linear_logprobs(
        hidden, weight, labels, with_entropy=True, temperature=0.7, backend=backend
    )
    e_lp, e_ent = reference.linear_logprobs(
        hidden.double(), weight.double(), labels, with_entropy=True, temperature=0.7
    )
    logits = (hidden @ weight.T) / 0.7  # what a trainer computes in bf16
    eager_lp = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    eager_lp = torch.where(labels == -100, 0, eager_lp)
    assert lp.dtype == torch.float32
    assert_close_to_reference(lp, e_lp, eager_lp)
    eager_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    eager_ent = torch.where(labels == -100, 0, eager_ent)
    assert_close_to_reference(ent, e_ent, eager_ent)


@CPP
def test_opcheck_and_compile():
    hidden, weight, labels, b = _inputs(6, 8, 40, bias=True)
    args = (hidden.requires_grad_(), weight.requires_grad_(), labels, b, 0.7, -100, 0, 16)
    torch.library.opcheck(torch.ops.ppokernels.linear_logprobs.default, args)

    def fn(h, w):
        lp, ent = ppokernels.linear_logprobs(h, w, labels, with_entropy=True, backend="cpp")
        return lp.sum() + ent.sum()

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, weight), fn(hidden, weight))


def _tp_worker(rank, world, init_file, backend):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    hidden, weight, labels, b = _inputs(10, 8, 301, bias=True)
    g_lp, g_ent = torch.randn(10), torch.randn(10)
    v = [0, 140, 301]  # uneven shards
    shard = [t[v[rank] : v[rank + 1]].clone().requires_grad_() for t in (weight, b)]
    h = hidden.clone().requires_grad_()
    lp, ent = ppokernels.linear_logprobs(
        h,
        shard[0],
        labels,
        bias=shard[1],
        temperature=0.7,
        with_entropy=True,
        process_group=dist.group.WORLD,
        backend=backend,
    )
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    ref = [t.double().requires_grad_() for t in (hidden, weight, b)]
    e_lp, e_ent = reference.linear_logprobs(
        ref[0], ref[1], labels, bias=ref[2], temperature=0.7, with_entropy=True
    )
    ((e_lp * g_lp.double()).sum() + (e_ent * g_ent.double()).sum()).backward()
    torch.testing.assert_close(lp.double(), e_lp, **TOL32)
    torch.testing.assert_close(ent.double(), e_ent, **TOL32)
    torch.testing.assert_close(h.grad.double(), ref[0].grad, **TOL32)
    for s, r in zip(shard, ref[1:], strict=True):
        torch.testing.assert_close(s.grad.double(), r.grad[v[rank] : v[rank + 1]], **TOL32)
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_tensor_parallel_gloo(backend):
    if backend == "cpp" and binary_skip_reason():
        pytest.skip(binary_skip_reason())
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_tp_worker, args=(2, os.path.join(d, "init"), backend), nprocs=2)


def test_bad_input():
    hidden, weight, labels, _ = _inputs(4, 8, 50)
    f = ppokernels.linear_logprobs
    with pytest.raises(ValueError, match="linear_logprobs: weight has H = 7"):
        f(hidden, weight[:, :7], labels)
    with pytest.raises(TypeError, match="linear_logprobs: labels must be int64 or int32"):
        f(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="linear_logprobs: labels must be in \\[0, 50\\)"):
        f(hidden, weight, torch.tensor([0, 1, 50, 2]))
    with pytest.raises(ValueError, match="linear_logprobs: labels must be in"):
        f(hidden, weight, torch.tensor([0, -5, 3, 2]))
    with pytest.raises(ValueError, match="linear_logprobs: labels has shape"):
        f(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="linear_logprobs: labels is on meta"):
        f(hidden, weight, labels.to("meta"))
    with pytest.raises(ValueError, match="linear_logprobs: hidden is on the meta device"):
        f(hidden.to("meta"), weight.to("meta"), labels.to("meta"))
    with pytest.raises(TypeError, match="linear_logprobs: weight is torch.float64"):
        f(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="linear_logprobs: bias has 3 entries"):
        f(hidden, weight, labels, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="linear_logprobs: temperature must be > 0"):
        f(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="linear_logprobs: chunk_size"):
        f(hidden, weight, labels, chunk_size=0)
    assert f(hidden, weight, labels.int())[0].shape == (4,)  # int32 labels are fine


def test_fastest_gpu_table_by_op_and_dtype(monkeypatch):
    """auto on CUDA reads FASTEST_GPU: an "<op>:<dtype>" entry wins over "<op>", Triton else."""
    from ppokernels import _backend

    monkeypatch.setattr(_backend, "FASTEST_GPU", {"linear_logprobs": "cpp"})
    assert _backend.fastest_gpu("linear_logprobs", torch.bfloat16) == "cpp"
    assert _backend.fastest_gpu("token_logprobs", torch.bfloat16) == "triton"
    monkeypatch.setattr(
        _backend, "FASTEST_GPU", {"linear_logprobs": "cpp", "linear_logprobs:bfloat16": "triton"}
    )
    assert _backend.fastest_gpu("linear_logprobs", torch.bfloat16) == "triton"
    assert _backend.fastest_gpu("linear_logprobs", torch.float32) == "cpp"
    assert _backend.fastest_gpu("linear_logprobs") == "cpp"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cpp_matches_triton_and_reference(dtype):
    """The cuBLAS path (backend="cpp" on CUDA) against the fp64 reference and the Triton path,
    forward and backward, with bias, holes and a row count that is not a multiple of 16."""
    h, w, y, b = _inputs(37, 64, 1271, dtype=dtype, device="cuda", bias=True)
    ref_lp, ref_ent = reference.linear_logprobs(
        h.double(), w.double(), y, bias=b.double(), with_entropy=True
    )
    tol = (
        TOL32 if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    )  # fp32 math on bf16 inputs
    for backend in ("cpp", "triton"):
        lp, ent = ppokernels.linear_logprobs(h, w, y, bias=b, with_entropy=True, backend=backend)
        torch.testing.assert_close(lp.double(), ref_lp, **tol)
        torch.testing.assert_close(ent.double(), ref_ent, **tol)
    # a row's bits do not depend on the batch it is in (fixed GEMM shape)
    lp_all, _ = ppokernels.linear_logprobs(h, w, y, bias=b, backend="cpp")
    lp_one, _ = ppokernels.linear_logprobs(h[5:6], w, y[5:6], bias=b, backend="cpp")
    assert torch.equal(lp_all[5:6], lp_one)
