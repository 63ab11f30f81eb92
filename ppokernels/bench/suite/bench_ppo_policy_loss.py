"""ppo_policy_loss, forward and forward + backward: the fused kernels vs the eager formula as the
trainers write it (veRL's vanilla policy loss with dual clip, agg_loss and the clipfrac / ppo_kl /
clipfrac_lower metrics: ppokernels.bench.eager), and the reference compiled.

Bytes per token (fp32 data, bool mask): forward reads logprobs, old_logprobs, advantages and the
mask (13 B); backward reads them again and writes the gradient (17 B).
"""

import pytest

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import ppokernels_providers, provider_fn, run_mode
from ppokernels.bench.eager import eager_policy_loss, loss_inputs
from ppokernels.losses import Clip

SHAPES = {
    "tiny": [(4, 64)],
    "demo": [(64, 2048)],
    "cpu": [(64, 2048), (256, 4096)],
    "llm": [(256, 4096), (1024, 8192)],
}
AGG = "token-mean"


def providers(device):
    return ["eager-formula", "reference-compiled", *ppokernels_providers(device)]


def _policy_fn(provider):
    if provider == "eager-formula":
        return lambda lp, old, adv, m: eager_policy_loss(lp, old, adv, m.float(), agg=AGG)[0]
    return provider_fn(
        provider,
        reference.ppo_policy_loss,
        ppokernels.ppo_policy_loss,
        result=lambda out: out.loss,
        loss=Clip(dual_clip=3.0),
        agg=AGG,
    )


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_ppo_policy_loss(benchmark, shape, provider, device, mode):
    data = loss_inputs(shape, device, mode)  # logprobs, old_logprobs, advantages, mask
    run_mode(
        benchmark,
        _policy_fn(provider),
        data,
        mode,
        group=f"ppo_policy_loss {mode} {shape}",
        device=device,
        provider=provider,
        bytes_moved=data[0].numel() * (13 if mode == "forward" else 30),
    )
