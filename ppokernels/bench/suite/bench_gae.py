"""gae: ppokernels scans vs the Python loop the trainers run (OpenRLHF, TRL, veRL), and vs that
loop with its step compiled by torch.compile (compiling the whole unrolled loop of T steps is not
practical at T = 2048..32768).

Bytes per token (forward): rewards and values read (2 x 4 B), mask read (1 B), advantages and
returns written (2 x 4 B): 17 B. ``io_x`` in extra_info is the median time over the time needed to
move those bytes once at the copy bandwidth measured in the same run (target <= 3).
"""

import functools

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import copy_bandwidth_gbs, ppokernels_providers, run

SHAPES = {
    "tiny": [(4, 64)],
    "demo": [(64, 2048)],
    "cpu": [(64, 2048), (256, 1024), (8, 32768), (256, 4096)],
    "llm": [(64, 2048), (256, 4096), (8, 32768), (4096, 256)],
}
GAMMA, LAM = 0.99, 0.95


def providers(device):
    return ["reference", "reference-compiled-step", *ppokernels_providers(device)]


@functools.cache
def _compiled_step():
    @torch.compile(dynamic=False)
    def step(r_t, v_t, m_t, nextvalues, lastgaelam):
        delta = r_t + GAMMA * nextvalues - v_t
        gaelam = delta + GAMMA * LAM * lastgaelam
        return torch.where(m_t, gaelam, lastgaelam), torch.where(m_t, v_t, nextvalues)

    return step


def _reference_compiled_step(r, v, m):
    step = _compiled_step()
    nextvalues = r.new_zeros(r.shape[0])
    lastgaelam = r.new_zeros(r.shape[0])
    advantages = torch.empty_like(r)
    for t in reversed(range(r.shape[1])):
        lastgaelam, nextvalues = step(r[:, t], v[:, t], m[:, t], nextvalues, lastgaelam)
        advantages[:, t] = lastgaelam
    return advantages, advantages + v


def _fn(provider):
    if provider == "reference":
        return lambda r, v, m: reference.gae(r, v, m, gamma=GAMMA, lam=LAM, mode="skip")
    if provider == "reference-compiled-step":
        return _reference_compiled_step
    backend = provider.removeprefix("ppokernels-")
    return lambda r, v, m: ppokernels.gae(r, v, m, gamma=GAMMA, lam=LAM, backend=backend)


def _inputs(shape, device):
    r = torch.randn(shape, device=device)
    v = torch.randn(shape, device=device)
    m = torch.rand(shape, device=device) > 0.1
    return r, v, m


def test_gae_forward(benchmark, shape, provider, device):
    r, v, m = _inputs(shape, device)
    fn = _fn(provider)
    benchmark.group = f"gae forward {shape}"
    nbytes = r.numel() * 17
    run(benchmark, lambda: fn(r, v, m), device=device, provider=provider, bytes_moved=nbytes)
    if benchmark.stats is not None and not getattr(benchmark, "disabled", False):
        io_time = nbytes / (copy_bandwidth_gbs(device) * 1e9)
        benchmark.extra_info["io_x"] = round(benchmark.stats.stats.median / io_time, 2)


@pytest.mark.parametrize("mode", ["skip", "zero"])
def test_gae_forward_backward(benchmark, shape, provider, device, mode):
    if provider.startswith("reference") and shape[1] > 2048:
        pytest.skip("the Python loop's autograd graph at T > 2048 only measures Python overhead")
    r, v, m = _inputs(shape, device)
    r.requires_grad_(True)
    v.requires_grad_(True)
    g = torch.randn(shape, device=device)
    if provider == "reference":
        fn = lambda: reference.gae(r, v, m, gamma=GAMMA, lam=LAM, mode=mode)  # noqa: E731
    elif provider == "reference-compiled-step":
        pytest.skip("forward-only baseline")
    else:
        backend = provider.removeprefix("ppokernels-")
        fn = lambda: ppokernels.gae(
            r,
            v,
            m,
            gamma=GAMMA,
            lam=LAM,
            mode=mode,  # noqa: E731
            backend=backend,
        )

    def step():
        adv, ret = fn()
        torch.autograd.backward((adv, ret), (g, g))

    benchmark.group = f"gae forward+backward {mode} {shape}"
    run(benchmark, step, device=device, provider=provider, bytes_moved=r.numel() * 33)
