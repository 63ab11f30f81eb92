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
    ``scores`` [B] float32; ``group_index`` [B] int64 (prompt of each sample);
    ``rollout_logprobs`` [B, T] the sampler's log-probs (when asked for); ``extra`` the [B, ...]
    tensors the step adds (old / reference log-probs, advantages, values, returns)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    prompts: list
    responses: list
    has_eos: torch.Tensor
    group_index: torch.Tensor
    scores: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
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
    with_logprobs: bool = False,
) -> Batch:
    """Sample one response per prompt (repeat prompts for groups). Responses are padded to
    exactly ``max_new_tokens`` so every batch has the same shape. ``with_logprobs``: also the
    sampler's own log-prob of each sampled token (``Batch.rollout_logprobs`` [B, T], 0 on
    padding), from the scores ``generate`` sampled from (after temperature, top-k, top-p)."""
    device = next(model.parameters()).device
    pids, pmask = encode_prompts(tokenizer, prompts, device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    from transformers import GenerationConfig, LogitsProcessorList

    # A fresh GenerationConfig so a checkpoint's defaults (top_k=50, repetition penalty, ...)
    # cannot change the sampling distribution behind the log-probs we train on. Sampling
    # applies our own warpers (temperature, top-k, top-p, in transformers' order): generate
    # puts a caller's processors before its own warpers, and the recorder of the sampler's
    # log-probs must come after them.
    sampling = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    )
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
        **sampling,
    )
    processors = [] if greedy else warpers(temperature, top_k, top_p)
    record = SampledLogprobs() if with_logprobs and not greedy else None
    if record is not None:
        processors.append(record)
    # synced_gpus=False: under FSDP2 the caller gathers the parameters first (parallel.gathered),
    # so each process generates on its own; transformers would otherwise keep every process
    # stepping until all have finished, which deadlocks when only rank 0 evaluates.
    out = model.generate(
        input_ids=pids,
        attention_mask=pmask,
        generation_config=gen,
        synced_gpus=False,
        logits_processor=LogitsProcessorList(processors),
    )
    resp = out[:, pids.shape[1] :]
    sampled = record.finish(resp) if record is not None else None
    if resp.shape[1] < max_new_tokens:  # generate stops early once every row has ended
        width = max_new_tokens - resp.shape[1]
        resp = torch.cat([resp, resp.new_full((resp.shape[0], width), pad)], dim=1)
        if sampled is not None:
            sampled = torch.cat([sampled, sampled.new_zeros(sampled.shape[0], width)], dim=1)
    resp, mask, has_eos = truncate_at_eos(resp, eos, pad)
    ids, am = join(pids, pmask, resp, mask)
    texts = tokenizer.batch_decode(resp.masked_fill(resp == eos, pad), skip_special_tokens=True)
    if group_index is None:
        group_index = torch.arange(len(prompts))
    b = Batch(ids, am, mask, pids.shape[1], list(prompts), texts, has_eos, group_index.to(device))
    if sampled is not None:
        # where, not a product: a pad drawn after EOS can have log-prob -inf under top-k
        b.rollout_logprobs = torch.where(mask, sampled, 0.0)
    return b


def warpers(temperature: float, top_k: int, top_p: float) -> list:
    """transformers' sampling warpers for these settings, in ``generate``'s order."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        out.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p))
    return out


class SampledLogprobs:
    """A logits processor, last in ``generate``'s list, that keeps the log-prob the sampler gave
    each token it drew: at step t it sees the final scores of step t (after temperature, top-k,
    top-p) and, in ``input_ids``, the token drawn at step t - 1. One ``[B, V]`` buffer at a
    time, never the ``[B, T, V]`` of ``output_scores``."""

    def __init__(self):
        self.prev: torch.Tensor | None = None
        self.picked: list = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.picked.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, resp: torch.Tensor) -> torch.Tensor:
        """[B, n] log-probs of the n generated tokens ``resp`` [B, n]."""
        if self.prev is not None:
            self.picked.append(self.prev.gather(1, resp[:, len(self.picked)][:, None]).squeeze(1))
        self.prev = None
        return torch.stack(self.picked, dim=1)


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
