"""value_loss, forward and forward + backward: the fused kernels vs the eager formula as the
trainers write it (veRL's clipped value loss with agg_loss and the clipfrac metric:
ppokernels.bench.eager), and the reference compiled.

Bytes per token (fp32 data, bool mask): forward reads values, old_values, returns and the mask
(13 B); backward reads them again and writes the gradient (17 B).
"""

import pytest

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import ppokernels_providers, provider_fn, run_mode
from ppokernels.bench.eager import eager_value_loss, loss_inputs

SHAPES = {
    "tiny": [(4, 64)],
    "cpu": [(64, 2048), (256, 4096)],
    "llm": [(256, 4096), (1024, 8192)],
}
AGG = "token-mean"


def providers(device):
    return ["eager-formula", "reference-compiled", *ppokernels_providers(device)]


def _value_fn(provider):
    if provider == "eager-formula":
        return lambda v, vo, ret, m: eager_value_loss(v, ret, vo, m.float(), agg=AGG)[0]
    return provider_fn(
        provider,
        reference.value_loss,
        ppokernels.value_loss,
        result=lambda out: out.loss,
        clip=0.5,
        agg=AGG,
    )


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_value_loss(benchmark, shape, provider, device, mode):
    data = loss_inputs(shape, device, mode)  # values, old_values, returns, mask
    run_mode(
        benchmark,
        _value_fn(provider),
        data,
        mode,
        group=f"value_loss {mode} {shape}",
        device=device,
        provider=provider,
        bytes_moved=data[0].numel() * (13 if mode == "forward" else 30),
    )
