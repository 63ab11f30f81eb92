"""The supervised warm-up before RL: teacher-forced log-likelihood on a task's demonstrations
(``task.sft_example``), so that a policy built from scratch emits well-formed answers and EOS
before RL starts (an SFT model's starting point, in miniature)."""

from __future__ import annotations

import random

import torch

import ppokernels
from ppokernels.rl.rollout import supervised_batch


def supervised_warmup(cfg, task, tokenizer, scorer, check_stop) -> float:
    """``cfg.sft_steps`` steps on ``task.sft_example`` pairs (the same on every process).
    ``check_stop(i)`` is called before step ``i`` (it raises to stop). Returns the last loss."""
    rng = random.Random(cfg.seed + 7)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.sft_lr)
    device = next(scorer.parameters()).device
    loss = torch.zeros(())
    for i in range(cfg.sft_steps):
        check_stop(i)
        pairs = [task.sft_example(rng) for _ in range(cfg.sft_batch_size)]
        b = supervised_batch(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], device)
        lp, _ = scorer(b.input_ids, b.attention_mask, b.mask, b.prompt_len, with_entropy=False)
        loss = -ppokernels.masked_mean(lp, b.mask.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # Drop the last step's gradients: left on the parameters, they would be added to the first
    # RL minibatch's gradient (the optimizer there accumulates into .grad).
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())
