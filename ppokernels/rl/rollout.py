"""Rollouts: tokenise prompts (left padding), sample responses with ``model.generate``, cut
everything after the first EOS (docs/semantics.md: the response mask includes EOS, the rest is pad),
decode and score."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One rollout batch. ``input_ids``/``attention_mask`` [B, P + T] (prompt left-padded to P,
    response right-padded to T); ``mask`` [B, T] bool response mask (includes the EOS);
    ``scores`` [B] float32; ``group_index`` [B] int64 (prompt of each sample)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    prompts: list
    responses: list
    has_eos: torch.Tensor
    group_index: torch.Tensor
    scores: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> dict:
        """Row subset of every [B, ...] tensor (extra included) as a dict."""
        out = {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "mask": self.mask[idx],
        }
        out.update({k: v[idx] for k, v in self.extra.items()})
        return out


def encode_prompts(tokenizer, prompts: list, device) -> tuple:
    """Left-padded prompt ids and attention mask [B, P]."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def truncate_at_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple:
    """[B, T] sampled ids -> (ids with pad after the first EOS, bool mask up to and including
    the first EOS, has_eos [B])."""
    is_eos = responses == eos_id
    before = is_eos.long().cumsum(-1) - is_eos.long()  # number of EOS strictly before t
    mask = before == 0
    ids = responses.masked_fill(~mask, pad_id)
    return ids, mask, is_eos.any(-1)


def join(prompt_ids, prompt_mask, response_ids, mask) -> tuple:
    """[B, P] + [B, T] -> full ids and attention mask [B, P + T]."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    am = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    return ids, am


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    group_index: torch.Tensor | None = None,
) -> Batch:
    """Sample one response per prompt (repeat prompts for groups). Responses are padded to
    exactly ``max_new_tokens`` so every batch has the same shape."""
    device = next(model.parameters()).device
    pids, pmask = encode_prompts(tokenizer, prompts, device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    from transformers import GenerationConfig

    # A fresh GenerationConfig so a checkpoint's defaults (top_k=50, repetition penalty, ...)
    # cannot change the sampling distribution behind the log-probs we train on.
    sampling = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    )
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
        **sampling,
    )
    # synced_gpus=False: under FSDP2 the caller gathers the parameters first (parallel.gathered),
    # so each process generates on its own; transformers would otherwise keep every process
    # stepping until all have finished, which deadlocks when only rank 0 evaluates.
    out = model.generate(
        input_ids=pids, attention_mask=pmask, generation_config=gen, synced_gpus=False
    )
    resp = out[:, pids.shape[1] :]
    if resp.shape[1] < max_new_tokens:  # generate stops early once every row has ended
        fill = resp.new_full((resp.shape[0], max_new_tokens - resp.shape[1]), pad)
        resp = torch.cat([resp, fill], dim=1)
    resp, mask, has_eos = truncate_at_eos(resp, eos, pad)
    ids, am = join(pids, pmask, resp, mask)
    texts = tokenizer.batch_decode(resp.masked_fill(resp == eos, pad), skip_special_tokens=True)
    if group_index is None:
        group_index = torch.arange(len(prompts))
    return Batch(
        ids, am, mask, pids.shape[1], list(prompts), texts, has_eos, group_index.to(device)
    )


def supervised_batch(tokenizer, prompts: list, responses: list, device) -> Batch:
    """A teacher-forced batch (response + EOS) in the same layout as a rollout, for warm-up."""
    pids, pmask = encode_prompts(tokenizer, prompts, device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in responses]
    width = max(len(s) for s in seqs)
    resp = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        resp[i, : len(s)] = torch.tensor(s)
    resp = resp.to(device)
    resp, mask, has_eos = truncate_at_eos(resp, eos, pad)
    ids, am = join(pids, pmask, resp, mask)
    return Batch(
        ids,
        am,
        mask,
        pids.shape[1],
        list(prompts),
        list(responses),
        has_eos,
        torch.arange(len(prompts), device=device),
    )
