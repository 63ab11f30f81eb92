"""masked_whiten, forward and forward + backward: ppokernels kernels vs the reference (eager and
compiled).

Bytes per entry (the minimum any implementation must move, fp32 data, bool mask): forward reads x
and the mask and writes y (4 + 1 + 4 B); its backward reads the upstream gradient, x and the mask
and writes dx (4 + 4 + 1 + 4 B). The kernels read x three times (two reduction passes and the
output pass), so 100% of copy bandwidth is out of reach by design.
"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import ppokernels_providers, provider_fn, run_mode

SHAPES = {"tiny": [(4, 64)], "cpu": [(64, 2048), (256, 4096)], "llm": [(256, 4096), (1024, 8192)]}


def providers(device):
    return ["reference", "reference-compiled", *ppokernels_providers(device)]


def _whiten(provider):
    return provider_fn(provider, reference.masked_whiten, ppokernels.masked_whiten)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_masked_whiten(benchmark, shape, provider, device, mode):
    x = torch.randn(shape, device=device, requires_grad=mode != "forward")
    lengths = torch.randint(shape[1] // 4, shape[1] + 1, (shape[0], 1), device=device)
    mask = torch.arange(shape[1], device=device) < lengths  # right-padded responses
    grad = torch.randn(shape, device=device)
    run_mode(
        benchmark,
        _whiten(provider),
        (x, mask),
        mode,
        grad=grad,
        group=f"masked_whiten {mode} {shape}",
        device=device,
        provider=provider,
        bytes_moved=x.numel() * (9 if mode == "forward" else 22),
    )
