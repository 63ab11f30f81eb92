"""What training carries from one step to the next, and what a checkpoint saves: the
:class:`TrainState`.

The models are saved as safetensors by :mod:`~ppokernels.rl.checkpoint`; everything else
(counters, the KL coefficient, optimizers, LR schedules, every RNG) is
:meth:`TrainState.state_dict`, per process, made only of tensors and plain values (RNG states
as tensors) so that it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from ppokernels.rl import parallel


@dataclass
class TrainState:
    """The policy, frozen reference and critic (None for the group methods), their optimizers
    and LR schedules, the KL coefficient, the prompt sampler's and the minibatch shuffler's
    RNGs, the RL step and the seconds spent in it."""

    policy: nn.Module
    ref: nn.Module
    critic: nn.Module | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    vopt: torch.optim.Optimizer | None
    vsched: torch.optim.lr_scheduler.LRScheduler | None
    kl_coef: float
    prompt_rng: random.Random
    shuffle_gen: torch.Generator
    step: int = 0
    elapsed: float = 0.0

    @classmethod
    def create(cls, cfg, policy, ref, critic, *, rank: int) -> TrainState:
        """AdamW and the LR schedule for the policy (and critic); each process samples its
        own prompts and tokens, seeded ``seed + rank * 100003`` (lm-human-preferences)."""
        rollout = cfg.prompts_per_step * cfg.samples_per_prompt
        total = cfg.steps * cfg.ppo_epochs * (rollout // cfg.minibatch_size)
        adam = dict(weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, **adam)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
        vopt = vsched = None
        if critic is not None:
            vopt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, **adam)
            vsched = torch.optim.lr_scheduler.LambdaLR(vopt, lr_lambda(cfg, total))
        seed = cfg.seed + rank * 100003
        torch.manual_seed(seed)
        random.seed(seed)
        return cls(
            policy=policy,
            ref=ref,
            critic=critic,
            opt=opt,
            sched=sched,
            vopt=vopt,
            vsched=vsched,
            kl_coef=cfg.kl_coef,
            prompt_rng=random.Random(seed),
            shuffle_gen=torch.Generator().manual_seed(seed),
        )

    def models(self) -> dict:
        return {"policy": self.policy, "ref": self.ref, "critic": self.critic}

    def state_dict(self) -> dict:
        """This process's state, without the models (tensors and plain values only)."""
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "kl_coef": self.kl_coef,
            "opt": parallel.optimizer_to_local(self.opt.state_dict()),
            "sched": self.sched.state_dict(),
            "vopt": parallel.optimizer_to_local(self.vopt.state_dict()) if self.vopt else None,
            "vsched": self.vsched.state_dict() if self.vsched else None,
            "rng": rng_state(self.prompt_rng, self.shuffle_gen),
        }

    def load_state_dict(self, state: dict) -> None:
        """The inverse of :meth:`state_dict` (the models are loaded by the checkpoint)."""
        self.step, self.elapsed, self.kl_coef = state["step"], state["elapsed"], state["kl_coef"]
        self.opt.load_state_dict(parallel.optimizer_from_local(state["opt"], self.opt))
        self.sched.load_state_dict(state["sched"])
        if self.vopt is not None:
            self.vopt.load_state_dict(parallel.optimizer_from_local(state["vopt"], self.vopt))
            self.vsched.load_state_dict(state["vsched"])
        set_rng_state(state["rng"], self.prompt_rng, self.shuffle_gen)


def lr_lambda(cfg, total: int):
    """The LR multiplier after ``step`` optimizer steps: linear warm-up over ``warmup_steps``,
    then constant, linear to 0 (lm-human-preferences anneals to 0) or cosine over ``total``."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = min(step / max(total, 1), 1.0)
        if cfg.lr_schedule == "linear":
            return 1.0 - frac
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return f


# ---------------------------------------------------------------------------- RNG states
def rng_state(prompt_rng: random.Random, shuffle_gen: torch.Generator) -> dict:
    """Every RNG state as tensors: torch's byte tensors as they are, Python's Mersenne Twister
    state (version, 625 words, gauss_next) as an int64 tensor."""
    state = {
        "torch": torch.get_rng_state(),
        "python": _py_state(random.getstate()),
        "prompt": _py_state(prompt_rng.getstate()),
        "shuffle": shuffle_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, prompt_rng: random.Random, shuffle_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_from_py_state(state["python"]))
    prompt_rng.setstate(_from_py_state(state["prompt"]))
    shuffle_gen.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state(s: tuple) -> dict:
    version, words, gauss = s
    return {
        "version": int(version),
        "words": torch.tensor(words, dtype=torch.int64),
        "gauss": None if gauss is None else float(gauss),
    }


def _from_py_state(d: dict) -> tuple:
    return d["version"], tuple(int(w) for w in d["words"].tolist()), d["gauss"]
