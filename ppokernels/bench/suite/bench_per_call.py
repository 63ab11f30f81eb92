"""Per-call cost: each op's Python path, forward + backward, at small shapes against the eager
formula a trainer writes (the plain-PyTorch reference; veRL's vanilla loss for the policy loss).

At 4 x 64 tokens the arithmetic is nothing and the time is the call itself: argument checks,
the backend choice, the dispatcher and the autograd bookkeeping of one fused op against a handful
of eager ops. This is the cost a small micro-batch, a unit test or an RL loop on a toy model
pays on every step; at 64 x 2048 the kernels start to count.
"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import ppokernels_providers, run_mode
from ppokernels.bench.eager import eager_policy_loss
from ppokernels.losses import Clip

SHAPES = {
    "tiny": [(4, 64)],
    "quick": [(4, 64), (64, 2048)],
    "cpu": [(4, 64), (64, 2048)],
    "llm": [(4, 64), (64, 2048)],
}
OPS = ["kl_penalty", "ppo_policy_loss", "value_loss", "gae", "masked_whiten", "group_advantages"]


def providers(device):
    return ["eager", *ppokernels_providers(device)]


def _case(op, provider, B, T, device):
    """(fn, args, grad): fn(*args) for the provider, its differentiable inputs in args, and the
    upstream gradient of a non-scalar output (None for a loss)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g, device=device).requires_grad_(grad)

    mask = torch.rand(B, T, generator=g, device=device) > 0.1
    eager = provider == "eager"
    backend = provider.removeprefix("ppokernels-")
    if op == "kl_penalty":
        lp, ref = randn(B, T, grad=True), randn(B, T)
        if eager:
            return (lambda a, b: reference.kl_penalty(a, b, estimator="k3")), (lp, ref), randn(B, T)
        fn = lambda a, b: ppokernels.kl_penalty(a, b, estimator="k3", backend=backend)  # noqa: E731
        return fn, (lp, ref), randn(B, T)
    if op == "ppo_policy_loss":
        lp = (randn(B, T) * 0.1 - 2).detach().requires_grad_()
        old, adv = lp.detach() + 0.05 * randn(B, T), randn(B, T)
        if eager:
            return (
                (lambda a, o, v, m: eager_policy_loss(a, o, v, m.float())[0]),
                (
                    lp,
                    old,
                    adv,
                    mask,
                ),
                None,
            )
        spec = Clip(dual_clip=3.0)

        def fused(a, o, v, m):
            return ppokernels.ppo_policy_loss(a, o, v, m, loss=spec, backend=backend).loss

        return fused, (lp, old, adv, mask), None
    if op == "value_loss":
        v, vo, ret = randn(B, T, grad=True), randn(B, T), randn(B, T)
        f = reference.value_loss if eager else ppokernels.value_loss
        kw = {} if eager else dict(backend=backend)
        return (lambda a, b, c, m: f(a, b, c, m, clip=0.2, **kw).loss), (v, vo, ret, mask), None
    if op == "gae":
        r, v = randn(B, T, grad=True), randn(B, T, grad=True)
        f = reference.gae if eager else ppokernels.gae
        kw = {} if eager else dict(backend=backend)
        return (lambda a, b, m: f(a, b, m, gamma=1.0, lam=0.95, **kw)[0]), (r, v, mask), randn(B, T)
    if op == "masked_whiten":
        x = randn(B, T, grad=True)
        f = reference.masked_whiten if eager else ppokernels.masked_whiten
        kw = {} if eager else dict(backend=backend)
        return (lambda a, m: f(a, m, **kw)), (x, mask), randn(B, T)
    # group_advantages: B x T scores in groups of 8
    n = B * T
    scores, ids = randn(n, grad=True), torch.arange(n, device=device) // 8
    f = reference.group_advantages if eager else ppokernels.group_advantages
    kw = {} if eager else dict(backend=backend)
    return (lambda s, i: f(s, i, **kw)), (scores, ids), randn(n)


@pytest.mark.parametrize("op", OPS)
def test_per_call(benchmark, shape, provider, device, op):
    B, T = shape
    fn, args, grad = _case(op, provider, B, T, device)
    run_mode(
        benchmark,
        fn,
        args,
        "forward+backward",
        grad=grad,
        group=f"per_call {op} forward+backward {shape}",
        device=device,
        provider=provider,
        measure_memory=False,
    )
