"""linear_ppo_policy_loss: the lm_head, the log-probs and the PPO policy loss in one chunked pass
that computes the gradients during the forward, so the head costs three GEMMs, not four.

``linear_logprobs`` followed by ``ppo_policy_loss`` runs four GEMMs (logits in the forward; the
logits again, grad_hidden and grad_weight in the backward) because when the log-probs are made the
loss is not known yet. Here it is: for each chunk of tokens

    z = h_c W^T + b                          GEMM 1, an fp32 [R, V] buffer (R = chunk rows)
    lp, ent = token_logprobs(z)              one fused pass per row (CPU C++, CUDA C++, Triton)
    loss_c = ppo_policy_loss(lp, ...)        the chunk's exact share of the global loss
    dz = d loss_c / d z                      the fused backwards, dz written into z's buffer
    grad_h[c] = dz W                         GEMM 2
    grad_W += dz^T h_c,  grad_b += sum dz    GEMM 3

and the autograd backward only scales the stored gradients by the upstream scalar. A chunk's share
is exact because every aggregation is a sum of per-row terms with global normalisers: chunks are
whole rows of the ``[B, T]`` batch, scored with ``num_tokens`` = the global token count and
``num_seqs`` = B (or the caller's values). A row with more valid tokens than a chunk holds is cut
into segments, each scored with ``agg="token-sum"`` times that row's aggregation weight (1 /
num_tokens, 1 / num_seqs, 1 / (n_row num_seqs), 1 / (num_seqs T)): exact for the per-token modes;
the sequence modes (gspo, geo_mean, vespo) need the whole row at once, so such a long row takes
``linear_logprobs`` + ``ppo_policy_loss`` (four GEMMs, still O(chunk) memory) instead.
"""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype, bool_mask
from ppokernels.ops import _checks
from ppokernels.ops._linear_ppo_head import ROW_ALIGN, _FusedHead
from ppokernels.ops.ppo_loss import ppo_policy_loss
from ppokernels.reference import PolicyLossOutput

NAME = "linear_ppo_policy_loss"
SEQUENCE_MODES = ("gspo", "geo_mean", "vespo")  # a token's gradient depends on its whole row
BUFFER_BYTES = 128 << 20  # default size of the fp32 [R, V] logits/dlogits buffer
# ppo_policy_loss options passed through (the rest of its signature is set here per chunk)
LOSS_OPTIONS = (
    "loss_mode", "clip_low", "clip_high", "dual_clip", "logratio_clamp", "ratio_level", "agg",
    "num_tokens", "num_seqs", "ref_logprobs", "kl_coef", "kl_estimator", "kl_clamp",
    "entropy_coef", "is_weights", "tau_pos", "tau_neg", "ratio_cap", "seq_logratio_max",
    "dro_beta", "vespo_k", "vespo_lambda",
)  # fmt: skip
_ROW_TENSORS = ("old_logprobs", "advantages", "mask", "ref_logprobs", "is_weights")


def default_chunk_size(vocab: int) -> int:
    """Token rows per chunk: the fp32 ``[R, V]`` buffer within 128 MiB (208 rows at V = 151936),
    a multiple of 16, at least 16. Larger R means fewer read-modify-write passes over grad_weight
    (one per chunk), smaller R less memory."""
    return max(ROW_ALIGN, BUFFER_BYTES // (4 * max(vocab, 1)) // ROW_ALIGN * ROW_ALIGN)


def linear_ppo_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    **loss_options,
) -> PolicyLossOutput:
    """``ppo_policy_loss(linear_logprobs(hidden, weight, labels), old_logprobs, advantages, mask,
    **loss_options)`` with the gradients of hidden, weight and bias made during the forward: three
    GEMMs per token and an fp32 ``[chunk_size, V]`` buffer, never ``[N, V]``.

    ``z = (hidden @ weight.T + bias) / temperature``, ``lp = log_softmax(z)[label]``, ``entropy
    = -sum p log p``; the loss is :func:`ppokernels.ppo_policy_loss` of ``lp`` (every
    ``loss_mode``, aggregation, KL and entropy term, with ``entropy=`` the head's own entropy when
    ``with_entropy`` or ``entropy_coef != 0``).

    Args:
        hidden: [B, T, H] float32/bfloat16/float16 (float64 for gradcheck).
        weight: [V, H] lm_head weight, dtype of hidden. bias: optional [V].
        labels: [B, T] int64/int32 in [0, V) where valid. A token is valid where ``mask`` is set
            and the label is not ``ignore_index``; other tokens cost nothing and get no gradient.
        old_logprobs, advantages ([B, T] or [B]), mask: as in ppo_policy_loss.
        temperature: > 0, divides the logits (forward, entropy and gradients).
        with_entropy: also compute the entropy and report its aggregate (``out.entropy``).
        chunk_size: token rows per chunk (rounded up to 16); None: :func:`default_chunk_size`.
        backend: "auto", "cpp", "triton" or "reference", for token_logprobs and ppo_policy_loss.
        **loss_options: ppo_policy_loss's options (``LOSS_OPTIONS``): loss_mode, clip_low,
            clip_high, dual_clip, agg, num_tokens, num_seqs, ref_logprobs, kl_coef,
            kl_estimator, entropy_coef, is_weights, ...; ``ref_logprobs`` and ``is_weights`` are
            [B, T] (or [B]) constants.

    Returns:
        PolicyLossOutput as ppo_policy_loss's (``loss`` differentiable w.r.t. hidden, weight and
        bias; the metrics are the same masked means and aggregates over the whole batch).
    """
    _check(hidden, weight, labels, bias, loss_options)
    temperature = _checks.positive(NAME, "temperature", temperature)
    _checks.integer(NAME, "ignore_index", ignore_index)
    _checks.flag(NAME, "with_entropy", with_entropy)
    if chunk_size is not None:
        _checks.integer(NAME, "chunk_size", chunk_size)
        if chunk_size <= 0:
            raise ValueError(f"{NAME}: chunk_size must be a positive int or None, got {chunk_size}")
    B, T, H = hidden.shape
    rows = dict(old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    for k in ("ref_logprobs", "is_weights"):
        if k in loss_options:
            rows[k] = loss_options.pop(k)
    ent_on = with_entropy or loss_options.get("entropy_coef", 0.0) != 0.0
    _probe(rows, hidden, loss_options, ent_on, backend)  # every option checked before any GEMM
    valid = bool_mask(rows["mask"]) & (labels != ignore_index)
    y = torch.where(valid, labels.long(), torch.full_like(labels, ignore_index, dtype=torch.long))
    V = weight.shape[0]
    out_of_range = valid & ((y < 0) | (y >= V))
    if bool(out_of_range.any()):
        bad = int(y[out_of_range][0])
        raise ValueError(f"{NAME}: labels must be in [0, {V}) or ignore_index, got {bad}")
    rows["mask"] = valid
    R = default_chunk_size(V) if chunk_size is None else chunk_size
    R = -(-R // ROW_ALIGN) * ROW_ALIGN
    plan = _Plan(y, rows, loss_options, temperature, ent_on, R, backend, B, T)
    loss, m = _FusedHead.apply(hidden, weight, bias, plan)
    has_ref = rows.get("ref_logprobs") is not None
    return PolicyLossOutput(loss, m[0], m[1], m[2], m[3] if has_ref else None,
                            m[4] if ent_on else None)  # fmt: skip


def _check(hidden, weight, labels, bias, loss_options) -> None:
    _checks.tensor(NAME, "hidden", hidden, ndim=3)
    _checks.tensor(NAME, "weight", weight, ndim=2)
    _checks.labels(NAME, "labels", labels)
    _checks.not_meta(NAME, "hidden", hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{NAME}: weight has H = {weight.shape[1]} but hidden has H = "
                         f"{hidden.shape[-1]} (weight must be [V, H])")  # fmt: skip
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{NAME}: labels has shape {tuple(labels.shape)}, expected "
                         f"hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")  # fmt: skip
    _checks.same_dtype(NAME, "weight", weight, "hidden", hidden)
    for arg, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None:
            _checks.same_device(NAME, arg, t, hidden)
    if bias is not None:
        _checks.tensor(NAME, "bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{NAME}: bias has {bias.shape[0]} entries, weight has V = {weight.shape[0]}"
            )
    unknown = sorted(set(loss_options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"{NAME}: unknown option(s) {unknown}; the options are {LOSS_OPTIONS}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{NAME}: hidden has H = 0 features")


def _probe(rows, hidden, loss_options, ent_on, backend) -> None:
    """Checks the row tensors and every loss option with one ppo_policy_loss call on the real
    tensors' shapes under no_grad (O(B T), no GEMM), so bad input fails before the head runs."""
    like = hidden.new_zeros(hidden.shape[:2], dtype=acc_dtype(hidden))
    try:
        with torch.no_grad():
            ppo_policy_loss(like, **rows, **loss_options, entropy=like if ent_on else None,
                            backend=backend)  # fmt: skip
    except (ValueError, TypeError) as e:
        raise type(e)(f"{NAME}: {e}") from None


class _Plan:
    """What the forward needs besides the differentiable inputs: per-row tensors, options, the
    chunking. ``segments()`` yields ``(row0, row1, tok0, tok1)``: rows [row0, row1) whole when
    ``tok0 is None``, else tokens [tok0, tok1) of the valid tokens of row ``row0`` alone."""

    def __init__(self, y, rows, options, temperature, ent_on, R, backend, B, T):
        self.y, self.rows, self.options = y, rows, dict(options)
        self.temperature, self.ent_on, self.R, self.backend, self.B, self.T = (
            temperature, ent_on, R, backend, B, T,
        )  # fmt: skip
        self.counts = rows["mask"].sum(1).tolist()
        total = sum(self.counts)
        agg = self.options.get("agg", "token-mean")
        self.num_tokens = self.options.pop("num_tokens", None) or float(max(total, 1))
        self.num_seqs = self.options.pop("num_seqs", None) or float(max(B, 1))
        self.agg, self.total = agg, total
        mode = self.options.get("loss_mode", "vanilla")
        self.sequence_mode = mode in SEQUENCE_MODES or self.options.get("ratio_level") == "sequence"

    def row_weight(self, r: int) -> float:
        """The aggregation weight of every token of row r (the segment path's scale)."""
        if self.agg == "token-mean":
            return 1.0 / self.num_tokens
        if self.agg == "token-sum":
            return 1.0
        if self.agg == "seq-mean-token-mean":
            return 1.0 / (self.counts[r] * self.num_seqs)
        if self.agg == "seq-mean-token-sum":
            return 1.0 / self.num_seqs
        return 1.0 / (self.num_seqs * max(self.T, 1))  # seq-mean-token-sum-norm

    def segments(self):
        r = 0
        while r < self.B:
            if self.counts[r] > self.R:  # a long row: segments, or the unfused path
                if self.sequence_mode:
                    yield r, r + 1, 0, None  # tok1 None: the four-GEMM path for the whole row
                else:
                    for t0 in range(0, self.counts[r], self.R):
                        yield r, r + 1, t0, min(t0 + self.R, self.counts[r])
                r += 1
                continue
            r1, n = r, 0
            while r1 < self.B and self.counts[r1] <= self.R and n + self.counts[r1] <= self.R:
                n += self.counts[r1]
                r1 += 1
            yield r, r1, None, None
            r = r1

    def row_slice(self, r0: int, r1: int) -> dict:
        """The per-row tensors of rows [r0, r1) (advantages / is_weights may be [B])."""
        return {k: (None if v is None else v[r0:r1]) for k, v in self.rows.items()}
