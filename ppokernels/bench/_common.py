"""Shared benchmark helpers: machine limits, peak memory, providers, extra_info records.

The machine's limits (copy bandwidth, matmul rate) are measured once per ``ppokernels bench`` run
by the parent process and handed to every benchmark process in ``PPK_BENCH_LIMITS`` (JSON), so all
percentages of one run refer to the same measurement; without it they are measured here, once.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import time

import torch

from ppokernels.testing import available_backends


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, reps: int) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


DTYPE_KEY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _given_limit(key: str) -> float | None:
    return json.loads(os.environ.get("PPK_BENCH_LIMITS") or "{}").get(key)


@functools.cache
def copy_bandwidth_gbs(device: str) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    given = _given_limit("copy_bandwidth_gbs")
    if given:
        return float(given)
    n = (256 if device == "cuda" else 64) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    sec = min(_time(lambda: dst.copy_(src), device, 5) for _ in range(3))
    return 2 * src.numel() * 4 / sec / 1e9


@functools.cache
def matmul_tflops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense matmul rate in TFLOP/s for square matrices in ``dtype``."""
    given = _given_limit(f"matmul_{DTYPE_KEY.get(dtype, dtype)}_tflops")
    if given:
        return float(given)
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = min(_time(lambda: a @ b, device, 3) for _ in range(3))
    return 2 * n**3 / sec / 1e12


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory_mb(fn, device: str) -> float:
    """Peak memory that ``fn()`` allocates above what is live when it starts, in MiB.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) above its resident set at the start; large CPU allocations are mmap'd
    and returned on free, so this follows the tensors' lifetimes.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        return float("nan")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS:")
    fn()
    return max(_rss("VmHWM:") - base, 0) / 2**20


def ppokernels_providers(device: str) -> list[str]:
    """``ppokernels-<backend>`` for every built backend (the interpreter is not benchmarked)."""
    out = []
    if "cpp" in available_backends(device):
        out.append("ppokernels-cpp")
    if device == "cuda" and "triton" in available_backends(device):
        out.append("ppokernels-triton")
    return out


def provider_fn(provider: str, reference_fn, op, *, result=None, **kwargs):
    """The callable of provider ``"reference"``, ``"reference-compiled"`` or
    ``"ppokernels-<backend>"`` for one op: ``reference_fn`` (eager or under torch.compile) or the
    public ``op`` on that backend, each with ``kwargs``; ``result`` picks the timed output (e.g.
    ``.loss`` of a named tuple)."""
    if provider == "reference":
        fn = functools.partial(reference_fn, **kwargs)
    elif provider == "reference-compiled":
        fn = functools.partial(torch.compile(reference_fn), **kwargs)
    elif provider.startswith("ppokernels-"):
        fn = functools.partial(op, backend=provider.removeprefix("ppokernels-"), **kwargs)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return fn if result is None else (lambda *args: result(fn(*args)))


# seconds of timed rounds per case on a GPU (PPK_BENCH_CASE_SECONDS; the GPU check uses 0.5)
CUDA_CASE_SECONDS = float(os.environ.get("PPK_BENCH_CASE_SECONDS", "2.0"))


def run(
    benchmark,
    fn,
    *,
    device: str,
    provider: str,
    bytes_moved: float | None = None,
    flops: float | None = None,
    measure_memory: bool = True,
):
    """Times ``fn`` with pytest-benchmark and records peak memory, GB/s and FLOP/s as extra_info
    (with the fraction of the machine's measured copy bandwidth / matmul rate)."""
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["device"] = device
    disabled = getattr(benchmark, "disabled", False)
    if measure_memory and not disabled:
        benchmark.extra_info["peak_mem_mb"] = round(peak_memory_mb(fn, device), 2)
    if device == "cuda" and not disabled:
        # synchronised rounds; slow providers (the trainers' per-row loops) get fewer rounds, so
        # one case stays near CUDA_CASE_SECONDS and the GPU check fits its time box
        once = _time(fn, device, 1)  # also the warm-up (compilation, autotuning, allocator)
        rounds = max(3, min(20, int(CUDA_CASE_SECONDS / max(once, 1e-6))))
        result = benchmark.pedantic(lambda: (fn(), sync(device)), rounds=rounds, warmup_rounds=1)
    else:
        result = benchmark(fn)
    if disabled or benchmark.stats is None:
        return result
    median = benchmark.stats.stats.median
    if bytes_moved:
        gbs = bytes_moved / median / 1e9
        benchmark.extra_info["gbps"] = round(gbs, 2)
        benchmark.extra_info["pct_copy_bw"] = round(100 * gbs / copy_bandwidth_gbs(device), 1)
    if flops:
        tf = flops / median / 1e12
        benchmark.extra_info["tflops"] = round(tf, 3)
    return result


def run_mode(benchmark, fn, args, mode: str, *, group: str, grad=None, **kw):
    """Times ``fn(*args)`` and, unless ``mode == "forward"``, its backward (with upstream ``grad``;
    None for a scalar loss), as pytest-benchmark group ``group``; ``kw`` go to :func:`run`."""

    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def step():
        out = fn(*args)
        if mode != "forward":
            out.backward(grad)
            # the gradient is handed on, as to the layer below in training (bench_token_logprobs
            # does
            # the same); summing it into a kept .grad would add a read-modify-write pass over the
            # input, the same for every provider, that a training step does not have
            for a in leaves:
                a.grad = None
        return out

    benchmark.group = group
    return run(benchmark, step, **kw)
