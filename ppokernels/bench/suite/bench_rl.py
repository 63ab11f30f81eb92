"""One PPO policy step of the lean loop (ppokernels.rl) through each of its three heads.

A tiny Qwen2-style model (small hidden size, few layers) with the real 151936-token vocabulary:
the decoder is cheap, so the step is dominated by the vocabulary projection, which is where the
heads differ (``ppokernels.rl.algorithm.policy_loss``, ``--set head=...``):

* ``fused``: ``linear_ppo_policy_loss`` on the response hidden states (3 GEMMs, gradients made in
  the forward, never [N, V] logits), the training default;
* ``split``: ``linear_logprobs`` then ``ppo_policy_loss`` (3 GEMMs within its logits cache,
  4 beyond);
* ``naive``: ``lm_head`` on the same hidden states, ``log_softmax`` + gather, entropy from the
  full softmax, then ``ppo_policy_loss``.

Each runs the loss with an entropy bonus, the backward and an AdamW step. Records step time and
peak memory (CPU: VmHWM above the starting RSS).

    pytest benchmarks/bench_rl.py --benchmark-only --benchmark-columns=median,rounds
"""

import pytest
import torch

from ppokernels.bench._common import run

pytest.importorskip("transformers")

# (vocab, hidden, layers, sequences, prompt length, response length)
SHAPES = {
    "tiny": [(1000, 32, 1, 4, 8, 8)],
    "cpu": [(151936, 64, 2, 8, 32, 64)],
    "llm": [(151936, 256, 4, 16, 128, 512)],
}


def providers(device):
    return ["fused", "split", "naive"]


def _setup(shape, device):
    from transformers import AutoModelForCausalLM

    from ppokernels.rl.models import tiny_config

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
    rollout = dict(
        input_ids=ids,
        attention_mask=am,
        mask=mask,
        old_logprobs=-torch.rand(b, t, device=device) * 5 * mask,
        advantages=torch.randn(b, t, device=device) * mask,
        ref_logprobs=None,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    return model, rollout, p, opt


@pytest.mark.parametrize("mode", ["ppo-step"])
def test_ppo_step(benchmark, shape, provider, device, mode):
    from ppokernels.rl import algorithm
    from ppokernels.rl.config import RLConfig
    from ppokernels.rl.models import PolicyScorer

    model, d, p, opt = _setup(shape, device)
    cfg = RLConfig(head=provider, temperature=0.7, entropy_coef=0.01)
    scorer = PolicyScorer(model, temperature=cfg.temperature, naive=provider == "naive")
    den = dict(num_tokens=float(d["mask"].sum()), num_seqs=d["mask"].shape[0])

    def step():
        out = algorithm.policy_loss(cfg, scorer, d, p, kl_coef=0.0, **den)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    step()  # AdamW state allocated here, outside the measurement
    benchmark.group = f"rl ppo step {shape}"
    n = int(d["mask"].sum())
    benchmark.extra_info["response_tokens"] = n
    benchmark.extra_info["naive_logits_mb"] = round(n * shape[0] * 4 / 2**20, 1)
    run(benchmark, step, device=device, provider=provider)
