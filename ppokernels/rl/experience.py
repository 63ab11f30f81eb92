"""Experience: the KL controller, the LR schedule and the advantages of one rollout batch, each
a few ppokernels ops (docs/semantics.md)."""

from __future__ import annotations

import math

import torch

import ppokernels
from ppokernels.rl.config import RLConfig


class KLController:
    """Fixed, or adaptive (Ziegler et al. 2019):
    ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, cfg: RLConfig):
        self.value = cfg.kl_coef
        self.adaptive, self.target, self.horizon = cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n / self.horizon


def lr_lambda(cfg: RLConfig, total: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = min(step / max(total, 1), 1.0)
        if cfg.lr_schedule == "linear":
            return 1.0 - frac  # anneal to 0 (docs/semantics.md, "the lean loop's details")
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return f


def ppo_advantages(cfg: RLConfig, scores, kl_tok, values, mask, *, kl_coef: float) -> tuple:
    """PPO: per-token rewards ``-kl_coef * KL`` (when the KL is in the reward) with the score added
    on the last valid token (the EOS when there is one), reward whitening without mean shift,
    ``gae``, advantage whitening. scores [B]; kl_tok, values, mask [B, T] float.
    Returns (advantages, returns) [B, T], zero on padding."""
    rewards = -kl_coef * kl_tok if cfg.use_kl_in_reward else torch.zeros_like(mask)
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    if cfg.whiten_rewards:
        rewards = ppokernels.masked_whiten(rewards, mask, shift_mean=False) * mask
    adv, returns = ppokernels.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        adv = ppokernels.masked_whiten(adv, mask)
    return adv * mask, returns * mask


def group_advantages(cfg: RLConfig, scores, group_index, mask) -> torch.Tensor:
    """GRPO ((s - mean) / (std + eps) over the samples of a prompt), Dr.GRPO (no std) or RLOO
    (leave-one-out baseline), broadcast over the response tokens. Returns [B, T]."""
    seq = ppokernels.group_advantages(
        scores,
        group_index,
        estimator="rloo" if cfg.algo == "rloo" else "grpo",
        eps=cfg.adv_eps,
        norm_by_std=cfg.algo != "drgrpo",
    )
    return seq[:, None] * mask
