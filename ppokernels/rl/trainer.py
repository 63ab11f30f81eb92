"""The lean PPO / GRPO / RLOO / Dr.GRPO loop.

One step: sample responses (``model.generate``) on training prompts, score them (task reward or
reward model, checked to be one finite float per response, missing-EOS penalty), compute old /
reference log-probs and values from hidden states, build advantages, then several epochs of
shuffled minibatches (gradient accumulation over micro-batches, gradient clipping, LR schedule).
Every token-level step is a ppokernels op:

* log-probs, entropy: ``linear_logprobs`` on the response hidden states (never [N, V] logits);
* PPO: ``kl_penalty`` into per-token rewards (score on the last valid token), ``masked_whiten``
  of rewards (no mean shift), ``gae``, ``masked_whiten`` of advantages, ``ppo_policy_loss`` with
  an entropy bonus, clipped ``value_loss``; fixed or adaptive KL coefficient;
* GRPO / RLOO / Dr.GRPO: ``group_advantages`` over the samples of each prompt, no critic, KL in the
  loss (``ppo_policy_loss(ref_logprobs=..., kl_coef=...)``).

Validation every ``eval_every`` steps and test once at the end, on the task's held-out splits.
Data parallel (torchrun): each process samples its own prompts, the models are wrapped in DDP
or sharded with FSDP2 (:mod:`ppokernels.rl.parallel`, which also sets bf16 and activation
checkpointing), and the loss denominators (tokens and sequences of the minibatch) are summed over
processes, so the averaged gradient is the gradient of the global minibatch loss
(:mod:`ppokernels.rl.losses`).
"""

from __future__ import annotations

import os
import random
import time

import torch

import ppokernels
from ppokernels.rl import checkpoint, distributed
from ppokernels.rl.config import RLConfig
from ppokernels.rl.evaluation import HeldOut
from ppokernels.rl.experience import KLController, group_advantages, lr_lambda, ppo_advantages
from ppokernels.rl.logger import MetricsLog, peak_mem_mb, plot
from ppokernels.rl.losses import Metrics, micro_batch_loss, record, supervised_warmup
from ppokernels.rl.models import (
    BUILTIN_MODELS,
    Critic,
    PolicyScorer,
    backbone,
    frozen_copy,
    load_policy,
    load_tokenizer,
)
from ppokernels.rl.parallel import Parallel
from ppokernels.rl.rollout import Batch, generate
from ppokernels.rl.tasks import RewardModelScorer, Task, check_rewards, get_task, reward_name

RUN_CONFIG = "run_config.json"


class Interrupted(RuntimeError):
    """Ctrl-C before RL started (setup or warm-up): nothing was written."""


class Trainer:
    """Build with a validated :class:`RLConfig` (and optionally a :class:`Task` object), then
    :meth:`train`, then :meth:`close`. ``resume=True`` continues from ``cfg.out/checkpoint`` (an
    error when there is none); without it an existing run in ``cfg.out`` is only replaced when
    ``overwrite=True``."""

    def __init__(
        self, cfg: RLConfig, task: Task | None = None, *, resume: bool = False, overwrite=False
    ):
        self.cfg = cfg.validate()
        self.rank, self.world, self.device = distributed.init(cfg.device)
        self.par = Parallel(self.cfg, self.world, self.device)
        self.stop, self.interrupted = distributed.StopFlag(), False
        with self.stop.installed():
            self._setup(task, resume, overwrite)

    def _setup(self, task: Task | None, resume: bool, overwrite: bool) -> None:
        cfg = self.cfg
        if self.device.type == "cpu" and (cfg.threads or cfg.model in BUILTIN_MODELS):
            # Tiny models: threads only add synchronisation (and stall badly on a shared CPU).
            torch.set_num_threads(cfg.threads or 1)
        self.task = task or get_task(cfg.task)
        self.tokenizer = load_tokenizer(cfg.model, self.task.tokenizer, self.task.name)
        self.reward_fn = (
            RewardModelScorer(cfg.reward_model, str(self.device))
            if cfg.reward_model
            else self.task.reward
        )
        self.reward_source = source = f"task {self.task.name!r}: {reward_name(self.reward_fn)}"
        names = ["policy", "ref"] + (["critic"] if cfg.is_ppo else [])
        where = dict(rank=self.rank, names=names, sharded=self.par.fsdp)
        checkpoint.check_out_dir(cfg.out, resume=resume, overwrite=overwrite, **where)

        self._models_and_optimizers(resume)
        # Each process samples different prompts and tokens: seed + rank * 100003.
        rank_seed = cfg.seed + self.rank * 100003
        self.prompt_rng = random.Random(rank_seed)
        self.shuffle_gen = torch.Generator().manual_seed(rank_seed)
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
        self.held_out = HeldOut(cfg, self.task, self.reward_fn, source)
        self.step, self.elapsed = 0, 0.0
        if resume:
            models = self._models()
            state = checkpoint.load(
                cfg.out, rank=self.rank, models=models, device=self.device, sharded=self.par.fsdp
            )
            checkpoint.restore_trainer(self, state)
        self.train_scorer = self.par.train_module(self.scorer)
        self.train_critic = self.par.train_module(self.critic)
        if distributed.any_true(self.stop.requested, self.world, self.device):
            raise Interrupted(f"interrupted during setup: nothing was written to {cfg.out}")
        self.log = None
        if self.rank == 0:
            cfg.save(os.path.join(cfg.out, RUN_CONFIG))
            self.log = MetricsLog(
                cfg.out, resume_step=self.step if resume else None, tensorboard=cfg.tensorboard
            )

    def _models_and_optimizers(self, resume: bool) -> None:
        """Policy (warmed up unless resuming), frozen reference, critic (PPO), optimizers."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.policy = load_policy(
            cfg.model, self.tokenizer, seed=cfg.seed, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers
        ).to(self.par.build_device)
        self.scorer = PolicyScorer(
            self.policy, mode=cfg.logprobs, temperature=cfg.temperature, chunk_size=cfg.chunk_size
        )
        self.sft_loss = None
        if not resume and cfg.sft_steps and self.task.sft_example is not None:
            self.sft_loss = self._warmup()
        self.ref = frozen_copy(self.policy)
        self.ref_scorer = PolicyScorer(
            self.ref, mode=cfg.logprobs, temperature=cfg.temperature, chunk_size=cfg.chunk_size
        )
        self.critic = Critic(self.policy).to(self.par.build_device) if cfg.is_ppo else None
        # Shard / set precision before the optimizers exist: FSDP2 replaces the parameters.
        self.par.prepare(self.scorer, backbone(self.policy), self.policy)
        self.par.prepare(self.ref_scorer, backbone(self.ref))
        if self.critic is not None:
            self.par.prepare(self.critic, self.critic.body, self.critic.body)
        rollout = cfg.prompts_per_step * cfg.samples_per_prompt
        total = cfg.steps * cfg.ppo_epochs * (rollout // cfg.minibatch_size)
        adam = dict(weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, **adam)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, total))
        self.vopt = self.vsched = None
        if self.critic is not None:
            self.vopt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr, **adam)
            self.vsched = torch.optim.lr_scheduler.LambdaLR(self.vopt, lr_lambda(cfg, total))
        self.kl_ctl = KLController(cfg)

    def close(self) -> None:
        """Leave the process group; the DDP wrappers (their reducers hold the group) are dropped
        first, so that gloo's threads are joined here, not at interpreter exit (SIGABRT)."""
        self.train_scorer, self.train_critic = self.scorer, self.critic
        distributed.shutdown()

    # ------------------------------------------------------------------------------ setup
    def _warmup(self) -> float:
        """Supervised warm-up (:func:`~ppokernels.rl.losses.supervised_warmup`) before the
        models are sharded; Ctrl-C stops it and nothing is saved."""
        cfg = self.cfg

        def check_stop(i: int) -> None:
            if distributed.any_true(self.stop.requested, self.world, self.device):
                raise Interrupted(
                    f"interrupted during the supervised warm-up (step {i} of {cfg.sft_steps}): "
                    f"nothing was written to {cfg.out}"
                )

        return supervised_warmup(cfg, self.task, self.tokenizer, self.scorer, check_stop)

    # ------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _score(self, b: Batch, module, *, critic: bool = False) -> tuple:
        """Log-probs and entropy (or values) for the whole batch, in micro-batches."""
        outs, ents = [], []
        for idx in torch.arange(len(b), device=self.device).split(self.cfg.micro_batch_size):
            ids, am, m = b.input_ids[idx], b.attention_mask[idx], b.mask[idx]
            if critic:
                outs.append(module(ids, am, m, b.prompt_len))
            else:
                lp, ent = module(ids, am, m, b.prompt_len, with_entropy=True)
                outs.append(lp)
                ents.append(ent)
        return torch.cat(outs), (torch.cat(ents) if ents else None)

    def _sample(self) -> tuple:
        """Responses to this step's training prompts and their checked rewards [B]."""
        cfg = self.cfg
        k = cfg.samples_per_prompt
        prompts = self.task.sample_train(self.prompt_rng, cfg.prompts_per_step)
        rep = [p for p in prompts for _ in range(k)]
        with self.par.gathered(self.scorer):
            b = generate(
                self.policy,
                self.tokenizer,
                rep,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                group_index=torch.arange(len(prompts)).repeat_interleave(k),
            )
        raw = check_rewards(self.reward_fn(rep, b.responses), len(rep), self.reward_source)
        return b, torch.tensor(raw, dtype=torch.float32, device=self.device)

    def rollout(self) -> tuple:
        cfg = self.cfg
        b, raw = self._sample()
        scores = raw.clone()
        if cfg.missing_eos_penalty:
            scores = scores - cfg.missing_eos_penalty * (~b.has_eos).float()
        b.scores = scores
        m = b.mask.float()
        # Scores from the sampling policy itself (temperature-scaled, as in training).
        old_lp, ent = self._score(b, self.scorer)
        ref_lp, _ = self._score(b, self.ref_scorer)
        kl_tok = ppokernels.kl_penalty(old_lp, ref_lp, estimator=cfg.kl_kind) * m
        if cfg.is_ppo:
            values, _ = self._score(b, self.critic, critic=True)
            adv, returns = ppo_advantages(cfg, scores, kl_tok, values, m, kl_coef=self.kl_ctl.value)
            b.extra.update(values=values, returns=returns * m)
        else:
            adv = group_advantages(cfg, scores, b.group_index, m)
        b.extra.update(old_logprobs=old_lp, ref_logprobs=ref_lp, advantages=adv * m)
        stats = {
            "reward_mean": float(raw.mean()),
            "score_mean": float(scores.mean()),
            "kl": float(ppokernels.masked_mean(kl_tok, m)),
            "entropy": float(ppokernels.masked_mean(ent, m)),
            "response_len": float(m.sum(1).mean()),
            "eos_frac": float(b.has_eos.float().mean()),
            "response_tokens": float(m.sum()),
        }
        return b, stats

    # ------------------------------------------------------------------------------ update
    def update(self, b: Batch) -> dict:
        """``ppo_epochs`` passes over shuffled minibatches; one optimizer step per minibatch."""
        acc = Metrics()
        for _ in range(self.cfg.ppo_epochs):
            perm = torch.randperm(len(b), generator=self.shuffle_gen).to(self.device)
            for mb in perm.split(self.cfg.minibatch_size):
                self._minibatch(b, mb, acc)
                acc.add("grad_norm", self._step(self.policy, self.opt, self.sched))
                if self.critic is not None:
                    acc.add("critic_grad_norm", self._step(self.critic, self.vopt, self.vsched))
        out = acc.mean()
        out["lr"] = self.sched.get_last_lr()[0]
        return out

    def _minibatch(self, b: Batch, mb: torch.Tensor, acc: Metrics) -> None:
        """Accumulate the gradient of one minibatch (rows ``mb``) over its micro-batches."""
        # Global denominators: the whole minibatch over every process (DDP averages gradients,
        # so each process's loss is scaled by the world size).
        num_tokens = float(distributed.all_sum(b.mask[mb].sum().float(), self.world))
        micro = mb.split(self.cfg.micro_batch_size)
        for i, idx in enumerate(micro):
            with self.par.no_sync([self.train_scorer, self.train_critic], i < len(micro) - 1):
                loss, pl, vl = micro_batch_loss(
                    self.cfg,
                    self.train_scorer,
                    self.train_critic,
                    b.select(idx),
                    b.prompt_len,
                    num_tokens=num_tokens,
                    num_seqs=len(mb) * self.world,
                    kl_coef=self.kl_ctl.value,
                )
                (loss * self.world).backward()
            record(acc, pl, vl, len(micro) * self.world)

    def _step(self, model, opt, sched) -> float:
        norm = self.par.clip_grad_norm(model, self.cfg.max_grad_norm or 1e9)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return norm

    @property
    def initial(self) -> dict:
        """Validation and test reward before RL (empty on a resumed run)."""
        return self.held_out.initial

    def evaluate(self, split: str = "validation") -> float:
        """Mean task reward on the held-out ``split`` (see :class:`HeldOut`); every process
        calls it under FSDP2."""
        with self.par.gathered(self.scorer):
            return self.held_out.run(self.policy, self.tokenizer, split)

    def _rank0_eval(self, fn, *args, **kw) -> dict:
        """``fn(policy, tokenizer, ...)`` on rank 0, the policy gathered by every process."""
        with self.par.gathered(self.scorer):
            return fn(self.policy, self.tokenizer, *args, **kw) if self.rank == 0 else {}

    # ------------------------------------------------------------------------------ loop
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self.step += 1
        b, stats = self.rollout()
        stats.update(self.update(b))
        stats = distributed.mean_metrics(stats, self.world, self.device)
        self.kl_ctl.update(stats["kl"], len(b) * self.world)
        dt = time.perf_counter() - t0
        stats["tokens_per_s"] = stats.pop("response_tokens") * self.world / dt
        stats["kl_coef"] = self.kl_ctl.value
        final = self.step == self.cfg.steps
        if self.held_out.is_due(self.step, final=final):
            stats.update(self._rank0_eval(self.held_out.due, self.step, final=final))
        self.elapsed += time.perf_counter() - t0
        stats.update(
            step=self.step,
            time_s=self.elapsed,
            step_time_s=dt,
            peak_mem_mb=peak_mem_mb(self.device),
        )
        return stats

    def train(self) -> list:
        """Run until ``cfg.steps``. Ctrl-C finishes the current step, saves the checkpoint and
        ``OUT/model`` and returns (a second Ctrl-C stops at once; the last checkpoint stays)."""
        rows = []
        bar = self._progress()
        try:
            with self.stop.installed():
                if self.step == 0:
                    self._rank0_eval(self.held_out.before_rl)
                self.interrupted = False
                while self.step < self.cfg.steps and not self.interrupted:
                    rows.append(self._one_step(bar))
        finally:
            if bar is not None:
                bar.close()
            if self.log is not None:
                self.log.close()
        if self.rank == 0 and self.cfg.plots:
            plot(self.cfg.out)
        return rows

    def _one_step(self, bar) -> dict:
        """One step, logged; then checkpoint (and export) when due or interrupted."""
        cfg = self.cfg
        row = self.train_step()
        if self.step == 1:
            row.update({f"{k}_initial": v for k, v in self.initial.items()})
        if self.log is not None:
            self.log.write(row)
        if bar is not None:
            post = {"reward": f"{row['reward_mean']:.3f}", "kl": f"{row['kl']:.3f}"}
            if "eval_reward" in row:
                post["val"] = f"{row['eval_reward']:.3f}"
            bar.set_postfix(post)
            bar.update(1)
        self.interrupted = distributed.any_true(self.stop.requested, self.world, self.device)
        last = self.interrupted or self.step == cfg.steps
        if last or (cfg.save_every and self.step % cfg.save_every == 0):
            self.save(export=last)
        if self.interrupted and bar is not None:
            bar.write(f"interrupted: checkpoint and model saved at step {self.step}")
        return row

    def _progress(self):
        if not (self.cfg.progress and self.rank == 0):
            return None
        from tqdm.auto import tqdm

        name = f"{self.cfg.algo} {self.task.name}"
        return tqdm(total=self.cfg.steps, initial=self.step, desc=name)

    def _on_sigint(self, signum=None, frame=None) -> None:
        """What Ctrl-C does (see :class:`~ppokernels.rl.distributed.StopFlag`)."""
        self.stop(signum, frame)

    # ------------------------------------------------------------------------------ checkpoints
    def _models(self) -> dict:
        return {"policy": self.policy, "ref": self.ref, "critic": self.critic}

    def save(self, export: bool = False) -> str:
        """Checkpoint (every process); with ``export``, also ``OUT/model`` (rank 0)."""
        path = checkpoint.save(
            self.cfg.out,
            rank=self.rank,
            world=self.world,
            models=self._models(),
            state=checkpoint.trainer_state(self),
            barrier=distributed.barrier(self.world),
            sharded=self.par.fsdp,
        )
        if export:  # a full Hugging Face folder, gathered from the shards under FSDP2
            full = self.par.full_state_dict(self.policy)
            if self.rank == 0:
                checkpoint.export_model(self.cfg.out, self.policy, self.tokenizer, full)
        return path
