"""The trainers' own functions vs their ppokernels.compat drop-ins (same inputs, same call).

Providers: "trainer" (verl 0.9.1 / trl 1.16.0 as installed from requirements-compat.txt) and
"compat" (ppokernels.compat.*). Skipped when the trainer is not installed. Cases:

- verl GAE (compute_gae_advantage_return, incl. whitening), verl GRPO advantages (index array),
  verl optimal-token-baseline advantages (compute_optimal_token_baseline_advantage: veRL loops
  over the groups of 2 samples),
  verl policy loss (compute_policy_loss, forward + backward), on [B, T] with holes in the mask;
- verl logprobs_from_logits and TRL selective_log_softmax + entropy_from_logits, forward +
  backward on [B, T, V] logits.
"""

import numpy as np
import pytest
import torch

from ppokernels.bench._common import run

SHAPES = {
    "tiny": [(4, 16, 64)],
    "cpu": [(16, 1024, 4096)],
    "llm": [(64, 4096, 32768), (8, 2048, 151936)],
}
# Rows of the [rows, V] logits of the log-prob cases: the trainers' per-row Python loops take
# seconds per call on a CPU; on the GPU 8192 rows (the published shapes' N) keep the logits, their
# gradient and the trainers' temporaries (fp32: 8192 x 151936 x 4 B = 5 GB each) far below 139 GiB.
MAX_ROWS = {"cpu": 1024, "cuda": 8192}
CASES = [
    "verl_gae",
    "verl_grpo",
    "verl_otb",
    "verl_policy_loss",
    "verl_logprobs",
    "trl_logprobs_entropy",
]


def providers(device):
    return ["trainer", "compat"]


def _impl(case, provider):
    if case.startswith("verl"):
        mods = (
            pytest.importorskip("verl.trainer.ppo.core_algos"),
            pytest.importorskip("verl.utils.torch_functional"),
        )
        if provider == "compat":
            import ppokernels.compat.verl as cv

            mods = (cv, cv)
        return mods
    if provider == "compat":
        import ppokernels.compat.trl as ct

        return ct
    return pytest.importorskip("trl.trainer.utils")


@pytest.mark.parametrize("case", CASES)
def test_compat(benchmark, shape, provider, device, case):
    B, T, V = shape
    # everything is created on the device: nothing large on the host
    g = torch.Generator(device=device).manual_seed(0)
    mask = (torch.rand(B, T, generator=g, device=device) > 0.1).float()
    mask[:, 0] = 1
    x = lambda: torch.randn(B, T, generator=g, device=device)  # noqa: E731
    impl = _impl(case, provider)
    if case == "verl_gae":
        r, v = x(), x()
        step = lambda: impl[0].compute_gae_advantage_return(r, v, mask, 0.99, 0.95)  # noqa: E731
        nbytes = B * T * 4 * 5
    elif case == "verl_grpo":
        r, index = x(), np.repeat(np.arange(B // 2 + 1), 2)[:B]
        step = lambda: impl[0].compute_grpo_outcome_advantage(r, mask, index)  # noqa: E731
        nbytes = B * T * 4 * 3
    elif case == "verl_otb":
        r, index = x(), np.repeat(np.arange(B // 2 + 1), 2)[:B]
        old = -(torch.rand(B, T, generator=g, device=device) * 2 + 0.01)
        sum_pi_sq = old.exp().square() + 0.1  # any value >= pi^2 works for the timing
        fn = impl[0].compute_optimal_token_baseline_advantage
        step = lambda: fn(r, mask, index, old, sum_pi_sq)  # noqa: E731
        nbytes = B * T * 4 * 6  # reads rewards, mask, log-probs, sum pi^2; writes A and G
    elif case == "verl_policy_loss":
        old, adv = x(), x()
        lp = (old + 0.3 * x()).requires_grad_(True)

        def step():
            loss = impl[0].compute_policy_loss(old, lp, adv, mask, 0.2)[0]
            loss.backward()
            return loss

        nbytes = B * T * 4 * 6
    else:
        n = min(B * T, MAX_ROWS[device])
        logits = (torch.randn(n, V, generator=g, device=device) * 2).requires_grad_(True)
        labels = torch.randint(0, V, (n,), generator=g, device=device)
        if case == "verl_logprobs":
            fn = lambda z: impl[1].logprobs_from_logits(z, labels)
            if provider == "compat":
                fn = lambda z: impl[1].logprobs_from_logits(z, labels, inplace_backward=False)
        else:

            def fn(z):
                return impl.selective_log_softmax(z, labels) + impl.entropy_from_logits(z)

        def step():
            out = fn(logits)
            out.sum().backward()
            return out

        nbytes = n * V * 4 * 3
    if case in ("verl_logprobs", "trl_logprobs_entropy"):
        shape = (n, V)  # the shape measured
    benchmark.group = f"compat {case} {shape}"
    run(benchmark, step, device=device, provider=provider, bytes_moved=nbytes)
