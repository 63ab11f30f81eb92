"""kl_penalty forward + backward: ppokernels kernels vs the reference (eager and compiled).

Bytes per token: forward reads logprobs and ref_logprobs and writes the KL (3 x 4 B); backward
reads the upstream gradient and both inputs and writes one gradient (4 x 4 B).
"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import ppokernels_providers, run_mode

SHAPES = {"tiny": [(4, 64)], "cpu": [(64, 2048), (256, 4096)], "llm": [(256, 4096), (1024, 8192)]}


def providers(device):
    return ["reference", "reference-compiled", *ppokernels_providers(device)]


def _fn(provider):
    if provider == "reference":
        return lambda a, b: reference.kl_penalty(a, b, estimator="k3")
    if provider == "reference-compiled":
        return torch.compile(lambda a, b: reference.kl_penalty(a, b, estimator="k3"))
    backend = provider.removeprefix("ppokernels-")
    return lambda a, b: ppokernels.kl_penalty(a, b, estimator="k3", backend=backend)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_kl_penalty(benchmark, shape, provider, device, mode):
    lp = torch.randn(shape, device=device, requires_grad=mode != "forward")
    ref = torch.randn(shape, device=device)
    grad = torch.randn(shape, device=device)
    n = lp.numel()
    run_mode(
        benchmark,
        _fn(provider),
        (lp, ref),
        mode,
        grad=grad,
        group=f"kl_penalty {mode} {shape}",
        device=device,
        provider=provider,
        bytes_moved=n * 4 * (3 if mode == "forward" else 7),
    )
