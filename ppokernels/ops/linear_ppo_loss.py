"""linear_ppo_policy_loss: the lm_head, the log-probs and the PPO policy loss in one chunked pass
that computes the gradients during the forward, so the head costs three GEMMs, not four.

``linear_logprobs`` followed by ``ppo_policy_loss`` runs four GEMMs (logits in the forward; the
logits again, grad_hidden and grad_weight in the backward) because when the log-probs are made the
loss is not known yet. Here it is: for each chunk of tokens

    z = h_c W^T + b                          GEMM 1, an fp32 [R, V] buffer (R = chunk rows)
    lp, ent = token_logprobs(z)              one fused pass per row (CPU C++, CUDA C++, Triton)
    loss_c = ppo_policy_loss(lp, ...)        the chunk's exact share of the global loss
    dz = d loss_c / d z                      the fused backward ops, dz written over z
    grad_h[c] = dz W                         GEMM 2
    grad_W += dz^T h_c,  grad_b += sum dz    GEMM 3

and the backward only scales the stored gradients by the upstream scalar (or, for the usual
upstream 1, hands them over without a copy). The op is ``ppokernels::linear_ppo_policy_loss``: its
implementation (ppokernels/ops/_linear_ppo_head.py) calls the registered kernels of
token_logprobs, ppo_policy_loss and linear_logprobs of the chosen backend (CPU C++; CUDA C++ or
Triton on GPUs), so it runs wherever they do. A chunk's share
is exact because every aggregation is a sum of per-row terms with global normalisers: chunks are
whole rows of the ``[B, T]`` batch, scored with ``num_tokens`` = the global token count and
``num_seqs`` = B (or the caller's values). A row with more valid tokens than a chunk holds is cut
into segments, each scored with ``agg="token-sum"`` times that row's aggregation weight (1 /
num_tokens, 1 / num_seqs, 1 / (n_row num_seqs), 1 / (num_seqs T)): exact for the per-token modes;
the sequence modes (gspo, geo_mean, vespo) need the whole row at once, so such a long row takes
``linear_logprobs`` + ``ppo_policy_loss`` (four GEMMs, still O(chunk) memory) instead.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype, bool_mask
from ppokernels.ops import _checks
from ppokernels.ops._linear_ppo_head import ROW_ALIGN, SEQUENCE_MODES, Head
from ppokernels.ops.ppo_loss import _policy_scalars, ppo_policy_loss
from ppokernels.reference import PolicyLossOutput

__all__ = ["LOSS_OPTIONS", "SEQUENCE_MODES", "default_chunk_size", "linear_ppo_policy_loss"]

NAME = "linear_ppo_policy_loss"
BUFFER_BYTES = 128 << 20  # default size of the fp32 [R, V] logits/dlogits buffer
# ppo_policy_loss's options, passed through, with its defaults
_PPO_SIGNATURE = inspect.signature(ppo_policy_loss).parameters
LOSS_OPTIONS = tuple(
    k
    for k, p in _PPO_SIGNATURE.items()
    if p.kind is p.KEYWORD_ONLY and k not in ("entropy", "backend")
)
_MODE_OPTIONS = (
    "tau_pos",
    "tau_neg",
    "ratio_cap",
    "seq_logratio_max",
    "dro_beta",
    "vespo_k",
    "vespo_lambda",
)


def default_chunk_size(vocab: int) -> int:
    """Token rows per chunk: the fp32 ``[R, V]`` buffer within 128 MiB (208 rows at V = 151936),
    a multiple of 16, at least 16. Larger R means fewer read-modify-write passes over grad_weight
    (one per chunk) and larger GEMMs; smaller R less memory."""
    return max(ROW_ALIGN, BUFFER_BYTES // (4 * max(vocab, 1)) // ROW_ALIGN * ROW_ALIGN)


def linear_ppo_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
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
        old_logprobs, advantages ([B, T] or [B]), mask: as in ppo_policy_loss (constants).
        temperature: > 0, divides the logits (forward, entropy and gradients).
        with_entropy: also compute the entropy and report its aggregate (``out.entropy``).
        chunk_size: token rows per chunk (rounded up to 16); None: :func:`default_chunk_size`.
        backend: "auto", "cpp", "triton" or "reference" (the naive head, full logits and
            autograd), for the kernels the op calls.
        **loss_options: ppo_policy_loss's options (``LOSS_OPTIONS``): loss_mode, clip_low,
            clip_high, dual_clip, agg, num_tokens, num_seqs, ref_logprobs, kl_coef,
            kl_estimator, entropy_coef, is_weights, ...; ``ref_logprobs`` and ``is_weights`` are
            [B, T] (or [B]) constants.

    Returns:
        PolicyLossOutput as ppo_policy_loss's (``loss`` differentiable w.r.t. hidden, weight and
        bias; the metrics are the same masked means and aggregates over the whole batch). A
        backward with upstream gradient 1 (``loss.backward()``) receives the stored gradients
        themselves; a second backward through the same call is then an error.
    """
    _check(hidden, weight, labels, bias, loss_options)
    temperature = _checks.head_options(NAME, temperature, ignore_index, with_entropy, chunk_size)
    opts = {k: _PPO_SIGNATURE[k].default for k in LOSS_OPTIONS} | loss_options
    ref, isw = opts.pop("ref_logprobs"), opts.pop("is_weights")
    ent_on = with_entropy or opts["entropy_coef"] != 0.0
    rows = dict(old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not torch.compiler.is_compiling():  # every option checked before any GEMM, O(B T)
        _probe(rows, hidden, opts, ref, isw, ent_on, backend)
    V = weight.shape[0]
    valid = bool_mask(mask) & (labels != ignore_index)
    y = torch.where(valid, labels.long(), torch.full_like(labels, -100, dtype=torch.long))
    if not torch.compiler.is_compiling():
        out_of_range = valid & ((y < 0) | (y >= V))
        if bool(out_of_range.any()):
            bad = int(y[out_of_range][0])
            raise ValueError(f"{NAME}: labels must be in [0, {V}) or ignore_index, got {bad}")
    b = _backend.choose("ppo_policy_loss", hidden.device, backend)
    if b == "reference":
        return _naive(hidden, weight, y, bias, valid, rows, ref, isw, temperature, ent_on, opts)
    level = opts.pop("ratio_level")
    if level == "sequence":  # the former spelling of loss_mode="gspo"
        opts["loss_mode"] = "gspo"
    mode_opts = {k: opts.pop(k) for k in _MODE_OPTIONS}
    scalars = _policy_scalars(
        NAME, **opts, mode_opts=mode_opts, has_ref=ref is not None, has_ent=ent_on
    )
    backends = ",".join(
        _backend.choose(op, hidden.device, backend)
        for op in ("token_logprobs", "ppo_policy_loss", "linear_logprobs")
    )
    R = default_chunk_size(V) if chunk_size is None else chunk_size
    R = -(-R // ROW_ALIGN) * ROW_ALIGN
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    acc = acc_dtype(hidden)
    old, ref = old_logprobs.to(acc), None if ref is None else ref.to(acc)
    loss, m, *_ = torch.ops.ppokernels.linear_ppo_policy_loss(
        hidden,
        weight,
        y,
        old,
        advantages,
        valid,
        bias,
        ref,
        isw,
        temperature,
        ent_on,
        R,
        backends,
        *scalars.values(),
        need,
    )
    return PolicyLossOutput(
        loss, m[0], m[1], m[2], m[3] if ref is not None else None, m[4] if ent_on else None
    )


def _check(hidden, weight, labels, bias, loss_options) -> None:
    _checks.tensor(NAME, "hidden", hidden, ndim=3)
    _checks.tensor(NAME, "weight", weight, ndim=2)
    _checks.labels(NAME, "labels", labels)
    _checks.not_meta(NAME, "hidden", hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{NAME}: weight has H = {weight.shape[1]} but hidden has H = "
            f"{hidden.shape[-1]} (weight must be [V, H])"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{NAME}: labels has shape {tuple(labels.shape)}, expected "
            f"hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
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


def _probe(rows, hidden, opts, ref, isw, ent_on, backend) -> None:
    """Checks the row tensors and every loss option with one ppo_policy_loss call on the real
    tensors' shapes under no_grad (O(B T), no GEMM), so bad input fails before the head runs."""
    like = hidden.new_zeros(hidden.shape[:2], dtype=acc_dtype(hidden))
    try:
        with torch.no_grad():
            ppo_policy_loss(
                like,
                **rows,
                **opts,
                ref_logprobs=ref,
                is_weights=isw,
                entropy=like if ent_on else None,
                backend=backend,
            )
    except (ValueError, TypeError) as e:
        raise type(e)(f"{NAME}: {e}") from None


def _naive(hidden, weight, y, bias, valid, rows, ref, isw, temperature, ent_on, opts):
    """backend="reference": full logits, log_softmax and the reference loss, by autograd."""
    z = hidden @ weight.T + (bias if bias is not None else 0.0)
    logp = torch.log_softmax(z.to(acc_dtype(hidden)) / temperature, -1)
    lp = torch.where(valid, logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0) if ent_on else None
    rows = rows | dict(mask=valid)
    return reference.ppo_policy_loss(
        lp, **rows, ref_logprobs=ref, is_weights=isw, entropy=ent, **opts
    )


# ------------------------------------------------------------------------------ the op
# Below autograd: Head calls the forward and backward kernel ops itself. output_mask = which of
# (hidden, weight, bias) get a gradient; the three gradients are outputs (empty when not needed),
# kept by setup_context for the backward, which scales them by the upstream gradient.
@torch.library.custom_op("ppokernels::linear_ppo_policy_loss", mutates_args=())
def _op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    bias: Tensor | None,
    ref_logprobs: Tensor | None,
    is_weights: Tensor | None,
    temperature: float,
    with_entropy: bool,
    chunk_size: int,
    backends: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    logratio_clamp: float | None,
    ratio_level: str,
    agg: str,
    num_tokens: float | None,
    num_seqs: float | None,
    kl_coef: float,
    kl_estimator: str,
    kl_clamp: float | None,
    entropy_coef: float,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows = dict(
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
        is_weights=is_weights,
    )
    scalars = (
        clip_low,
        clip_high,
        dual_clip,
        logratio_clamp,
        ratio_level,
        agg,
        num_tokens,
        num_seqs,
        kl_coef,
        kl_estimator,
        kl_clamp,
        entropy_coef,
    )
    head = Head(
        hidden,
        weight,
        labels,
        bias,
        rows,
        temperature,
        with_entropy,
        chunk_size,
        backends,
        scalars,
        output_mask,
    )
    return head.run()


@_op.register_fake
def _fake(hidden, weight, labels, old, adv, mask, bias, ref, isw, *args):
    acc, need = acc_dtype(hidden), args[-1]
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(5, dtype=acc),
        torch.empty_like(hidden) if need[0] else hidden.new_empty(0, dtype=acc),
        torch.empty_like(weight) if need[1] else hidden.new_empty(0, dtype=acc),
        torch.empty_like(bias) if bias is not None and need[2] else hidden.new_empty(0, dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    ctx.need = inputs[-1]
    ctx.grads = list(output[2:])
    ctx.mark_non_differentiable(*output[1:])
    # no zero upstream gradients for the non-differentiable outputs: one of them is [V, H]
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, *_):
    if g_loss is None:  # the loss itself was not differentiated
        return (None,) * 26
    if ctx.grads is None:
        raise RuntimeError(
            f"{NAME}: the gradients made in the forward were handed to an earlier backward "
            "(upstream gradient 1); run the op again to backward again"
        )
    # the usual upstream 1 (loss.backward()): hand over the stored gradients themselves, no
    # [V, H] copy (the check costs one host sync on CUDA, as Liger's); other values scale a copy
    # (a traced backward, whose tensors are fake or functional subclasses, always scales)
    traced = torch.compiler.is_compiling() or type(g_loss) is not torch.Tensor
    if not traced and bool(torch.equal(g_loss, torch.ones_like(g_loss))):
        grads, ctx.grads = ctx.grads, None
    else:
        grads = [g * g_loss.to(g.dtype) for g in ctx.grads]
    out = [None] * 26
    for i, slot in enumerate((0, 1, 6)):
        out[slot] = grads[i] if ctx.need[i] and ctx.needs_input_grad[slot] else None
    return tuple(out)


_op.register_autograd(_backward, setup_context=_setup_context)
