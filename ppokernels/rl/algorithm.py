"""One step of PPO / GRPO / RLOO / Dr.GRPO, top to bottom: rollout -> scores -> advantages ->
loss -> update. Every token-level operation is a ppokernels op, called here.

1. **Rollout**: ``model.generate`` samples responses to this step's training prompts (the
   sampler's own log-probs kept); the task's reward (or a reward model) scores them, checked to
   be one finite float each; a response without EOS loses ``missing_eos_penalty``.
2. **Scores**: old and reference log-probs (``linear_logprobs`` on the response hidden states,
   temperature-scaled as in training) and the critic's values; the per-token KL
   (``kl_penalty``); the rollout-vs-trainer mismatch (:func:`rollout_mismatch`) and, with
   ``rollout_is_cap``, truncated importance weights.
3. **Advantages**: PPO puts ``-kl_coef * KL`` into per-token rewards with the score on the last
   valid token, whitens them without mean shift (``masked_whiten``), runs ``gae`` and whitens
   the advantages; GRPO / RLOO / Dr.GRPO take ``group_advantages`` over each prompt's samples.
4. **Loss**: the policy loss of any loss spec (``cfg.loss``) from hidden states, by the head
   ``cfg.head``: ``linear_ppo_policy_loss`` (fused: 3 GEMMs, never ``[N, V]`` logits), or
   ``linear_logprobs`` + ``ppo_policy_loss`` (split: 3 GEMMs within its logits cache, 4 beyond),
   or full logits + ``log_softmax`` + ``ppo_policy_loss`` (naive); plus ``vf_coef`` x
   ``value_loss`` for PPO. KL in the loss for the group methods (``kl_in_reward=false``).
5. **Update**: ``ppo_epochs`` passes over shuffled minibatches, gradient accumulation over
   micro-batches, gradient clipping, AdamW, the LR schedule; then the adaptive KL coefficient.

Data parallel: the loss denominators (tokens and sequences of the minibatch) are summed over
processes, so ``ppo_policy_loss`` / ``value_loss`` return this micro-batch's share of the
global minibatch loss; DDP averages gradients over ``world`` processes, hence the backward of
``loss * world``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import ppokernels
from ppokernels.rl import distributed
from ppokernels.rl.config import RLConfig
from ppokernels.rl.models import full_logits_logprobs, unpack
from ppokernels.rl.parallel import Parallel
from ppokernels.rl.rollout import Batch, generate
from ppokernels.rl.state import TrainState
from ppokernels.rl.tasks import Task, check_rewards


@dataclass
class Actors:
    """The modules a step runs, built by the trainer: the policy (``generate``), its scorer
    and the reference's (log-probs from hidden states), the critic, the modules the training
    forward goes through (DDP wrappers, or the same modules), and how they are spread."""

    policy: torch.nn.Module
    tokenizer: object
    scorer: torch.nn.Module
    ref_scorer: torch.nn.Module
    critic: torch.nn.Module | None
    train_scorer: torch.nn.Module
    train_critic: torch.nn.Module | None
    par: Parallel


@dataclass
class Metrics:
    """Running lists of scalar metrics; :meth:`mean` averages each."""

    values: dict = field(default_factory=dict)

    def add(self, key: str, value) -> None:
        if value is not None:
            self.values.setdefault(key, []).append(float(value))

    def mean(self) -> dict:
        return {k: sum(v) / len(v) for k, v in self.values.items()}


def train_step(cfg: RLConfig, st: TrainState, m: Actors, task: Task, reward) -> dict:
    """One RL step on ``st`` (``reward = (function, name for errors)``); returns its metrics,
    averaged over processes."""
    b, stats = rollout(cfg, st, m, task, reward)
    stats |= score(cfg, m, b)
    advantages(cfg, st, b)
    stats |= update(cfg, st, m, b)
    stats = distributed.mean_metrics(stats, m.par.world, m.par.device)
    st.kl_coef = adapted_kl_coef(cfg, st.kl_coef, stats["kl"], len(b) * m.par.world)
    stats["kl_coef"] = st.kl_coef
    return stats


# ----------------------------------------------------------------------------- 1. rollout
def rollout(cfg: RLConfig, st: TrainState, m: Actors, task: Task, reward) -> tuple:
    """Sampled responses to ``prompts_per_step`` training prompts (``samples_per_prompt``
    each, one group per prompt) and their scores [B]."""
    k = cfg.samples_per_prompt
    prompts = task.sample_train(st.prompt_rng, cfg.prompts_per_step)
    rep = [p for p in prompts for _ in range(k)]
    with m.par.gathered(m.scorer):  # FSDP2: sample from the whole policy, no collective per token
        b = generate(
            m.policy,
            m.tokenizer,
            rep,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            group_index=torch.arange(len(prompts)).repeat_interleave(k),
            with_logprobs=True,
        )
    fn, source = reward
    raw = torch.tensor(check_rewards(fn(rep, b.responses), len(rep), source), device=b.mask.device)
    b.scores = raw - (cfg.missing_eos_penalty or 0.0) * (~b.has_eos).float()
    mask = b.mask.float()
    return b, {
        "reward_mean": float(raw.mean()),
        "score_mean": float(b.scores.mean()),
        "response_len": float(mask.sum(1).mean()),
        "eos_frac": float(b.has_eos.float().mean()),
        "response_tokens": float(mask.sum()),
    }


# ----------------------------------------------------------------------------- 2. scores
@torch.no_grad()
def score(cfg: RLConfig, m: Actors, b: Batch) -> dict:
    """Old and reference log-probs, values (PPO), the per-token KL and the mismatch between the
    sampler's and the trainer's log-probs, into ``b.extra``."""
    mask = b.mask.float()
    old, ent = _in_micro_batches(b, cfg.micro_batch_size, m.scorer)
    ref, _ = _in_micro_batches(b, cfg.micro_batch_size, m.ref_scorer)
    kl = ppokernels.kl_penalty(old, ref, estimator=cfg.kl_kind) * mask
    b.extra.update(old_logprobs=old, ref_logprobs=ref, kl=kl)
    if m.critic is not None:
        b.extra["values"] = _in_micro_batches(b, cfg.micro_batch_size, m.critic)
    stats = {
        "kl": float(ppokernels.masked_mean(kl, mask)),
        "entropy": float(ppokernels.masked_mean(ent, mask)),
    }
    if b.rollout_logprobs is not None:
        mismatch, weights = rollout_mismatch(old, b.rollout_logprobs, b.mask, cfg.rollout_is_cap)
        stats |= mismatch
        if cfg.rollout_is_cap is not None:  # truncated IS (off by default)
            b.extra["is_weights"] = weights
    return stats


# The band of the ratio exp(logprobs - rollout_logprobs) outside which a token counts as
# mismatched, as a rejection criterion of rollout_correction: k1 = -log ratio within
# [-log 1.1, -log 0.9].
_MISMATCH_BAND = {"token_k1": (-math.log(1.1), -math.log(0.9))}


def rollout_mismatch(logprobs, rollout_logprobs, mask, is_cap=None) -> tuple[dict, torch.Tensor]:
    """How far the sampler's log-probs (``generate``'s scores) are from the trainer's
    recomputed ones on the same tokens, [B, T] each, from one ``rollout_correction`` call:
    the mean ``|logprobs - rollout_logprobs|``, the fraction of tokens whose ratio
    ``exp(logprobs - rollout_logprobs)`` leaves [0.9, 1.1] (the ``token_k1`` criterion's
    rejected fraction; the rejection mask itself is not used) and the k3 estimate of
    KL(sampler || trainer), ``mean exp(x) - 1 - x``, means over valid tokens. Also returns the
    op's truncated IS weights ``min(exp(logprobs - rollout_logprobs), is_cap)`` [B, T] (0 on
    padding; unbounded without ``is_cap``), constants."""
    out = ppokernels.rollout_correction(
        logprobs,
        rollout_logprobs,
        mask,
        level="token",
        mode="truncate",
        bounds=(None, is_cap),
        logratio_clamp=None,
        criteria=_MISMATCH_BAND,
    )
    keys = ("logratio_abs_mean", "token_k1/masked_fraction", "k3_kl")
    values = torch.stack([out.metrics[k] for k in keys]).tolist()  # one host sync
    names = ("mismatch_logprob_abs", "mismatch_ratio_outside", "mismatch_kl_k3")
    return dict(zip(names, values, strict=True)), out.weights


def _in_micro_batches(b: Batch, size: int, module):
    """``module`` (a scorer: log-probs and entropy; the critic: values) over the batch."""
    outs = [
        module(b.input_ids[i], b.attention_mask[i], b.mask[i], b.prompt_len)
        for i in torch.arange(len(b), device=b.mask.device).split(size)
    ]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


# ----------------------------------------------------------------------------- 3. advantages
def advantages(cfg: RLConfig, st: TrainState, b: Batch) -> None:
    """``advantages`` (and PPO's ``returns``) [B, T] into ``b.extra``, zero on padding."""
    mask = b.mask.float()
    if not cfg.is_ppo:  # GRPO: (s - mean) / (std + eps) per prompt; Dr.GRPO: no std; RLOO
        seq = ppokernels.group_advantages(
            b.scores,
            b.group_index,
            estimator="rloo" if cfg.algo == "rloo" else "grpo",
            eps=cfg.adv_eps,
            norm_by_std=cfg.algo != "drgrpo",
        )
        b.extra["advantages"] = seq[:, None] * mask
        return
    rewards = -st.kl_coef * b.extra["kl"] if cfg.use_kl_in_reward else torch.zeros_like(mask)
    last = mask.sum(1).long() - 1  # the score goes on the last valid token (the EOS if any)
    rewards[torch.arange(len(b), device=mask.device), last] += b.scores
    if cfg.whiten_rewards:
        rewards = ppokernels.masked_whiten(rewards, mask, shift_mean=False) * mask
    adv, returns = ppokernels.gae(rewards, b.extra["values"], mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        adv = ppokernels.masked_whiten(adv, mask)
    b.extra.update(advantages=adv * mask, returns=returns * mask)


# ----------------------------------------------------------------------------- 4. loss
def policy_loss(cfg: RLConfig, scorer, d: dict, prompt_len: int, *, num_tokens, num_seqs, kl_coef):
    """The policy loss of one micro-batch ``d`` (rows of the batch, see ``Batch.select``),
    through ``scorer``'s forward: ``L(ratio, A) + kl_coef KL(pi || ref) - entropy_coef H``,
    aggregated with ``agg`` over the global ``num_tokens`` / ``num_seqs``. Returns the op's
    ``PolicyLossOutput``."""
    mask, kl_in_loss = d["mask"], not cfg.use_kl_in_reward
    with_entropy = cfg.entropy_coef > 0
    options = dict(
        agg=cfg.loss_agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        logratio_clamp=cfg.logratio_clamp,
        ref_logprobs=d["ref_logprobs"] if kl_in_loss else None,
        kl_coef=kl_coef if kl_in_loss else 0.0,
        kl_estimator=cfg.kl_kind,
        entropy_coef=cfg.entropy_coef,
        is_weights=d.get("is_weights"),
        loss=cfg.loss,
    )
    old, adv = d["old_logprobs"], d["advantages"]

    def head(hidden, weight, bias, labels):  # hidden [B, T, H], labels [B, T]
        if cfg.head == "fused":  # the loss and its gradients in one chunked pass: 3 GEMMs
            return ppokernels.linear_ppo_policy_loss(
                hidden,
                weight,
                labels,
                old,
                adv,
                mask,
                bias=bias,
                temperature=cfg.temperature,
                with_entropy=with_entropy,
                chunk_size=cfg.chunk_size,
                **options,
            )
        h, y = hidden[mask], labels[mask]  # only the valid tokens reach the vocabulary
        if cfg.head == "split":  # log-probs first (2 GEMMs), the loss's backward (2 more)
            lp, ent = ppokernels.linear_logprobs(
                h,
                weight,
                y,
                bias=bias,
                temperature=cfg.temperature,
                with_entropy=with_entropy,
                chunk_size=cfg.chunk_size,
            )
        else:  # naive: [N, V] logits, log_softmax, gather
            lp, ent = full_logits_logprobs(h, weight, bias, y, cfg.temperature, with_entropy)
        entropy = unpack(ent, mask) if ent is not None else None
        return ppokernels.ppo_policy_loss(
            unpack(lp, mask), old, adv, mask, entropy=entropy, **options
        )

    return scorer(d["input_ids"], d["attention_mask"], mask, prompt_len, head)


def value_loss(cfg: RLConfig, critic, d: dict, prompt_len: int, *, num_tokens, num_seqs):
    """PPO's clipped value loss of one micro-batch (``ValueLossOutput``)."""
    values = critic(d["input_ids"], d["attention_mask"], d["mask"], prompt_len)
    return ppokernels.value_loss(
        values,
        d["values"],
        d["returns"],
        d["mask"],
        clip=cfg.value_clip,
        agg=cfg.loss_agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
    )


# ----------------------------------------------------------------------------- 5. update
def update(cfg: RLConfig, st: TrainState, m: Actors, b: Batch) -> dict:
    """``ppo_epochs`` passes over shuffled minibatches; one optimizer step per minibatch."""
    world, acc = m.par.world, Metrics()
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(len(b), generator=st.shuffle_gen).to(b.mask.device)
        for mb in perm.split(cfg.minibatch_size):
            # global denominators: the whole minibatch over every process
            den = dict(
                num_tokens=float(distributed.all_sum(b.mask[mb].sum().float(), world)),
                num_seqs=len(mb) * world,
            )
            micro = mb.split(cfg.micro_batch_size)
            scale = len(micro) * world  # a share of the minibatch loss -> that loss, for logs
            for i, idx in enumerate(micro):
                d = b.select(idx)
                with m.par.no_sync([m.train_scorer, m.train_critic], i < len(micro) - 1):
                    pl = policy_loss(
                        cfg, m.train_scorer, d, b.prompt_len, kl_coef=st.kl_coef, **den
                    )
                    loss = pl.loss
                    if m.critic is not None:
                        vl = value_loss(cfg, m.train_critic, d, b.prompt_len, **den)
                        loss = loss + cfg.vf_coef * vl.loss
                        acc.add("value_loss", vl.loss.detach() * scale)
                        acc.add("vf_clipfrac", vl.clipfrac)
                    (loss * world).backward()
                acc.add("policy_loss", pl.loss.detach() * scale)
                acc.add("clipfrac", pl.clipfrac)
                acc.add("approx_kl", pl.approx_kl)
            acc.add("grad_norm", _optimizer_step(cfg, m.par, st.policy, st.opt, st.sched))
            if m.critic is not None:
                acc.add(
                    "critic_grad_norm", _optimizer_step(cfg, m.par, st.critic, st.vopt, st.vsched)
                )
    return acc.mean() | {"lr": st.sched.get_last_lr()[0]}


def _optimizer_step(cfg: RLConfig, par: Parallel, model, opt, sched) -> float:
    norm = par.clip_grad_norm(model, cfg.max_grad_norm or 1e9)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def adapted_kl_coef(cfg: RLConfig, coef: float, kl: float, n: int) -> float:
    """Fixed, or adaptive (Ziegler et al. 2019):
    ``coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)``."""
    if not cfg.adaptive_kl:
        return coef
    err = min(max(kl / cfg.kl_target - 1.0, -0.2), 0.2)
    return coef * (1.0 + err * n / cfg.kl_horizon)
