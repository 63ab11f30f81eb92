"""group_advantages, forward and forward + backward: ppokernels kernels vs the reference (eager and
compiled).

Bytes per sample (the minimum any implementation must move): scores, int64 group ids and the
output (4 + 8 + 4 B), twice with the backward.
"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import ppokernels_providers, provider_fn, run_mode
from ppokernels.bench.plugin import preset_shapes

# (batch B, samples per prompt)
GROUP_SHAPES = {"tiny": [(16, 4)], "cpu": [(4096, 8), (4096, 16)], "llm": [(4096, 16), (65536, 16)]}


def pytest_generate_tests(metafunc):
    if "group_shape" in metafunc.fixturenames:
        shapes = preset_shapes(GROUP_SHAPES, metafunc.config)
        metafunc.parametrize("group_shape", shapes, ids=[str(s) for s in shapes])


def providers(device):
    return ["reference", "reference-compiled", *ppokernels_providers(device)]


def _group(provider):
    return provider_fn(provider, reference.group_advantages, ppokernels.group_advantages)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_group_advantages(benchmark, group_shape, provider, device, mode):
    b, k = group_shape
    scores = torch.randn(b, device=device, requires_grad=mode != "forward")
    ids = torch.arange(b, device=device) // k  # veRL uids map to such ids
    ids = ids[torch.randperm(b, device=device)] * 7 + 3  # shuffled, non-contiguous
    grad = torch.randn(b, device=device)
    run_mode(
        benchmark,
        _group(provider),
        (scores, ids),
        mode,
        grad=grad,
        group=f"group_advantages {mode} B={b} group={k}",
        device=device,
        provider=provider,
        bytes_moved=b * (16 if mode == "forward" else 32),
    )
