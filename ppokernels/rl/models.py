"""Model wrappers: policy scoring straight from hidden states, a critic with a zero-initialised
scalar head, tiny built-in models and a character-level tokenizer built in code.

Alignment (docs/semantics.md): the sequence is ``[left-padded prompt (P) | response (T)]``;
the hidden state at position ``P - 1 + t`` predicts response token ``t``. Only those ``T``
positions are used, and of them only the tokens under the response mask are scored, so the
vocabulary projection touches ``N = mask.sum()`` rows and never ``[N, V]`` logits on the fused
path (:func:`ppokernels.linear_logprobs` streams over the vocabulary).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

import ppokernels

BUILTIN_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")


# ---------------------------------------------------------------------------------- tokenizer
def char_tokenizer(chars: str):
    """A character-level ``PreTrainedTokenizerFast`` built with the ``tokenizers`` library:
    ids 0, 1, 2 are ``<pad>``, ``<eos>``, ``<unk>`` (pad distinct from EOS, docs/semantics.md)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


# ---------------------------------------------------------------------------------- models
def tiny_config(
    family: str,
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 128,
    pad_id: int = 0,
    eos_id: int = 1,
):
    """A transformers config for a tiny model of ``family`` (llama, qwen2, gpt2), dropout off."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id
    )
    llama_like = dict(  # the decoder shape both Llama and Qwen2 configs take
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        **common,
    )
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=heads, tie_word_embeddings=False, **llama_like)
    if family == "qwen2":  # grouped-query attention and tied embeddings, as Qwen2 models have
        kv_heads = max(1, heads // 2)
        return tf.Qwen2Config(num_key_value_heads=kv_heads, tie_word_embeddings=True, **llama_like)
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    raise ValueError(f"unknown tiny model family {family!r} (llama, qwen2, gpt2)")


def load_policy(name: str, tokenizer, *, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A causal LM: ``tiny-<family>`` builds a fresh tiny model for ``tokenizer``'s vocabulary,
    anything else goes to ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM

    if name in BUILTIN_MODELS:
        torch.manual_seed(seed)
        cfg = tiny_config(
            name.split("-", 1)[1],
            len(tokenizer),
            hidden=hidden,
            layers=layers,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = from_pretrained(AutoModelForCausalLM, name, dtype=torch.float32)
    disable_dropout(model)
    return model


def load_tokenizer(model: str, task_tokenizer, task_name: str):
    """The task's tokenizer for the built-in ``tiny-*`` models, else ``AutoTokenizer`` from the
    model's folder (pad = EOS when it has no pad token: truncation uses the first EOS)."""
    if model in BUILTIN_MODELS:
        if task_tokenizer is None:
            raise ValueError(
                f"task {task_name!r} has no tokenizer for built-in models; "
                "give --model a Hugging Face model"
            )
        return task_tokenizer()
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class ModelLoadError(OSError):
    """A model or tokenizer that cannot be loaded (one line: the path and the reason)."""


def looks_local(name: str) -> bool:
    """A filesystem path rather than a Hub id ("org/name"): absolute, relative with ./ or ../,
    under ~, or with more than one separator."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1


def from_pretrained(cls, name: str, **kw):
    """``cls.from_pretrained(name)`` with a one-line error: a missing local folder says so
    (instead of transformers' "Repo id must be in the form ..." traceback)."""
    path = os.path.expanduser(name)
    if looks_local(name) and not os.path.exists(path):
        raise ModelLoadError(f"model path {name} does not exist")
    try:
        return cls.from_pretrained(path if os.path.exists(path) else name, **kw)
    except Exception as e:
        first = next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise ModelLoadError(f"cannot load {cls.__name__} from {name}: {first}") from None


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (docs/semantics.md): PPO's first ratio must be exactly 1."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # Llama/Qwen2 attention
            m.attention_dropout = 0.0  # (read in training mode, i.e. under checkpointing)
    model.eval()


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model`` for Llama/Qwen2, ``model.transformer``
    for GPT-2), found through the ``base_model_prefix`` every HF model declares."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder backbone")
    return base


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (docs/semantics.md: cumsum(mask) - 1)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class DecoderOptions:
    """What :mod:`ppokernels.rl.parallel` sets on a scorer or critic: ``autocast_dtype``
    (bf16 autocast of the decoder, None: off) and ``checkpointing`` (recompute activations)."""

    autocast_dtype: torch.dtype | None = None
    checkpointing: bool = False

    def response_hidden(self, body: nn.Module, input_ids, attention_mask, prompt_len: int):
        """[B, T, H] hidden states whose next-token predictions are the T response tokens."""
        seq = input_ids[:, :-1]  # the last token predicts nothing we score
        am = attention_mask[:, :-1]
        with self._compute(body, input_ids.device.type):
            out = body(
                input_ids=seq, attention_mask=am, position_ids=position_ids(am), use_cache=False
            )
        return out.last_hidden_state[:, prompt_len - 1 :]

    @contextlib.contextmanager
    def _compute(self, body: nn.Module, device_type: str):
        # Hugging Face checkpoints a layer only in training mode; dropout is off everywhere
        # (disable_dropout), so training mode changes nothing else. Generation stays in eval
        # mode and keeps its KV cache.
        train = self.checkpointing and torch.is_grad_enabled()
        if train:
            body.train()
        dtype = self.autocast_dtype
        try:
            with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
                yield
        finally:
            if train:
                body.eval()


class PolicyScorer(DecoderOptions, nn.Module):
    """The policy's response tokens, read from hidden states: per-token log-probs (and
    entropy), or whatever a ``head`` function makes of the hidden states and the lm_head.

    ``head=None``: log-probs and entropy [B, T], from ``ppokernels.linear_logprobs`` on the
    masked tokens' hidden states (``naive=True``: full logits, ``log_softmax`` and a gather, for
    comparison). Both divide logits by ``temperature``. ``head(hidden [B, T, H], weight [V, H],
    bias [V] or None, labels [B, T])``: its result is returned; the training step passes the
    policy loss here (:mod:`ppokernels.rl.algorithm`), so that under FSDP2 the loss runs inside
    this module's forward, where the lm_head weight is the gathered plain tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        naive: bool = False,
    ):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.naive = naive

    def forward(
        self, input_ids, attention_mask, mask, prompt_len: int, head=None, with_entropy=True
    ):
        """input_ids/attention_mask [B, P + T], mask [B, T] (bool) -> ``head``'s result, or
        logprobs, entropy [B, T] (float32, 0 where ``mask`` is False)."""
        h = self.response_hidden(backbone(self.model), input_ids, attention_mask, prompt_len)
        labels = input_ids[:, prompt_len:]
        out_head = self.model.get_output_embeddings()
        # bf16 autocast leaves the head's parameters fp32: cast them (differentiably) so that
        # the head runs in the decoder's dtype, as autocast's own linear would.
        weight = out_head.weight.to(h.dtype)
        bias = getattr(out_head, "bias", None)
        bias = bias.to(h.dtype) if bias is not None else None
        if head is not None:
            return head(h, weight, bias, labels)
        lp, ent = self.logprobs(h[mask], weight, bias, labels[mask], with_entropy)
        return unpack(lp, mask), (unpack(ent, mask) if ent is not None else None)

    def logprobs(self, hidden, weight, bias, labels, with_entropy: bool) -> tuple:
        """[N, H] hidden states of the tokens ``labels`` [N] -> log-probs, entropy [N] (only
        these N rows reach the vocabulary projection)."""
        if not self.naive:
            return ppokernels.linear_logprobs(
                hidden,
                weight,
                labels,
                bias=bias,
                temperature=self.temperature,
                with_entropy=with_entropy,
                chunk_size=self.chunk_size,
            )
        return full_logits_logprobs(hidden, weight, bias, labels, self.temperature, with_entropy)


def full_logits_logprobs(hidden, weight, bias, labels, temperature: float, with_entropy: bool):
    """The naive head, for comparison: ``[N, V]`` fp32 logits ``(hidden W^T + b) / T``,
    ``log_softmax``, the labels' log-probs [N] and the entropy [N] of the full softmax."""
    logits = nn.functional.linear(hidden, weight, bias).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return lp, (-(logp.exp() * logp).sum(-1) if with_entropy else None)


def unpack(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] values of the masked tokens -> [B, T] with zeros elsewhere (differentiable)."""
    return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)


class Critic(DecoderOptions, nn.Module):
    """Value model: a causal-LM backbone plus a zero-initialised scalar head (docs/semantics.md), so
    the first value estimates are exactly 0. Built from a copy of the policy by default."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.body = copy.deepcopy(backbone(lm))
        self.body.requires_grad_(True)
        hidden = lm.get_output_embeddings().weight.shape[1]
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        disable_dropout(self)

    def forward(self, input_ids, attention_mask, mask, prompt_len: int):
        """-> values [B, T] float32 for the response positions, 0 where ``mask`` is False."""
        h = self.response_hidden(self.body, input_ids, attention_mask, prompt_len)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float() * mask
