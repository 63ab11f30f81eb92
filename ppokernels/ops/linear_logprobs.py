"""linear_logprobs: per-token log-probs and entropy from hidden states and the lm_head weight,
never materialising the [N, V] logits. Backends: CPU C++ (csrc/cpu/linear_logprobs.cpp) and
Triton (ppokernels/triton/linear_logprobs.py); there is no CUDA C++ kernel, so CUDA tensors take
Triton under ``auto``."""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels.ops import (
    _checks,
    _linear_logprobs_register,  # noqa: F401  (fake kernels, autograd)
)
from ppokernels.ops import _linear_logprobs_tp as tp

NAME = "linear_logprobs"
CPU_BUDGET = 16 << 20  # bytes of the C++ kernel's [rows, 4096] fp32 logits block (in L3)
CPU_VOCAB_BLOCK = 4096  # csrc/cpu/linear_logprobs.cpp kVocabBlock
GPU_BUDGET = 1 << 30  # at most, bytes of the Triton backward's [rows, V] dlogits workspace


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
        process_group: vocabulary-parallel group; rank r holds rows [v0, v1) of the full weight
            in rank order, labels are global ids, results equal the unsharded op, grad_hidden
            is summed over ranks, grad_weight / grad_bias are the local shard's.
        backend: "auto", "cpp" (CPU), "triton" or "reference".

    Returns:
        ``(logprobs, entropy or None)``, float32 (float64 for float64 inputs), shape of labels;
        differentiable w.r.t. hidden, weight and bias for any upstream gradients of both.
        Out-of-range labels raise ValueError (one device sync on CUDA).
    """
    _checks.tensor(NAME, "hidden", hidden, ndim=(2, 3))
    _checks.tensor(NAME, "weight", weight, ndim=2)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{NAME}: labels must be an int64 or int32 tensor, got "
            f"{getattr(labels, 'dtype', type(labels).__name__)}"
        )
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
    if hidden.device.type == "meta":
        raise ValueError(f"{NAME}: hidden is on the meta device; labels must be checked")
    if bias is not None:
        _checks.tensor(NAME, "bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{NAME}: bias has {bias.shape[0]} entries but weight has "
                f"V = {weight.shape[0]} rows"
            )
    temperature = _checks.positive(NAME, "temperature", temperature)
    if not isinstance(ignore_index, int):
        raise TypeError(f"{NAME}: ignore_index must be an int")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{NAME}: chunk_size must be a positive int or None, got {chunk_size!r}")
    b = _backend.choose(NAME, hidden.device, backend)
    H, V = hidden.shape[-1], weight.shape[0]
    h2, y = hidden.reshape(-1, H), labels.reshape(-1).long()
    v0, v_total = (0, V) if process_group is None else tp.vocab_range(weight, process_group)
    if not torch.compiler.is_compiling():
        bad = (y != ignore_index) & ((y < 0) | (y >= v_total))
        if bool(bad.any()):
            raise ValueError(
                f"{NAME}: labels must be in [0, {v_total}) or ignore_index="
                f"{ignore_index}, got {int(y[bad][0])}"
            )
    if process_group is not None:
        h2 = tp.reduce_grad_hidden(h2, process_group)
    chunk = chunk_size or default_chunk_size(h2.shape[0], V, hidden.device)
    if b == "reference":
        out = reference.linear_logprobs_stats(
            h2,
            weight,
            y,
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            vocab_start=v0,
        )
    else:
        ops = torch.ops.ppokernels
        fn = ops.linear_logprobs if b == "cpp" else ops.linear_logprobs_triton
        out = fn(h2, weight, y, bias, temperature, ignore_index, v0, chunk)
    label_logit, lse, ent = out
    if process_group is not None:
        label_logit, lse, ent = tp.combine(label_logit, lse, ent, y != ignore_index, process_group)
    logprobs = (label_logit - lse).view(labels.shape)
    return logprobs, ent.view(labels.shape) if with_entropy else None
