"""The trainer: everything around the step. It builds the models and the
:class:`~ppokernels.rl.state.TrainState`, runs the supervised warm-up, then calls
:func:`ppokernels.rl.algorithm.train_step` ``steps`` times, with validation every
``eval_every`` steps and the test split at the end (:class:`~ppokernels.rl.evaluation.HeldOut`),
metrics (``metrics.jsonl``, TensorBoard, plots), checkpoints and ``OUT/model``, and Ctrl-C
(finish the step, save, stop).

Data parallel (torchrun): each process samples its own prompts, the models are wrapped in DDP
or sharded with FSDP2 (:mod:`ppokernels.rl.parallel`, which also sets bf16 and activation
checkpointing); rank 0 logs, evaluates and exports.
"""

from __future__ import annotations

import os
import time

import torch

from ppokernels.rl import algorithm, checkpoint, distributed
from ppokernels.rl.config import RLConfig
from ppokernels.rl.evaluation import HeldOut
from ppokernels.rl.logger import MetricsLog, peak_mem_mb, plot
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
from ppokernels.rl.state import TrainState
from ppokernels.rl.tasks import RewardModelScorer, Task, get_task, reward_name
from ppokernels.rl.warmup import supervised_warmup

RUN_CONFIG = "run_config.json"


class Interrupted(RuntimeError):
    """Ctrl-C before RL started (setup or warm-up): nothing was written."""


class Trainer:
    """Build with a validated :class:`RLConfig` (and optionally a :class:`Task` object), then
    :meth:`train`, then :meth:`close`. ``resume=True`` continues from ``cfg.out/checkpoint`` (an
    error when there is none); without it an existing run in ``cfg.out`` is only replaced when
    ``overwrite=True``. ``self.state`` is the :class:`TrainState`."""

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
        self.task = task or get_task(cfg.task, **task_options(cfg))
        self.tokenizer = load_tokenizer(cfg.model, self.task.tokenizer, self.task.name)
        fn = RewardModelScorer(cfg.reward_model, str(self.device)) if cfg.reward_model else None
        fn = fn or self.task.reward
        self.reward = (fn, f"task {self.task.name!r}: {reward_name(fn)}")
        names = ["policy", "ref"] + (["critic"] if cfg.is_ppo else [])
        where = dict(rank=self.rank, names=names, sharded=self.par.fsdp)
        checkpoint.check_out_dir(cfg.out, resume=resume, overwrite=overwrite, **where)

        self.actors, self.state = self._build(resume)
        self.held_out = HeldOut(cfg, self.task, *self.reward)
        if resume:
            checkpoint.load(
                cfg.out,
                self.state,
                rank=self.rank,
                world=self.world,
                strategy=self.par.strategy,
                device=self.device,
                sharded=self.par.fsdp,
            )
        if distributed.any_true(self.stop.requested, self.world, self.device):
            raise Interrupted(f"interrupted during setup: nothing was written to {cfg.out}")
        self.log = None
        if self.rank == 0:
            cfg.save(os.path.join(cfg.out, RUN_CONFIG))
            resume_step = self.state.step if resume else None
            self.log = MetricsLog(cfg.out, resume_step=resume_step, tensorboard=cfg.tensorboard)

    def _build(self, resume: bool) -> tuple:
        """Policy (warmed up unless resuming), frozen reference, critic (PPO), their scorers
        prepared by :class:`Parallel`, then the optimizers (FSDP2 replaces the parameters)."""
        cfg, par = self.cfg, self.par
        torch.manual_seed(cfg.seed)
        policy = load_policy(
            cfg.model, self.tokenizer, seed=cfg.seed, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers
        ).to(par.build_device)
        head = dict(
            temperature=cfg.temperature, chunk_size=cfg.chunk_size, naive=cfg.head == "naive"
        )
        scorer = PolicyScorer(policy, **head)
        self.sft_loss = None
        if not resume and cfg.sft_steps and self.task.sft_example is not None:
            self.sft_loss = supervised_warmup(
                cfg, self.task, self.tokenizer, scorer, self._check_stop
            )
        ref = frozen_copy(policy)
        ref_scorer = PolicyScorer(ref, **head)
        critic = Critic(policy).to(par.build_device) if cfg.is_ppo else None
        par.prepare(scorer, backbone(policy), policy)
        par.prepare(ref_scorer, backbone(ref))
        if critic is not None:
            par.prepare(critic, critic.body, critic.body)
        state = TrainState.create(cfg, policy, ref, critic, rank=self.rank)
        actors = algorithm.Actors(
            policy=policy,
            tokenizer=self.tokenizer,
            scorer=scorer,
            ref_scorer=ref_scorer,
            critic=critic,
            train_scorer=par.train_module(scorer),
            train_critic=par.train_module(critic),
            par=par,
        )
        return actors, state

    def _check_stop(self, i: int) -> None:
        """Ctrl-C during the warm-up (before the models are sharded): stop, write nothing."""
        if distributed.any_true(self.stop.requested, self.world, self.device):
            raise Interrupted(
                f"interrupted during the supervised warm-up (step {i} of {self.cfg.sft_steps}): "
                f"nothing was written to {self.cfg.out}"
            )

    def close(self) -> None:
        """Leave the process group; the DDP wrappers (their reducers hold the group) are dropped
        first, so that gloo's threads are joined here, not at interpreter exit (SIGABRT)."""
        self.actors.train_scorer, self.actors.train_critic = self.actors.scorer, self.actors.critic
        distributed.shutdown()

    # ------------------------------------------------------------------------------ shortcuts
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def policy(self):
        return self.state.policy

    @property
    def critic(self):
        return self.state.critic

    @property
    def scorer(self):
        return self.actors.scorer

    @property
    def initial(self) -> dict:
        """Validation and test reward before RL (empty on a resumed run)."""
        return self.held_out.initial

    def evaluate(self, split: str = "validation") -> float:
        """Mean task reward on the held-out ``split``; every process calls it under FSDP2."""
        with self.par.gathered(self.scorer):
            return self.held_out.run(self.policy, self.tokenizer, split)

    def _rank0_eval(self, fn, *args, **kw) -> dict:
        """``fn(policy, tokenizer, ...)`` on rank 0, the policy gathered by every process."""
        with self.par.gathered(self.scorer):
            return fn(self.policy, self.tokenizer, *args, **kw) if self.rank == 0 else {}

    # ------------------------------------------------------------------------------ loop
    def train_step(self) -> dict:
        """One step (:func:`ppokernels.rl.algorithm.train_step`), then the evaluation due."""
        t0 = time.perf_counter()
        st = self.state
        st.step += 1
        stats = algorithm.train_step(self.cfg, st, self.actors, self.task, self.reward)
        dt = time.perf_counter() - t0
        stats["tokens_per_s"] = stats.pop("response_tokens") * self.world / dt
        final = st.step == self.cfg.steps
        if self.held_out.is_due(st.step, final=final):
            stats |= self._rank0_eval(self.held_out.due, st.step, final=final)
        st.elapsed += time.perf_counter() - t0
        stats |= dict(
            step=st.step, time_s=st.elapsed, step_time_s=dt, peak_mem_mb=peak_mem_mb(self.device)
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

    def request_stop(self) -> None:
        """What Ctrl-C does: finish the current step, save, stop (tests call it directly)."""
        self.stop()

    # ------------------------------------------------------------------------------ checkpoints
    def save(self, export: bool = False) -> str:
        """Checkpoint the :class:`TrainState` (every process); with ``export``, also
        ``OUT/model`` (rank 0)."""
        path = checkpoint.save(
            self.cfg.out,
            self.state,
            rank=self.rank,
            world=self.world,
            strategy=self.par.strategy,
            barrier=distributed.barrier(self.world),
            sharded=self.par.fsdp,
        )
        if export:  # a full Hugging Face folder, gathered from the shards under FSDP2
            full = self.par.full_state_dict(self.policy)
            if self.rank == 0:
                checkpoint.export_model(self.cfg.out, self.policy, self.tokenizer, full)
        return path


def task_options(cfg: RLConfig) -> dict:
    """The config's options for ``jsonl:PATH`` tasks (:func:`ppokernels.rl.tasks.jsonl_task`)."""
    keys = ("reward", "prompt_field", "answer_field", "split_field", "reward_tolerance")
    return {k: getattr(cfg, k) for k in keys} | {"reward_regex": cfg.reward_regex}
