"""The lean PPO / GRPO / RLOO / Dr.GRPO loop.

One step: sample responses (``model.generate``), score them (task reward or reward model,
missing-EOS penalty), compute old / reference log-probs and values from hidden states, build
advantages, then several epochs of shuffled minibatches (gradient accumulation over micro-batches,
gradient clipping, LR schedule). Every token-level step is a ppokernels op:

* log-probs, entropy: ``linear_logprobs`` on the response hidden states (never [N, V] logits);
* PPO: ``kl_penalty`` into per-token rewards (score on the last valid token), ``masked_whiten``
  of rewards (no mean shift), ``gae``, ``masked_whiten`` of advantages, ``ppo_policy_loss`` with
  an entropy bonus, clipped ``value_loss``; fixed or adaptive KL coefficient;
* GRPO / RLOO / Dr.GRPO: ``group_advantages`` over the samples of each prompt, no critic, KL in the
  loss (``ppo_policy_loss(ref_logprobs=..., kl_coef=...)``).

Data parallel (torchrun): each process samples its own prompts, the models are wrapped in DDP,
and the loss denominators (tokens and sequences of the minibatch) are summed over processes, so
the averaged gradient is the gradient of the global minibatch loss.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

import torch
import torch.distributed as dist

import ppokernels
from ppokernels.rl import checkpoint
from ppokernels.rl.config import RLConfig
from ppokernels.rl.experience import KLController, group_advantages, lr_lambda, ppo_advantages
from ppokernels.rl.logger import MetricsLog, peak_mem_mb, plot
from ppokernels.rl.models import BUILTIN_MODELS, Critic, PolicyScorer, frozen_copy, load_policy
from ppokernels.rl.rollout import Batch, generate, supervised_batch
from ppokernels.rl.tasks import RewardModelScorer, Task, get_task


class Trainer:
    """Build with a validated :class:`RLConfig` (and optionally a :class:`Task` object), then
    :meth:`train`. ``resume=True`` continues from ``cfg.out/checkpoint`` when it exists."""

    def __init__(self, cfg: RLConfig, task: Task | None = None, *, resume: bool = False):
        self.cfg = cfg.validate()
        self._init_distributed()
        if self.device.type == "cpu" and (cfg.threads or cfg.model in BUILTIN_MODELS):
            # Tiny models: threads only add synchronisation (and stall badly on a shared CPU).
            torch.set_num_threads(cfg.threads or 1)
        self.task = task or get_task(cfg.task)
        self.tokenizer = self._tokenizer()
        self.reward_fn = (
            RewardModelScorer(cfg.reward_model, str(self.device))
            if cfg.reward_model
            else self.task.reward
        )
        resuming = resume and checkpoint.exists(cfg.out)

        torch.manual_seed(cfg.seed)
        self.policy = load_policy(
            cfg.model, self.tokenizer, seed=cfg.seed, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers
        ).to(self.device)
        self.scorer = PolicyScorer(
            self.policy, mode=cfg.logprobs, temperature=cfg.temperature, chunk_size=cfg.chunk_size
        )
        self.sft_loss = None
        if not resuming and cfg.sft_steps and self.task.sft_example is not None:
            self.sft_loss = self._warmup()
        self.ref = frozen_copy(self.policy)
        self.critic = Critic(self.policy).to(self.device) if cfg.is_ppo else None

        per_step = cfg.ppo_epochs * (
            cfg.prompts_per_step * cfg.samples_per_prompt // cfg.minibatch_size
        )
        total = cfg.steps * per_step
        adam = dict(weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, **adam)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, total))
        self.vopt = self.vsched = None
        if self.critic is not None:
            self.vopt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr, **adam)
            self.vsched = torch.optim.lr_scheduler.LambdaLR(self.vopt, lr_lambda(cfg, total))
        self.kl_ctl = KLController(cfg)

        # Each process samples different prompts and tokens (trainers.md 7: seed + rank * 100003).
        rank_seed = cfg.seed + self.rank * 100003
        self.prompt_rng = random.Random(rank_seed)
        self.shuffle_gen = torch.Generator().manual_seed(rank_seed)
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
        self.eval_prompts = self.task.held_out(cfg.eval_prompts) if cfg.eval_prompts else []
        self.step, self.elapsed = 0, 0.0
        if resuming:
            self._load()

        self.train_scorer, self.train_critic = self.scorer, self.critic
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_scorer = DDP(self.scorer, device_ids=ids)
            if self.critic is not None:
                self.train_critic = DDP(self.critic, device_ids=ids)
        self.log = None
        if self.rank == 0:
            cfg.save(os.path.join(cfg.out, "config.json"))
            self.log = MetricsLog(
                cfg.out, resume_step=self.step if resuming else None, tensorboard=cfg.tensorboard
            )
        self._stop = False

    def close(self) -> None:
        """Shuts the process group down (an exiting process that still holds gloo's threads
        aborts with "terminate called without an active exception")."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = self.cfg.device == "cuda" or (
            self.cfg.device == "auto" and torch.cuda.is_available()
        )
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")

    def _tokenizer(self):
        if self.cfg.model in BUILTIN_MODELS:
            if self.task.tokenizer is None:
                raise ValueError(
                    f"task {self.task.name!r} has no tokenizer for built-in models; "
                    "give --model a Hugging Face model"
                )
            return self.task.tokenizer()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.cfg.model)
        if tok.pad_token is None:  # truncation uses the first EOS, so pad == EOS still works
            tok.pad_token = tok.eos_token
        return tok

    def _warmup(self) -> float:
        """Supervised warm-up on task-format examples (same on every process), so the policy
        emits well-formed answers and EOS before RL starts."""
        cfg = self.cfg
        rng = random.Random(cfg.seed + 7)
        opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.sft_lr)
        loss = torch.zeros(())
        for _ in range(cfg.sft_steps):
            pairs = [self.task.sft_example(rng) for _ in range(cfg.sft_batch_size)]
            b = supervised_batch(
                self.tokenizer, [p for p, _ in pairs], [r for _, r in pairs], self.device
            )
            lp, _ = self.scorer(
                b.input_ids, b.attention_mask, b.mask, b.prompt_len, with_entropy=False
            )
            loss = -ppokernels.masked_mean(lp, b.mask.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.detach())

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

    def rollout(self) -> tuple:
        cfg = self.cfg
        k = cfg.samples_per_prompt
        prompts = self.task.sample_prompts(self.prompt_rng, cfg.prompts_per_step)
        rep = [p for p in prompts for _ in range(k)]
        group = torch.arange(len(prompts)).repeat_interleave(k)
        b = generate(
            self.policy,
            self.tokenizer,
            rep,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            group_index=group,
        )
        raw = torch.tensor(
            self.reward_fn(rep, b.responses), dtype=torch.float32, device=self.device
        )
        scores = raw.clone()
        if cfg.missing_eos_penalty:
            scores = scores - cfg.missing_eos_penalty * (~b.has_eos).float()
        b.scores = scores
        m = b.mask.float()
        # Scores from the sampling policy itself (temperature-scaled, as in training).
        old_lp, ent = self._score(b, self.scorer)
        ref_lp, _ = self._score(
            b,
            PolicyScorer(
                self.ref, mode=cfg.logprobs, temperature=cfg.temperature, chunk_size=cfg.chunk_size
            ),
        )
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
    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def update(self, b: Batch) -> dict:
        cfg = self.cfg
        ppo = self.critic is not None
        kl_in_loss = not cfg.use_kl_in_reward
        acc: dict = {}

        def add(key, value):
            if value is not None:
                acc.setdefault(key, []).append(
                    float(value.detach() if torch.is_tensor(value) else value)
                )

        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(b), generator=self.shuffle_gen).to(self.device)
            for mb in perm.split(cfg.minibatch_size):
                # Global denominators: the whole minibatch over every process (DDP averages
                # gradients, so each process's loss is scaled by the world size).
                num_tokens = float(self._all_sum(b.mask[mb].sum().float()))
                num_seqs = len(mb) * self.world
                micro = mb.split(cfg.micro_batch_size)
                for i, idx in enumerate(micro):
                    d = b.select(idx)
                    m = d["mask"].float()
                    with self._no_sync(i < len(micro) - 1):
                        lp, ent = self.train_scorer(
                            d["input_ids"],
                            d["attention_mask"],
                            d["mask"],
                            b.prompt_len,
                            with_entropy=True,
                        )
                        pl = ppokernels.ppo_policy_loss(
                            lp,
                            d["old_logprobs"],
                            d["advantages"],
                            m,
                            clip_low=cfg.clip,
                            clip_high=cfg.clip_high,
                            dual_clip=cfg.dual_clip,
                            agg=cfg.agg,
                            num_tokens=num_tokens,
                            num_seqs=num_seqs,
                            ref_logprobs=d["ref_logprobs"] if kl_in_loss else None,
                            kl_coef=self.kl_ctl.value if kl_in_loss else 0.0,
                            kl_estimator=cfg.kl_kind,
                            entropy=ent if cfg.entropy_coef > 0 else ent.detach(),
                            entropy_coef=cfg.entropy_coef,
                        )
                        loss = pl.loss
                        if ppo:
                            v = self.train_critic(
                                d["input_ids"], d["attention_mask"], d["mask"], b.prompt_len
                            )
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
                            loss = loss + cfg.vf_coef * vl.loss
                            add("value_loss", vl.loss * len(micro) * self.world)
                            add("vf_clipfrac", vl.clipfrac)
                        (loss * self.world).backward()
                    # The op returns this micro-batch's share of the global minibatch loss; the
                    # scaled shares average (over micro-batches and processes) to that loss.
                    add("policy_loss", pl.loss * len(micro) * self.world)
                    add("clipfrac", pl.clipfrac)
                    add("approx_kl", pl.approx_kl)
                add("grad_norm", self._step(self.policy, self.opt, self.sched))
                if ppo:
                    add("critic_grad_norm", self._step(self.critic, self.vopt, self.vsched))
        out = {k: sum(v) / len(v) for k, v in acc.items()}
        out["lr"] = self.sched.get_last_lr()[0]
        return out

    def _no_sync(self, skip: bool):
        if not (skip and self.world > 1):
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.train_scorer.no_sync())
        if self.critic is not None:
            stack.enter_context(self.train_critic.no_sync())
        return stack

    def _step(self, model, opt, sched) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm or 1e9)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean task reward on the held-out prompts (greedy unless ``eval_greedy=False``)."""
        cfg = self.cfg
        b = generate(
            self.policy,
            self.tokenizer,
            self.eval_prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            greedy=cfg.eval_greedy,
        )
        return sum(self.reward_fn(self.eval_prompts, b.responses)) / len(self.eval_prompts)

    # ------------------------------------------------------------------------------ loop
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self.step += 1
        b, stats = self.rollout()
        stats.update(self.update(b))
        stats = self._reduce(stats)
        self.kl_ctl.update(stats["kl"], len(b) * self.world)
        dt = time.perf_counter() - t0
        stats["tokens_per_s"] = stats.pop("response_tokens") * self.world / dt
        stats["kl_coef"] = self.kl_ctl.value
        cfg = self.cfg
        if (
            self.rank == 0
            and cfg.eval_every
            and self.eval_prompts
            and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
        ):
            stats["eval_reward"] = self.evaluate()
        self.elapsed += time.perf_counter() - t0
        stats.update(
            step=self.step,
            time_s=self.elapsed,
            step_time_s=dt,
            peak_mem_mb=peak_mem_mb(self.device),
        )
        return stats

    def _reduce(self, stats: dict) -> dict:
        """Average the scalar metrics over processes (rank 0 logs)."""
        if self.world == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist(), strict=True))

    def train(self) -> list:
        """Run until ``cfg.steps``; Ctrl-C finishes the current step, checkpoints and returns."""
        cfg = self.cfg
        rows = []
        old = signal.getsignal(signal.SIGINT)
        if self.rank == 0 or self.world == 1:
            signal.signal(signal.SIGINT, self._on_sigint)
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.algo} {self.task.name}")
        if self.rank == 0 and self.step == 0 and self.eval_prompts and cfg.eval_every:
            self.initial_eval = self.evaluate()
            if bar is not None:
                bar.write(
                    f"eval reward before RL: {self.initial_eval:.3f}"
                    + (f" (warm-up loss {self.sft_loss:.3f})" if self.sft_loss else "")
                )
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                if self.step == 1 and getattr(self, "initial_eval", None) is not None:
                    row["eval_reward_initial"] = self.initial_eval
                rows.append(row)
                if self.log is not None:
                    self.log.write(row)
                if bar is not None:
                    post = {"reward": f"{row['reward_mean']:.3f}", "kl": f"{row['kl']:.3f}"}
                    if "eval_reward" in row:
                        post["eval"] = f"{row['eval_reward']:.3f}"
                    bar.set_postfix(post)
                    bar.update(1)
                stop = self._agree(self._stop)
                if (
                    stop
                    or (cfg.save_every and self.step % cfg.save_every == 0)
                    or self.step == cfg.steps
                ):
                    self.save()
                if stop:
                    if bar is not None:
                        bar.write(f"interrupted: checkpoint saved at step {self.step}")
                    break
        finally:
            signal.signal(signal.SIGINT, old)
            if bar is not None:
                bar.close()
            if self.log is not None:
                self.log.close()
        if self.rank == 0 and cfg.plots:
            plot(cfg.out)
        return rows

    def _on_sigint(self, signum, frame):
        if self._stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True

    def _agree(self, flag: bool) -> bool:
        """Every process stops together when any of them was interrupted."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    # ------------------------------------------------------------------------------ checkpoints
    def _models(self) -> dict:
        return {"policy": self.policy, "ref": self.ref, "critic": self.critic}

    def save(self) -> str:
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "kl_coef": self.kl_ctl.value,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "vopt": self.vopt.state_dict() if self.vopt else None,
            "vsched": self.vsched.state_dict() if self.vsched else None,
            "rng": checkpoint.rng_state(self.prompt_rng, self.shuffle_gen),
            "world": self.world,
        }
        barrier = dist.barrier if self.world > 1 else None
        return checkpoint.save(
            self.cfg.out,
            rank=self.rank,
            world=self.world,
            models=self._models(),
            state=state,
            barrier=barrier,
        )

    def _load(self) -> None:
        state = checkpoint.load(
            self.cfg.out, rank=self.rank, models=self._models(), device=self.device
        )
        if state.get("world", 1) != self.world:
            raise ValueError(
                f"checkpoint was written by {state.get('world')} processes, "
                f"resuming with {self.world}"
            )
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.kl_ctl.value = state["kl_coef"]
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.vopt is not None:
            self.vopt.load_state_dict(state["vopt"])
            self.vsched.load_state_dict(state["vsched"])
        checkpoint.set_rng_state(state["rng"], self.prompt_rng, self.shuffle_gen)
