"""One PPO policy step of the lean loop (ppokernels.rl) with fused vs naive log-probs.

A tiny Qwen2-style model (small hidden size, few layers) with the real 151936-token vocabulary:
the decoder is cheap, so the step is dominated by the vocabulary projection, which is where the
two paths differ. ``fused``: ``linear_logprobs`` on the response hidden states (never [N, V]
logits); ``naive``: ``lm_head`` on the same hidden states, ``log_softmax`` + gather, entropy from
the full softmax. Both then run ``ppo_policy_loss`` (with an entropy bonus), backward and an AdamW
step. Records step time and peak memory (CPU: VmHWM above the starting RSS).

    pytest benchmarks/bench_rl.py --benchmark-only --benchmark-columns=median,rounds
"""

import pytest
import torch

import ppokernels
from ppokernels.bench._common import run

pytest.importorskip("transformers")

# (vocab, hidden, layers, sequences, prompt length, response length)
SHAPES = {
    "tiny": [(1000, 32, 1, 4, 8, 8)],
    "cpu": [(151936, 64, 2, 8, 32, 64)],
    "llm": [(151936, 256, 4, 16, 128, 512)],
}


def providers(device):
    return ["fused", "naive"]


def _setup(shape, device):
    from transformers import AutoModelForCausalLM

    from ppokernels.rl.models import PolicyScorer, tiny_config

    vocab, hidden, layers, b, p, t = shape
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("qwen2", vocab, hidden=hidden, layers=layers, heads=4, max_positions=p + t)
    ).to(device)
    model.eval()
    ids = torch.randint(3, vocab, (b, p + t), device=device)
    lengths = torch.randint(t // 2, t + 1, (b,), device=device)
    mask = torch.arange(t, device=device)[None] < lengths[:, None]
    am = torch.cat([torch.ones(b, p, dtype=torch.long, device=device), mask.long()], dim=1)
    old = -torch.rand(b, t, device=device) * 5 * mask
    adv = torch.randn(b, t, device=device) * mask
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    return model, PolicyScorer, (ids, am, mask, p, old, adv), opt


@pytest.mark.parametrize("mode", ["ppo-step"])
def test_ppo_step(benchmark, shape, provider, device, mode):
    model, Scorer, (ids, am, mask, p, old, adv), opt = _setup(shape, device)
    scorer = Scorer(model, mode=provider, temperature=0.7)
    m = mask.float()

    def step():
        lp, ent = scorer(ids, am, mask, p, with_entropy=True)
        out = ppokernels.ppo_policy_loss(lp, old, adv, m, entropy=ent, entropy_coef=0.01)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    step()  # AdamW state allocated here, outside the measurement
    benchmark.group = f"rl ppo step {shape}"
    n = int(mask.sum())
    benchmark.extra_info["response_tokens"] = n
    benchmark.extra_info["naive_logits_mb"] = round(n * shape[0] * 4 / 2**20, 1)
    run(benchmark, step, device=device, provider=provider)
