"""PPO on a tiny Hugging Face Llama, in one file, with ppokernels' public ops.

The task is ``copy`` (as ``ppokernels train``'s demo): the prompt ``cfa:`` should be answered
``cfa``; the reward is the fraction of positions right over ``max(3, len(response))``. A fixed
10% of the 1000 prompts (by a CRC-32 of the text) is the test split, never trained on. The model
and its character tokenizer are built in code: nothing is downloaded.

Read top to bottom: arguments, task, model, rollout helpers, a supervised warm-up (noisy
demonstrations, as an SFT model before RLHF), then the PPO loop (rollout, scores, advantages,
loss, update) and the test evaluation. The ops:

* ``linear_logprobs``: log-probs and entropy from hidden states and the lm_head weight;
* ``kl_penalty``, ``masked_whiten``, ``gae``: per-token KL rewards, whitening, advantages;
* ``linear_ppo_policy_loss``: the clipped policy loss straight from hidden states (3 GEMMs,
  never the ``[N, V]`` logits); ``value_loss``: the clipped value loss.

    python examples/ppo_minimal.py            # about as long as `ppokernels train` on a CPU
    python examples/ppo_minimal.py --steps 20 --seed 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import time
import zlib
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import ppokernels


@dataclass
class Args:
    seed: int = 0
    steps: int = 60  # PPO steps
    batch_size: int = 64  # prompts (= responses) per step
    minibatch_size: int = 32  # responses per optimizer step
    ppo_epochs: int = 2
    lr: float = 1e-3
    critic_lr: float = 2e-3
    max_new_tokens: int = 8
    temperature: float = 1.0
    value_clip: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 0.02  # per-token k1 KL to the reference, in the reward
    gamma: float = 1.0
    lam: float = 0.95
    missing_eos_penalty: float = 1.0
    max_grad_norm: float = 1.0
    sft_steps: int = 100
    sft_lr: float = 3e-3
    sft_right: float = 0.25  # fraction of warm-up demonstrations that are correct
    eval_prompts: int = 128


# ------------------------------------------------------------------------- the task: copy
LETTERS = "abcdefghij"
PROMPTS = [a + b + c + ":" for a in LETTERS for b in LETTERS for c in LETTERS]


def split_of(prompt: str) -> str:
    """CRC-32 of the text mod 100: [0, 10) test, [10, 20) validation, else train."""
    bucket = zlib.crc32(prompt.encode()) % 100
    return "test" if bucket < 10 else "validation" if bucket < 20 else "train"


TRAIN = [p for p in PROMPTS if split_of(p) == "train"]
TEST = [p for p in PROMPTS if split_of(p) == "test"]


def reward(prompts: list, responses: list) -> torch.Tensor:
    """Right letters in the right places over max(3, len(response)) per response."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        want = p[:-1]
        out.append(sum(a == b for a, b in zip(want, r, strict=False)) / max(len(want), len(r)))
    return torch.tensor(out)


def demonstration(rng: random.Random) -> tuple:
    """A noisy warm-up pair: right ``sft_right`` of the time, else 2-4 random letters."""
    p = rng.choice(TRAIN)
    wrong = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4)))
    return p, p[:-1] if rng.random() < args.sft_right else wrong


# ------------------------------------------------------------------------- the model
def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in "0123456789" + LETTERS + "=:":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()  # eval(): dropout off (it is 0 already)


class Critic(torch.nn.Module):
    """A copy of the policy's decoder with a zero-initialised scalar head: first values are 0."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        self.body = copy.deepcopy(lm.model)
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)


# ------------------------------------------------------------------------- rollout helpers
def hidden_states(body, ids, attn, prompt_len: int) -> torch.Tensor:
    """[B, T, H]: the hidden states that predict the T response tokens of ``ids`` [B, P + T]
    (positions skip the left padding)."""
    am = attn[:, :-1]
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = body(input_ids=ids[:, :-1], attention_mask=am, position_ids=pos, use_cache=False)
    return out.last_hidden_state[:, prompt_len - 1 :]


def logprobs(lm, ids, attn, mask, prompt_len: int) -> tuple:
    """Per-token log-probs and entropy [B, T] of the response tokens (0 on padding)."""
    h = hidden_states(lm.model, ids, attn, prompt_len)
    labels = ids[:, prompt_len:]
    lp, ent = ppokernels.linear_logprobs(
        h[mask], lm.lm_head.weight, labels[mask], temperature=args.temperature, with_entropy=True
    )
    zeros = torch.zeros(mask.shape)
    return zeros.masked_scatter(mask, lp), zeros.masked_scatter(mask, ent)


def values(critic: Critic, ids, attn, mask, prompt_len: int) -> torch.Tensor:
    h = hidden_states(critic.body, ids, attn, prompt_len)
    return critic.head(h).squeeze(-1) * mask


def encode(prompts: list, responses: list | None = None) -> tuple:
    """Left-padded prompts [B, P]; with ``responses``, the teacher-forced ids, attention mask
    [B, P + T] and response mask [B, T] (the EOS included)."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    if responses is None:
        return enc["input_ids"], enc["attention_mask"]
    seqs = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    resp = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        resp[i, : len(s)] = torch.tensor(s)
    mask = resp != tok.pad_token_id
    return join(enc["input_ids"], enc["attention_mask"], resp, mask)


def join(pids, pmask, resp, mask) -> tuple:
    return torch.cat([pids, resp], 1), torch.cat([pmask, mask.long()], 1), mask


@torch.no_grad()
def sample(prompts: list) -> tuple:
    """Responses up to and including the first EOS (the rest padding) and their text."""
    pids, pmask = encode(prompts)
    gen = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    out = policy.generate(input_ids=pids, attention_mask=pmask, generation_config=gen)
    resp = out[:, pids.shape[1] :]
    resp = torch.cat([resp, resp.new_zeros(len(prompts), args.max_new_tokens - resp.shape[1])], 1)
    is_eos = resp == tok.eos_token_id
    mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to the first EOS
    resp = resp.masked_fill(~mask, tok.pad_token_id)
    texts = tok.batch_decode(resp.masked_fill(is_eos, tok.pad_token_id), skip_special_tokens=True)
    return *join(pids, pmask, resp, mask), is_eos.any(-1), texts


def evaluate(prompts: list) -> float:
    prompts = [prompts[i % len(prompts)] for i in range(args.eval_prompts)]
    return float(reward(prompts, sample(prompts)[-1]).mean())


# ------------------------------------------------------------------------- main
def parse_args() -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return Args(**vars(p.parse_args()))


if __name__ == "__main__":
    args = parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a tiny model: threads only add synchronisation
    tok = char_tokenizer()
    tok.padding_side = "left"
    policy = tiny_llama(len(tok))

    # Supervised warm-up: the answer format and EOS, from noisy demonstrations.
    opt = torch.optim.AdamW(policy.parameters(), lr=args.sft_lr)
    rng = random.Random(args.seed + 7)
    for _ in range(args.sft_steps):
        pairs = [demonstration(rng) for _ in range(32)]
        ids, attn, mask = encode([p for p, _ in pairs], [r for _, r in pairs])
        lp, _ = logprobs(policy, ids, attn, mask, ids.shape[1] - mask.shape[1])
        loss = -ppokernels.masked_mean(lp, mask.float())
        opt.zero_grad()
        loss.backward()
        opt.step()

    ref = copy.deepcopy(policy).requires_grad_(False)
    critic = Critic(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-8)
    vopt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, eps=1e-8)
    updates = args.steps * args.ppo_epochs * (args.batch_size // args.minibatch_size)
    anneal = lambda i: 1.0 - min(i / updates, 1.0)  # noqa: E731  (linear to 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, anneal)
    vsched = torch.optim.lr_scheduler.LambdaLR(vopt, anneal)
    shuffle = torch.Generator().manual_seed(args.seed)
    print(f"test reward before PPO: {evaluate(TEST):.3f}")
    t0 = time.perf_counter()

    for step in range(1, args.steps + 1):
        # 1. rollout: responses and their scores (a response without EOS is penalised)
        prompts = [rng.choice(TRAIN) for _ in range(args.batch_size)]
        ids, attn, mask, has_eos, texts = sample(prompts)
        raw = reward(prompts, texts)
        scores = raw - args.missing_eos_penalty * (~has_eos).float()
        P, m = ids.shape[1] - mask.shape[1], mask.float()

        # 2. scores: old and reference log-probs, values, the per-token KL
        with torch.no_grad():
            old_lp, _ = logprobs(policy, ids, attn, mask, P)
            ref_lp, _ = logprobs(ref, ids, attn, mask, P)
            old_values = values(critic, ids, attn, m, P)
        kl = ppokernels.kl_penalty(old_lp, ref_lp, estimator="k1") * m

        # 3. advantages: -kl_coef * KL per token, the score on the last valid token, whitened
        #    rewards (no mean shift), GAE, whitened advantages
        rewards = -args.kl_coef * kl
        rewards[torch.arange(len(prompts)), m.sum(1).long() - 1] += scores
        rewards = ppokernels.masked_whiten(rewards, m, shift_mean=False) * m
        adv, returns = ppokernels.gae(rewards, old_values, m, gamma=args.gamma, lam=args.lam)
        adv = ppokernels.masked_whiten(adv, m) * m

        # 4-5. loss and update: epochs of shuffled minibatches
        for _ in range(args.ppo_epochs):
            for mb in torch.randperm(len(prompts), generator=shuffle).split(args.minibatch_size):
                h = hidden_states(policy.model, ids[mb], attn[mb], P)
                pl = ppokernels.linear_ppo_policy_loss(
                    h,
                    policy.lm_head.weight,
                    ids[mb, P:],
                    old_lp[mb],
                    adv[mb],
                    mask[mb],
                    temperature=args.temperature,
                )  # the default loss: PPO's clipped surrogate, ratio clipped to [0.8, 1.2]
                vl = ppokernels.value_loss(
                    values(critic, ids[mb], attn[mb], m[mb], P),
                    old_values[mb],
                    returns[mb],
                    mask[mb],
                    clip=args.value_clip,
                )
                (pl.loss + args.vf_coef * vl.loss).backward()
                for model, o, s in ((policy, opt, sched), (critic, vopt, vsched)):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    o.step()
                    s.step()
                    o.zero_grad()

        if step % 10 == 0 or step == args.steps:
            mean_kl = float(ppokernels.masked_mean(kl, m))
            print(
                f"step {step}: reward {float(raw.mean()):.3f} kl {mean_kl:.4f} clipfrac "
                f"{float(pl.clipfrac):.3f} ({time.perf_counter() - t0:.0f} s)"
            )

    print(f"test reward after PPO: {evaluate(TEST):.3f}")
