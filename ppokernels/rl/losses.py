"""The loss of one micro-batch, and the accumulation of per-micro-batch metrics.

Denominators are global (a token-mean over the whole minibatch of every process):
``num_tokens`` and ``num_seqs`` are the minibatch's counts summed over processes, so
``ppo_policy_loss`` / ``value_loss`` return this micro-batch's *share* of the global minibatch
loss. DDP averages gradients over ``world`` processes, hence the backward of ``loss * world``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

import ppokernels
from ppokernels.losses import Clip
from ppokernels.rl.config import RLConfig
from ppokernels.rl.rollout import supervised_batch


@dataclass
class Metrics:
    """Running lists of scalar metrics; :meth:`mean` averages each."""

    values: dict = field(default_factory=dict)

    def add(self, key: str, value) -> None:
        if value is not None:
            v = value.detach() if torch.is_tensor(value) else value
            self.values.setdefault(key, []).append(float(v))

    def mean(self) -> dict:
        return {k: sum(v) / len(v) for k, v in self.values.items()}


def micro_batch_loss(
    cfg: RLConfig,
    scorer,
    critic,
    d: dict,
    prompt_len: int,
    *,
    num_tokens: float,
    num_seqs: int,
    kl_coef: float,
) -> tuple:
    """Policy loss (+ ``vf_coef`` x value loss for PPO) of one micro-batch.

    ``d`` holds [b, P + T] ``input_ids``/``attention_mask``, [b, T] ``mask``, ``old_logprobs``,
    ``ref_logprobs``, ``advantages`` (and ``values``, ``returns`` for PPO). The loss is
    ``L_clip(ratio, A) + kl_coef * KL(pi || ref) - entropy_coef * H`` with the KL term only when
    the KL is not in the reward. Returns ``(loss, policy_out, value_out or None)``.
    """
    kl_in_loss = not cfg.use_kl_in_reward
    m = d["mask"].float()
    lp, ent = scorer(d["input_ids"], d["attention_mask"], d["mask"], prompt_len, with_entropy=True)
    pl = ppokernels.ppo_policy_loss(
        lp,
        d["old_logprobs"],
        d["advantages"],
        m,
        loss=Clip(cfg.clip, cfg.clip_high, dual_clip=cfg.dual_clip),
        agg=cfg.agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        ref_logprobs=d["ref_logprobs"] if kl_in_loss else None,
        kl_coef=kl_coef if kl_in_loss else 0.0,
        kl_estimator=cfg.kl_kind,
        entropy=ent if cfg.entropy_coef > 0 else ent.detach(),
        entropy_coef=cfg.entropy_coef,
    )
    if critic is None:
        return pl.loss, pl, None
    v = critic(d["input_ids"], d["attention_mask"], d["mask"], prompt_len)
    vl = ppokernels.value_loss(
        v,
        d["values"],
        d["returns"],
        m,
        clip=cfg.value_clip,
        agg=cfg.agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
    )
    return pl.loss + cfg.vf_coef * vl.loss, pl, vl


def record(acc: Metrics, pl, vl, scale: float) -> None:
    """Log one micro-batch. ``scale`` (micro-batches per minibatch x processes) turns a share of
    the global minibatch loss back into that loss, so the logged mean is the minibatch loss."""
    acc.add("policy_loss", pl.loss * scale)
    acc.add("clipfrac", pl.clipfrac)
    acc.add("approx_kl", pl.approx_kl)
    if vl is not None:
        acc.add("value_loss", vl.loss * scale)
        acc.add("vf_clipfrac", vl.clipfrac)


def supervised_warmup(cfg: RLConfig, task, tokenizer, scorer, check_stop) -> float:
    """``cfg.sft_steps`` steps of teacher-forced log-likelihood on ``task.sft_example`` pairs
    (the same on every process), so the policy emits well-formed answers and EOS before RL
    starts. ``check_stop(i)`` is called before step ``i`` (it raises to stop). Returns the last
    loss."""
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
