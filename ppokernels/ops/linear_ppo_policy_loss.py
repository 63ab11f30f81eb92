"""linear_ppo_policy_loss: the lm_head, the log-probs and the PPO policy loss in one chunked pass
that computes the gradients during the forward, so the head costs three GEMMs, not four.

``linear_logprobs`` followed by ``ppo_policy_loss`` runs four GEMMs (logits in the forward; the
logits again, grad_hidden and grad_weight in the backward) wherever the logits do not fit
linear_logprobs' cache budget, or keeps up to ``cache_bytes`` of logits alive between the two
passes, because when the log-probs are made the loss is not known yet. Here it is: for each
chunk of tokens

    z = h_c W^T + b                          GEMM 1, an fp32 [R, V] buffer (R = chunk rows)
    lp, ent = token_logprobs(z)              one fused pass per row (CPU C++, CUDA C++, Triton)
    loss_c = ppo_policy_loss(lp, ...)        the chunk's exact share of the global loss
    dz = d loss_c / d z                      the fused backward ops, dz written over z
    grad_h[c] = dz W                         GEMM 2
    grad_W += dz^T h_c,  grad_b += sum dz    GEMM 3

and the backward only scales the stored gradients by the upstream scalar (or, for the usual
upstream 1, hands them over without a copy; a later backward of a retained graph runs the head
again). The op is ``ppokernels::linear_ppo_policy_loss`` (schema in csrc/ops.cpp): its
implementation (ppokernels/ops/_linear_ppo_policy_loss_head.py) calls the registered kernels of
token_logprobs, ppo_policy_loss and linear_logprobs of the chosen backend (CPU C++; CUDA C++ or
Triton on GPUs), so it runs wherever they do. A chunk's share
is exact because every aggregation is a sum of per-row terms with global normalisers: chunks are
whole rows of the ``[B, T]`` batch, scored with ``num_tokens`` = the global token count and
``num_seqs`` = B (or the caller's values). A row with more valid tokens than a chunk holds is cut
into segments, each scored with ``agg="token-sum"`` times that row's aggregation weight (1 /
num_tokens, 1 / num_seqs, 1 / (n_row num_seqs), 1 / (num_seqs T)): exact for the per-token modes;
the sequence modes (gspo, geo_mean, vespo) need the whole row at once, so such a long row takes
``linear_logprobs`` + ``ppo_policy_loss`` (its logits cache, then four GEMMs) instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype, bool_mask
from ppokernels.losses import Clip, LossSpec
from ppokernels.ops import _checks
from ppokernels.ops._linear_ppo_policy_loss_head import ROW_ALIGN, Head
from ppokernels.ops.ppo_policy_loss import policy_options, ppo_policy_loss
from ppokernels.reference import PolicyLossOutput

__all__ = ["default_chunk_size", "linear_ppo_policy_loss"]

NAME = "linear_ppo_policy_loss"
QUALNAME = "ppokernels::" + NAME
BUFFER_BYTES = 128 << 20  # default size of the fp32 [R, V] logits/dlogits buffer
# The schema of csrc/ops.cpp, defined here too when the binary is not loaded (the pure-Python
# install runs the op on the Triton kernels); tests/ops/test_linear_ppo_policy_loss.py checks
# they agree.
SCHEMA = (
    "linear_ppo_policy_loss(Tensor hidden, Tensor weight, Tensor labels, Tensor old_logprobs, "
    "Tensor advantages, Tensor mask, Tensor? bias, Tensor? ref_logprobs, Tensor? is_weights, "
    "float temperature, bool with_entropy, int chunk_size, str token_backend, str loss_backend, "
    "str linear_backend, str loss_mode, float[] loss_params, float? logratio_clamp, str agg, "
    "float? num_tokens, float? num_seqs, float kl_coef, str kl_estimator, float? kl_clamp, "
    "float entropy_coef, bool[3] output_mask) -> (Tensor loss, Tensor metrics, "
    "Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
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
    loss: LossSpec | str = Clip(),
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    logratio_clamp: float | None = 20.0,
    is_weights: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float | None = None,
    entropy_coef: float = 0.0,
    backend: str = "auto",
) -> PolicyLossOutput:
    """``ppo_policy_loss(linear_logprobs(hidden, weight, labels), old_logprobs, advantages, mask,
    loss=loss, ...)`` with the gradients of hidden, weight and bias made during the forward:
    three GEMMs per token and an fp32 ``[chunk_size, V]`` buffer, never ``[N, V]``.

    ``z = (hidden @ weight.T + bias) / temperature``, ``lp = log_softmax(z)[label]``, ``entropy
    = -sum p log p``; the loss is :func:`ppokernels.ppo_policy_loss` of ``lp`` with every loss
    spec, aggregation, KL and entropy term (``entropy=`` the head's own entropy when
    ``with_entropy`` or ``entropy_coef != 0``). Specification:
    :func:`ppokernels.reference.linear_ppo_policy_loss`.

    Args:
        hidden: [B, T, H] float32/bfloat16/float16 (float64 for gradcheck).
        weight: [V, H] lm_head weight, dtype of hidden. bias: optional [V].
        labels: [B, T] int64/int32 in [0, V) where valid. A token is valid where ``mask`` is set
            and the label is not ``ignore_index``; other tokens cost nothing and get no gradient.
        old_logprobs, advantages ([B, T] or [B]), mask: as in ppo_policy_loss (constants).
        loss, agg, num_tokens, num_seqs, logratio_clamp, is_weights, ref_logprobs, kl_coef,
            kl_estimator, kl_clamp, entropy_coef: as in :func:`ppokernels.ppo_policy_loss`
            (``ref_logprobs`` and ``is_weights`` are [B, T] or [B] constants).
        temperature: > 0, divides the logits (forward, entropy and gradients).
        with_entropy: also compute the entropy and report its aggregate (``out.entropy``).
        chunk_size: token rows per chunk (rounded up to 16); None: :func:`default_chunk_size`.
        backend: "auto", "cpp" or "triton" for the kernels the op calls, or "reference" (the
            naive head: full logits and autograd).

    Returns:
        PolicyLossOutput as ppo_policy_loss's (``loss`` differentiable w.r.t. hidden, weight and
        bias; the metrics are the same masked means and aggregates over the whole batch). The
        first backward with upstream gradient 1 (``loss.backward()``) receives the gradients made
        in the forward themselves; a later backward of the same graph
        (``retain_graph=True``) runs the head again for its gradients.
    """
    _check(hidden, weight, labels, bias)
    temperature = _checks.head_options(NAME, temperature, ignore_index, with_entropy, chunk_size)
    ent_on = with_entropy or entropy_coef != 0.0
    spec, options = policy_options(
        NAME,
        loss=loss,
        agg=agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        logratio_clamp=logratio_clamp,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=kl_clamp,
        entropy_coef=entropy_coef,
        has_ref=ref_logprobs is not None,
        has_entropy=ent_on,
    )
    rows = dict(
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
        is_weights=is_weights,
    )
    if not torch.compiler.is_compiling():  # the row tensors checked before any GEMM, O(B T)
        _probe(rows, hidden, spec, options, ent_on, backend)
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
        return reference.linear_ppo_policy_loss(
            hidden,
            weight,
            labels,
            old_logprobs,
            advantages,
            mask,
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            with_entropy=ent_on,
            ref_logprobs=ref_logprobs,
            is_weights=is_weights,
            **options.reference_kwargs(spec),
        )
    kernels = [
        _backend.choose(op, hidden.device, backend)
        for op in ("token_logprobs", "ppo_policy_loss", "linear_logprobs")
    ]
    R = default_chunk_size(V) if chunk_size is None else chunk_size
    R = -(-R // ROW_ALIGN) * ROW_ALIGN
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    acc = acc_dtype(hidden)
    old, ref = old_logprobs.to(acc), None if ref_logprobs is None else ref_logprobs.to(acc)
    loss_, m, *_ = torch.ops.ppokernels.linear_ppo_policy_loss(
        hidden,
        weight,
        y,
        old,
        advantages,
        valid,
        bias,
        ref,
        is_weights,
        temperature,
        ent_on,
        R,
        *kernels,
        *options,
        need,
    )
    return PolicyLossOutput(
        loss_, m[0], m[1], m[2], m[3] if ref is not None else None, m[4] if ent_on else None
    )


def _check(hidden, weight, labels, bias) -> None:
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
    if hidden.shape[-1] == 0:
        raise ValueError(f"{NAME}: hidden has H = 0 features")


def _probe(rows, hidden, spec, options, ent_on, backend) -> None:
    """Checks the row tensors with one ppo_policy_loss call on the real tensors' shapes under
    no_grad (O(B T), no GEMM), so bad input fails before the head runs."""
    like = hidden.new_zeros(hidden.shape[:2], dtype=acc_dtype(hidden))
    try:
        with torch.no_grad():
            ppo_policy_loss(
                like,
                **rows,
                entropy=like if ent_on else None,
                backend=backend,
                **options.reference_kwargs(spec),
            )
    except (ValueError, TypeError) as e:
        raise type(e)(f"{NAME}: {e}") from None


# ------------------------------------------------------------------------------ the op
# Below autograd: Head calls the forward and backward kernel ops itself. output_mask = which of
# (hidden, weight, bias) get a gradient; the three gradients are outputs (empty when not needed),
# kept by setup_context for the backward, which scales them by the upstream gradient.
def _impl(hidden, weight, labels, old_logprobs, advantages, mask, bias, ref_logprobs, *args):
    rows = dict(
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
        is_weights=args[0],
    )
    temperature, with_entropy, chunk_size = args[1:4]
    kernels, options, output_mask = args[4:7], args[7:-1], args[-1]
    return Head(
        hidden,
        weight,
        labels,
        bias,
        rows,
        temperature,
        with_entropy,
        chunk_size,
        kernels,
        options,
        output_mask,
    ).run()


def _fake(hidden, weight, labels, old, adv, mask, bias, *args):
    acc, need = acc_dtype(hidden), args[-1]
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(5, dtype=acc),
        torch.empty_like(hidden) if need[0] else hidden.new_empty(0, dtype=acc),
        torch.empty_like(weight) if need[1] else hidden.new_empty(0, dtype=acc),
        torch.empty_like(bias) if bias is not None and need[2] else hidden.new_empty(0, dtype=acc),
    )


# inputs by position: the differentiable tensors hidden (0), weight (1) and bias (6)
_DIFFERENTIABLE = (0, 1, 6)


def _setup_context(ctx, inputs, output):
    ctx.need = inputs[-1]
    ctx.grads = list(output[2:])
    ctx.mark_non_differentiable(*output[1:])
    # no zero upstream gradients for the non-differentiable outputs: one of them is [V, H]
    ctx.set_materialize_grads(False)
    # the inputs, for a second backward of the same graph (retain_graph=True): the first one may
    # take the stored gradients, a later one runs the head again. Saved tensors are references
    # (no copy); without retain_graph autograd frees them after the first backward.
    tensors = [t if isinstance(t, torch.Tensor) else None for t in inputs]
    ctx.save_for_backward(*tensors)
    ctx.scalars = [None if isinstance(t, torch.Tensor) else t for t in inputs]


def _backward(ctx, g_loss, *_):
    n = len(ctx.scalars)
    if g_loss is None:  # the loss itself was not differentiated
        return (None,) * n
    if ctx.grads is None:  # an earlier backward took them: run the head again
        inputs = [
            s if t is None else t for s, t in zip(ctx.scalars, ctx.saved_tensors, strict=True)
        ]
        ctx.grads = list(_impl(*inputs)[2:])
    # the usual upstream 1 (loss.backward()): hand over the stored gradients themselves, no
    # [V, H] copy (the check costs one host sync on CUDA, as Liger's); other values scale a copy
    # (a traced backward, whose tensors are fake or functional subclasses, always scales)
    traced = torch.compiler.is_compiling() or type(g_loss) is not torch.Tensor
    if not traced and bool(torch.equal(g_loss, torch.ones_like(g_loss))):
        grads, ctx.grads = ctx.grads, None
    else:
        grads = [g * g_loss.to(g.dtype) for g in ctx.grads]
    out = [None] * n
    for i, slot in enumerate(_DIFFERENTIABLE):
        out[slot] = grads[i] if ctx.need[i] and ctx.needs_input_grad[slot] else None
    return tuple(out)


def _register() -> None:
    if _backend._C is None:  # the pure-Python install: no binary to hold the schema
        torch.library.define(QUALNAME, SCHEMA[len(NAME) :])
    torch.library.register_kernel(QUALNAME, ("cpu", "cuda"), _impl)
    torch.library.register_fake(QUALNAME, _fake)
    torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context)


_register()
