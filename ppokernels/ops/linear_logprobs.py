"""linear_logprobs: per-token log-probs and entropy from hidden states and the lm_head weight,
never materialising the [N, V] logits (beyond the ``cache_bytes`` of logits kept for the
backward). Backends: CPU C++ (csrc/cpu/linear_logprobs.cpp), CUDA C++ (csrc/cuda/linear_logprobs.cu,
the same chunk loop: csrc/include/ppokernels/linear_logprobs_chunks.h), Triton
(ppokernels/triton/linear_logprobs.py) and the reference; CUDA tensors take the one
``ppokernels._backend.FASTEST_GPU`` names under ``auto``."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, op, register_autograd, register_fake_cpp, variants

if _backend.HAS_TRITON:
    import ppokernels.triton.linear_logprobs  # noqa: F401  (registers the _triton ops)

NAME = "linear_logprobs"
CPU_BUDGET = 16 << 20  # bytes of the C++ kernel's [rows, 4096] fp32 logits block (in L3)
CPU_VOCAB_BLOCK = 4096  # csrc/cpu/linear_logprobs.cpp kVocabBlock
GPU_BUDGET = 1 << 30  # at most, bytes of the Triton backward's [rows, V] dlogits workspace
# Rows per chunk of the CUDA C++ path (csrc/cuda/linear_logprobs.cu): fixed, never shrunk to N,
# so cuBLAS always sees one GEMM shape (M = 1024) and a row gets the same bits in any batch; the
# fp32 tile is [1024, 4096] (16 MiB) as on the CPU.
CUDA_CPP_ROWS = 1024
# Default ``cache_bytes``: bytes of forward logits kept for the backward (see linear_logprobs).
CACHE_BYTES = 512 << 20


def default_chunk_size(n: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk when ``chunk_size=None``: as many as keep the chunk's logits block within a
    memory budget. CPU: ``[rows, min(V, 4096)]`` fp32 <= 16 MiB (1024 rows), so it stays in L3.
    CUDA: the ``[rows, V]`` dlogits workspace (4 B per entry counted) <= min(1 GiB, device
    memory / 32). A multiple of 16, at least 16, at most N rounded up to 16."""
    if device.type == "cuda":
        budget = min(GPU_BUDGET, torch.cuda.get_device_properties(device).total_memory // 32)
        per_row = 4 * max(vocab, 1)
    else:
        budget, per_row = CPU_BUDGET, 4 * max(min(vocab, CPU_VOCAB_BLOCK), 1)
    rows = max(16, budget // per_row // 16 * 16)
    return min(rows, max(16, -(-n // 16) * 16))


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    cache_bytes: int = CACHE_BYTES,
    process_group=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``labels`` (and entropy) under ``softmax(z)``, ``z = (hidden @ weight.T +
    bias) / temperature``, computed blockwise with an online log-sum-exp: O(N) memory besides the
    gradients. ``logprobs = z_y - lse``, ``entropy = lse - E_p[z]``.

    Args:
        hidden: [N, H] or [B, T, H], float32/float64/bfloat16/float16.
        weight: [V, H] lm_head weight (this rank's vocabulary shard with ``process_group``), dtype
            of ``hidden``. bias: optional [V].
        labels: int64 or int32, shape ``hidden.shape[:-1]``, in [0, V_total) or ``ignore_index``.
        temperature: divides the logits before log-softmax, in forward, entropy and gradients.
        with_entropy: also return the entropy per token.
        ignore_index: rows with this label cost no work and give 0 with no gradient.
        chunk_size: rows per chunk; None picks :func:`default_chunk_size`. Results are bitwise
            the same for every chunk size and batch composition (fixed vocabulary order).
        cache_bytes: at most this many bytes of the forward's fp32 (fp64) logits are kept for the
            backward, which then reads them instead of recomputing them: forward + backward is
            three GEMMs (2NHV each) for the rows and vocabulary blocks the cache holds, four for
            the rest. The cache is whole ``[chunk rows, block]`` tiles (padding rows included),
            filled in order, so it is never more than ``cache_bytes`` and never ``[N, V]``
            beyond it; it lives until the backward frees the graph. Only taken when a gradient
            is wanted (grad mode on and hidden, weight or bias requiring one). ``0``: always
            recompute. The numbers are the same either way (the cached tiles are the GEMM's own
            output, so the backward sees the same bits). Default 512 MiB, from a CPU timing of
            forward + backward at N = 1024, H = 512, V = 151936, fp32 (594 MiB of logits): with
            256 MiB cached the head is level with the naive one (logits, log_softmax, gather,
            three GEMMs), with 512 MiB it gets ~90% of what caching everything saves, at about a
            third of the naive head's peak memory (its logits, their log-softmax and gradient).
        process_group: vocabulary-parallel group; rank r holds rows [v0, v1) of the full weight
            in rank order, labels are global ids, results equal the unsharded op, grad_hidden
            is summed over ranks, grad_weight / grad_bias are the local shard's.
        backend: "auto", "cpp" (CPU: BLAS chunks; CUDA: cuBLAS chunks, both with fused
            epilogues), "triton" or "reference". On CUDA, ``auto`` follows
            ``ppokernels._backend.FASTEST_GPU`` (Triton until a GPU run says otherwise).

    A ``-inf`` entry of ``bias`` masks that vocabulary entry (p = 0; finite entropy and gradients,
    equal to :func:`token_logprobs` of the same logits); a ``+inf`` logit gives NaN for its row.

    Returns:
        ``(logprobs, entropy or None)``, float32 (float64 for float64 inputs), shape of labels;
        differentiable w.r.t. hidden, weight and bias for any upstream gradients of both.
        Out-of-range labels raise ValueError (one device sync on CUDA).
    """
    _checks.tensor(NAME, "hidden", hidden, ndim=(2, 3))
    _checks.tensor(NAME, "weight", weight, ndim=2)
    _checks.labels(NAME, "labels", labels)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{NAME}: weight has H = {weight.shape[1]} but hidden has "
            f"H = {hidden.shape[-1]} (weight must be [V, H])"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{NAME}: labels has shape {tuple(labels.shape)} but hidden has "
            f"shape {tuple(hidden.shape)} (expected hidden.shape[:-1])"
        )
    _checks.same_dtype(NAME, "weight", weight, "hidden", hidden)
    for arg, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None:
            _checks.same_device(NAME, arg, t, hidden)
    _checks.not_meta(NAME, "hidden", hidden)
    if bias is not None:
        _checks.tensor(NAME, "bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{NAME}: bias has {bias.shape[0]} entries but weight has "
                f"V = {weight.shape[0]} rows"
            )
    temperature = _checks.head_options(NAME, temperature, ignore_index, with_entropy, chunk_size)
    _checks.integer(NAME, "cache_bytes", cache_bytes)
    if cache_bytes < 0:
        raise ValueError(f"{NAME}: cache_bytes must be >= 0 (0: no cache), got {cache_bytes}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{NAME}: hidden has H = 0 features (shape {tuple(hidden.shape)})")
    b = _backend.choose(NAME, hidden.device, backend, dtype=hidden.dtype)
    H, V = hidden.shape[-1], weight.shape[0]
    h2, y = hidden.reshape(-1, H), labels.reshape(-1).long()
    v0, v_total = (0, V) if process_group is None else _vocab_range(weight, process_group)
    if not torch.compiler.is_compiling():
        bad = (y != ignore_index) & ((y < 0) | (y >= v_total))
        if bool(bad.any()):
            raise ValueError(
                f"{NAME}: labels must be in [0, {v_total}) or ignore_index="
                f"{ignore_index}, got {int(y[bad][0])}"
            )
    if process_group is not None:
        h2 = _reduce_grad_hidden(h2, process_group)
    if chunk_size is not None:
        chunk = chunk_size
    elif b == "cpp" and hidden.device.type == "cuda":
        chunk = CUDA_CPP_ROWS
    else:
        chunk = default_chunk_size(h2.shape[0], V, hidden.device)
    # a cache is worth its memory only when a backward will read it
    wants_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    cache = cache_bytes if wants_grad and torch.is_grad_enabled() else 0
    if b == "reference":
        label_logit, lse, ent = reference.linear_logprobs_stats(
            h2,
            weight,
            y,
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            vocab_start=v0,
            cache_bytes=cache,
        )
    else:
        out = kernel(NAME, b)(h2, weight, y, bias, temperature, ignore_index, v0, chunk, cache)
        label_logit, lse, ent, _ = out  # the logits cache is saved by setup_context
    if process_group is not None:
        label_logit, lse, ent = _tp_combine(label_logit, lse, ent, y != ignore_index, process_group)
    logprobs = (label_logit - lse).view(labels.shape)
    return logprobs, ent.view(labels.shape) if with_entropy else None


# ------------------------------------------------- vocabulary-parallel (tensor-parallel) glue
# Rank r of ``process_group`` holds rows ``[v0, v1)`` of the lm_head weight (ranks in order, as
# Megatron's vocab-parallel embedding). Each rank computes per-row partial statistics over its
# shard: the label logit (0 unless the rank owns the label), ``lse_r`` and the shard entropy
# ``H_r``. They are all-gathered and merged in the same fixed rank order on every rank:
#
#     lse = logsumexp_r lse_r,   w_r = exp(lse_r - lse),   H = sum_r w_r (H_r + lse - lse_r)
#
# (the entropy of a mixture: every term is >= 0, so nothing cancels). Autograd: the loss is
# replicated on every rank, so the gathered tensor carries only the local slot's graph and the
# shard's gradients come out exact; ``grad_hidden`` is summed over ranks by a hook (Megatron's
# "copy to tensor-parallel region").
def _vocab_range(weight: torch.Tensor, group) -> tuple[int, int]:
    """``(vocab_start, vocab_total)`` of this rank's shard."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([weight.shape[0]], dtype=torch.int64), group=group)
    rank = dist.get_rank(group)
    sizes = [int(s) for s in sizes]
    return sum(sizes[:rank]), sum(sizes)


def _all_reduce(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def _reduce_grad_hidden(hidden: torch.Tensor, group) -> torch.Tensor:
    """``hidden`` unchanged; its gradient is summed over the ranks of ``group``."""
    if not hidden.requires_grad:
        return hidden
    out = hidden.view_as(hidden)
    out.register_hook(lambda g: _all_reduce(g, group))
    return out


def _tp_combine(label_logit, lse, entropy, valid, group):
    """Global ``(label_logit, lse, entropy)`` per row from every rank's shard statistics."""
    local = torch.stack([label_logit, lse, entropy])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = local  # only the local slot carries this rank's graph
    g = torch.stack(parts)  # [ranks, 3, N]
    lse_r, ent_r = g[:, 1], g[:, 2]
    lse_all = torch.logsumexp(lse_r, dim=0)
    w = torch.exp(lse_r - lse_all)
    ent_all = (w * (ent_r + (lse_all - lse_r))).sum(0)
    zero = torch.zeros_like(lse_all)
    return (
        torch.where(valid, g[:, 0].sum(0), zero),
        torch.where(valid, lse_all, zero),
        torch.where(valid, ent_all, zero),
    )


# ------------------------------------------------------------------ fake kernels (C++ ops)
def _fake(
    hidden, weight, labels, bias, temperature, ignore_index, vocab_start, chunk_size, cache_bytes
):
    acc = acc_dtype(hidden)
    torch._check(cache_bytes >= 0, lambda: f"{NAME}: cache_bytes must be >= 0")
    stats = tuple(hidden.new_empty(hidden.shape[0], dtype=acc) for _ in range(3))
    # the cache's size depends on how many labels are not ignore_index: data-dependent
    size = torch.library.get_ctx().new_dynamic_size() if cache_bytes > 0 else 0
    return (*stats, hidden.new_empty(size, dtype=acc))


def _fake_backward(
    g_y,
    g_lse,
    g_ent,
    hidden,
    weight,
    labels,
    bias,
    lse,
    ent,
    logits_cache,
    temperature,
    ignore_index,
    vocab_start,
    chunk_size,
    output_mask,
):
    gh = torch.empty_like(hidden) if output_mask[0] else hidden.new_empty(0)
    acc = acc_dtype(hidden)
    gw = torch.empty_like(weight) if output_mask[1] else hidden.new_empty(0, dtype=acc)
    use_b = output_mask[2] and bias is not None
    gb = torch.empty_like(bias) if use_b else hidden.new_empty(0, dtype=acc)
    return gh, gw, gb


register_fake_cpp("linear_logprobs", _fake)
register_fake_cpp("linear_logprobs_backward", _fake_backward)


# ------------------------------------------------------------------------------- autograd
# The forward op returns per-row (label_logit, lse, entropy) and the logits cache; the backward op
# takes the upstream gradients of the three, the cache, and output_mask = which of (hidden,
# weight, bias) need a gradient, from ctx.needs_input_grad (a frozen lm_head costs no grad_weight
# GEMM). Every gradient needs the logits (cached or recomputed), hence both hidden and weight, so
# setup_context saves them whenever any of (hidden, weight, bias) needs a gradient. The backward
# only reads the cache, so a second backward (retain_graph=True) finds it intact.
def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, temperature, ignore_index, vocab_start, chunk_size, _ = inputs
    label_logit, lse, ent, logits_cache = output
    ctx.mark_non_differentiable(logits_cache)
    ctx.args = (temperature, ignore_index, vocab_start, chunk_size)
    if any(ctx.needs_input_grad[i] for i in (0, 1, 3)):
        ctx.save_for_backward(hidden, weight, labels, bias, lse, ent, logits_cache)


def _make_backward(backward_op):
    def backward(ctx, g_y, g_lse, g_ent, _g_cache):
        hidden, weight, labels, bias, lse, ent, logits_cache = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], bias is not None and need[3]]
        grads = [g if g is not None else torch.zeros_like(lse) for g in (g_y, g_lse, g_ent)]
        gh, gw, gb = backward_op(
            *grads, hidden, weight, labels, bias, lse, ent, logits_cache, *ctx.args, mask
        )
        return (
            gh if mask[0] else None,
            gw if mask[1] else None,
            None,
            gb if mask[2] else None,
            *[None] * 5,
        )

    return backward


for _fwd, _bwd in variants("linear_logprobs", "linear_logprobs_backward"):
    register_autograd(_fwd, _make_backward(op(_bwd)), setup_context=_setup_context)
