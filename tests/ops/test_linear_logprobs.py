"""linear_logprobs: the conformance blocks from ``ppokernels.testing`` ([B, T, H] and [N, H]
hidden, bias or none, temperature, entropy or none, row chunks, no logits cache; fp32 and fp64
against the fp64 reference on every backend, gradients of hidden, weight and bias; gradcheck,
opcheck, compile, bad input), then what is special to the op: real vocabularies, rows that are
all ignored, a frozen weight, bitwise determinism and batch invariance, int64 offsets, bf16
error against eager, tensor parallelism over gloo, the logits cache (same bits as recomputing,
its size, the GEMMs it saves, retain_graph)."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import ppokernels
from ppokernels import reference
from ppokernels.ops.linear_logprobs import CACHE_BYTES
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


def _reference(hidden, weight, labels, *, chunk_size=None, **kw):
    """The specification; ``chunk_size`` only tiles the kernels' work."""
    return reference.linear_logprobs(hidden, weight, labels, **kw)


def samples(device, dtype):
    out = []
    for temperature in (1.0, 0.7):
        for bias in (False, True):
            hidden, weight, labels, b = _inputs(2 * 9, 24, 1271, dtype, device, bias=bias)
            kw = dict(bias=b, with_entropy=True, temperature=temperature)
            args = (hidden.view(2, 9, 24), weight, labels.view(2, 9))  # [B, T, H]
            out.append(Sample(args, kw, f"t{temperature}-{'bias' if bias else 'nobias'}"))
    hidden, weight, labels, b = _inputs(37, 16, 301, dtype, device, bias=True)
    out.append(Sample((hidden, weight, labels), dict(bias=b), "no-entropy"))
    kw = dict(bias=b, with_entropy=True, chunk_size=16, cache_bytes=0)
    out.append(Sample((hidden, weight, labels), kw, "chunks16-no-cache"))
    kw = dict(with_entropy=True, chunk_size=16, cache_bytes=16 * 301 * 4)  # one chunk cached
    out.append(Sample((hidden, weight, labels), kw, "chunks16-part-cache"))
    hidden, weight, labels, b = _inputs(5, 3, 7, dtype, device, bias=True)
    kw = dict(bias=b, temperature=0.7, with_entropy=True)
    out.append(Sample((hidden, weight, labels), kw, "small"))
    kw = dict(bias=b, with_entropy=True, ignore_index=-1)
    out.append(Sample((hidden, weight, torch.full_like(labels, -1)), kw, "all-ignored"))
    out.append(Sample((hidden[:0], weight, labels[:0]), dict(with_entropy=True), "empty"))
    return out


def _tol(dtype, backend):
    return TOL32 if dtype == torch.float32 else TOL[torch.float64]


def _opcheck(s):
    hidden, weight, labels = s.args
    kw = dict(bias=None, temperature=1.0, ignore_index=-100, chunk_size=16) | s.kwargs
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
    H = hidden.shape[-1]
    args = (
        leaf(hidden.reshape(-1, H)),
        leaf(weight),
        labels.reshape(-1),
        leaf(kw["bias"]),
        kw["temperature"],
        kw["ignore_index"],
        0,  # vocab_start: the whole vocabulary
        kw["chunk_size"],
    )
    op = torch.ops.ppokernels.linear_logprobs.default
    return [(op, (*args, 0)), (op, (*args, CACHE_BYTES))]  # without and with the logits cache


def _bad_inputs():
    hidden, weight, labels, _ = _inputs(4, 8, 50)
    f = ppokernels.linear_logprobs
    r = reference.linear_logprobs
    name = "linear_logprobs"
    return [
        (lambda: f(hidden, weight[:, :7], labels), ValueError, f"{name}: weight has H = 7"),
        (
            lambda: f(hidden, weight, labels.float()),
            TypeError,
            f"{name}: labels must be int64 or int32",
        ),
        (
            lambda: f(hidden, weight, torch.tensor([0, 1, 50, 2])),
            ValueError,
            rf"{name}: labels must be in \[0, 50\)",
        ),
        (
            lambda: f(hidden, weight, torch.tensor([0, -5, 3, 2])),
            ValueError,
            f"{name}: labels must be in",
        ),
        (lambda: f(hidden, weight, labels[:3]), ValueError, f"{name}: labels has shape"),
        (lambda: f(hidden, weight, labels.to("meta")), ValueError, f"{name}: labels is on meta"),
        (
            lambda: f(hidden.to("meta"), weight.to("meta"), labels.to("meta")),
            ValueError,
            f"{name}: hidden is on the meta device",
        ),
        (lambda: f(hidden, weight.double(), labels), TypeError, f"{name}: weight is torch.float64"),
        (
            lambda: f(hidden, weight, labels, bias=torch.zeros(3)),
            ValueError,
            f"{name}: bias has 3 entries",
        ),
        (
            lambda: f(hidden, weight, labels, temperature=0.0),
            ValueError,
            f"{name}: temperature must be > 0",
        ),
        (lambda: f(hidden, weight, labels, chunk_size=0), ValueError, f"{name}: chunk_size"),
        (
            lambda: f(hidden, weight, labels, cache_bytes=-1),
            ValueError,
            f"{name}: cache_bytes must be >= 0",
        ),
        (
            lambda: f(hidden, weight, labels, cache_bytes=1.5),
            TypeError,
            f"{name}: cache_bytes must be an int",
        ),
        (
            lambda: f(hidden, weight, labels, cache_bytes=True),
            TypeError,
            f"{name}: cache_bytes must be an int",
        ),
        (
            lambda: r(hidden, weight, labels, cache_bytes=-1),
            ValueError,
            f"{name}: cache_bytes must be an int >= 0",
        ),
        (lambda: f(hidden, weight, labels, backend="fast"), ValueError, f"{name}: backend"),
    ]


SPEC = OpSpec(
    name="linear_logprobs",
    fn=ppokernels.linear_logprobs,
    reference=_reference,
    samples=samples,
    differentiable=(0, 1, "bias"),
    bad_inputs=_bad_inputs(),
    opcheck=_opcheck,
    tolerances=_tol,
    gradcheck_samples=["small"],
    opcheck_samples=["chunks16-no-cache"],
    compile_samples=["chunks16-no-cache", "t0.7-bias"],
)
globals().update(conformance_tests(SPEC))


def test_int32_labels():
    hidden, weight, labels, _ = _inputs(4, 8, 50)
    got = ppokernels.linear_logprobs(hidden, weight, labels.int())[0]
    torch.testing.assert_close(got, ppokernels.linear_logprobs(hidden, weight, labels)[0])


def _check(device, backend, hidden, weight, labels, bias, temperature, tol):
    """The op against the fp64 reference, forward and backward, and zeros on ignored rows."""
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    lp, ent = ppokernels.linear_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        with_entropy=True,
        temperature=temperature,
        backend=backend,
    )
    ref = [t.detach().double().requires_grad_() for t in leaves]
    b64 = ref[2] if bias is not None else None
    e_lp, e_ent = reference.linear_logprobs(
        ref[0], ref[1], labels, bias=b64, with_entropy=True, temperature=temperature
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


def _tp_worker(rank, world, init_file, backend, cache_bytes):
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
        cache_bytes=cache_bytes,
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


# cpp: no cache, a cache of one of the two row chunks (10 rows in chunks of 16: the budget holds
# 16 x 140 fp32 on rank 0 only), and the default (all cached)
@pytest.mark.parametrize(
    "backend, cache_bytes",
    [("cpp", 0), ("cpp", 16 * 140 * 4), ("cpp", CACHE_BYTES), ("reference", CACHE_BYTES)],
)
def test_tensor_parallel_gloo(backend, cache_bytes):
    if backend == "cpp" and binary_skip_reason():
        pytest.skip(binary_skip_reason())
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_tp_worker, args=(2, os.path.join(d, "init"), backend, cache_bytes), nprocs=2)


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
    for backend in ("cpp", "triton"):  # logits cache: none, part of the rows (one tile), all
        _check_cache(backend, "cuda", dtype, [0, 1024 * 1024 * 4, CACHE_BYTES])
    # a row's bits do not depend on the batch it is in (fixed GEMM shape)
    lp_all, _ = ppokernels.linear_logprobs(h, w, y, bias=b, backend="cpp")
    lp_one, _ = ppokernels.linear_logprobs(h[5:6], w, y[5:6], bias=b, backend="cpp")
    assert torch.equal(lp_all[5:6], lp_one)


# ----------------------------------------------------------------------- the logits cache
def _cache_elems(backend, device, dtype, n, V, cache_bytes, chunk_size):
    """Entries of the forward's logits cache (the op's fourth output)."""
    hidden, weight, labels, _ = _inputs(n, 8, V, dtype, device)
    op = torch.ops.ppokernels.linear_logprobs if backend == "cpp" else None
    op = op or torch.ops.ppokernels.linear_logprobs_triton
    return op(hidden, weight, labels, None, 1.0, -100, 0, chunk_size, cache_bytes)[3].numel()


def _run(backend, device, hidden, weight, labels, bias, cache_bytes, chunk_size):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = ppokernels.linear_logprobs(
        leaves[0],
        leaves[1],
        labels,
        bias=leaves[2],
        temperature=0.7,
        with_entropy=True,
        chunk_size=chunk_size,
        cache_bytes=cache_bytes,
        backend=backend,
    )
    g = torch.linspace(-1, 1, lp.numel(), device=device, dtype=lp.dtype)
    grads = torch.autograd.grad((lp, ent), leaves, (g, 0.3 * g.flip(0)))
    return lp, ent, grads, leaves


def _check_cache(backend, device, dtype, budgets, n=60, V=9000, chunk_size=16):
    """Every budget gives the same bits as budget 0 (the cached tiles are the GEMM's own output),
    forward and backward, and the fp64 reference's numbers."""
    hidden, weight, labels, b = _inputs(n, 16, V, dtype, device, bias=True)
    base = _run(backend, device, hidden, weight, labels, b, 0, chunk_size)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, b))
    e_lp, e_ent = reference.linear_logprobs(
        h64, w64, labels, bias=b64, temperature=0.7, with_entropy=True, cache_bytes=budgets[-1]
    )
    g = torch.linspace(-1, 1, n, device=device, dtype=torch.float64)
    want = torch.autograd.grad((e_lp, e_ent), (h64, w64, b64), (g, 0.3 * g.flip(0)))
    tol = TOL32 if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-3)
    for budget in budgets:
        lp, ent, grads, _ = _run(backend, device, hidden, weight, labels, b, budget, chunk_size)
        assert torch.equal(lp, base[0]) and torch.equal(ent, base[1]), budget
        for got, ref in zip(grads, base[2], strict=True):
            assert torch.equal(got, ref), budget
        torch.testing.assert_close(lp.double(), e_lp, **tol)
        torch.testing.assert_close(ent.double(), e_ent, **tol)
        for got, ref in zip(grads, want, strict=True):
            torch.testing.assert_close(got.double(), ref, **tol)
        ignored = labels == -100
        assert (grads[0][ignored] == 0).all() and (lp[ignored] == 0).all()


# Budgets for n = 60 valid-or-ignored rows (40 valid, in row chunks of 16 padded rows), V = 9000
# (vocabulary blocks of 4096, 4096, 808 in the C++ kernels): cpp: one [16, 4096] fp32 tile, one
# whole chunk and two tiles of the next, all; Triton: 5 and 30 rows, all.
CPP_BUDGETS = [16 * 4096 * 4, (16 * 9000 + 2 * 16 * 4096) * 4, CACHE_BYTES]
TRITON_BUDGETS = [5 * 9000 * 4, 30 * 9000 * 4, CACHE_BYTES]


@pytest.mark.parametrize("device, backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_cache_same_bits_as_recompute(device, backend, dtype):
    budgets = CPP_BUDGETS if backend == "cpp" else TRITON_BUDGETS
    _check_cache(backend, device, dtype, [0, *budgets])


@pytest.mark.parametrize("device, backend", KERNELS)
def test_logits_cache_size_follows_budget(device, backend):
    """The cache is never over budget: whole tiles (C++) or rows (Triton), in order."""
    budgets = CPP_BUDGETS if backend == "cpp" else TRITON_BUDGETS
    sizes = [_cache_elems(backend, device, torch.float32, 60, 9000, c, 16) for c in budgets]
    if backend == "cpp":  # 40 valid rows: 3 chunks of 16 rows (the last padded) x 9000
        assert sizes == [16 * 4096, 16 * 9000 + 2 * 16 * 4096, 3 * 16 * 9000]
    else:
        assert sizes == [5 * 9000, 30 * 9000, 40 * 9000]
    assert _cache_elems(backend, device, torch.float32, 60, 9000, 16 * 4096 * 4 - 1, 16) == (
        0 if backend == "cpp" else 7 * 9000
    )
    assert _cache_elems(backend, device, torch.float32, 60, 9000, 0, 16) == 0


@CPP
@pytest.mark.parametrize("cache_bytes", [0, 48 * 4096 * 4, CACHE_BYTES])
def test_logits_cache_saves_the_logits_gemm(cache_bytes):
    """Backward GEMMs (aten::mm, counted by the profiler): three per [rows, block] tile without a
    cache (logits, grad_hidden, grad_weight), two per cached tile. 40 rows in one chunk of 48
    (the default), V = 9000: three vocabulary blocks."""
    hidden, weight, labels, _ = _inputs(60, 16, 9000)
    hidden.requires_grad_()
    weight.requires_grad_()
    lp, _ = ppokernels.linear_logprobs(hidden, weight, labels, cache_bytes=cache_bytes)
    with torch.profiler.profile() as prof:
        lp.sum().backward()
    mm = sum(e.count for e in prof.key_averages() if e.key == "aten::mm")
    cached = {0: 0, 48 * 4096 * 4: 1, CACHE_BYTES: 3}[cache_bytes]  # one tile is 48 x 4096
    assert mm == 3 * 3 - cached


@pytest.mark.parametrize("device, backend", PARAMS)
def test_logits_cache_retain_graph(device, backend):
    """backward(retain_graph=True) then backward(): the second reads the same intact cache."""
    hidden, weight, labels, b = _inputs(20, 8, 300, device=device, bias=True)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    lp, ent = ppokernels.linear_logprobs(
        hidden, weight, labels, bias=b, with_entropy=True, backend=backend
    )
    loss = (lp * torch.linspace(-1, 1, 20, device=device)).sum() + 0.1 * ent.sum()
    once = torch.autograd.grad(loss, leaves, retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    for leaf, g in zip(leaves, once, strict=True):
        assert torch.equal(leaf.grad, 2 * g)


class _RecordForward(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.budgets = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "linear_logprobs" in name and "backward" not in name:
            self.budgets.append(args[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device, backend", KERNELS)
def test_logits_cache_only_when_a_gradient_is_wanted(device, backend):
    hidden, weight, labels, _ = _inputs(6, 8, 40, device=device)
    f = ppokernels.linear_logprobs
    with _RecordForward() as rec:
        f(hidden, weight, labels, backend=backend)  # nothing requires grad
        with torch.no_grad():
            f(hidden.requires_grad_(), weight, labels, backend=backend)
        f(hidden, weight, labels, backend=backend)
        f(hidden, weight, labels, cache_bytes=123, backend=backend)
    assert rec.budgets == [0, 0, CACHE_BYTES, 123]


@CPP
def test_logits_cache_large_vocab_partial_chunk():
    """V = 151936 (38 blocks, the last 384 wide), 3 rows: a budget of 5 [16, 4096] tiles caches
    the first 5 blocks and recomputes the other 33; the same bits as no cache, the reference's
    numbers."""
    _check_cache("cpp", "cpu", torch.float32, [0, 5 * 16 * 4096 * 4], n=3, V=151936, chunk_size=16)


@CPP
def test_logits_cache_rejects_a_foreign_cache():
    hidden, weight, labels, _ = _inputs(20, 8, 300)
    args = (hidden, weight, labels, None, 1.0, -100, 0, 16)
    _, lse, ent, cache = torch.ops.ppokernels.linear_logprobs(*args, CACHE_BYTES)
    g = torch.ones_like(lse)
    bwd = torch.ops.ppokernels.linear_logprobs_backward
    with pytest.raises(RuntimeError, match="logits_cache does not match"):
        bwd(
            g, g, g, hidden, weight, labels, None, lse, ent, cache[:-1], 1.0, -100, 0, 16, [1, 1, 0]
        )
