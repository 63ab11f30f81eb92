"""token_logprobs: per-token log-probs and entropy from logits, in one pass per row."""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels.ops import _checks
from ppokernels.ops._register import op, register_fake_cpp

if _backend.HAS_TRITON:
    import ppokernels.triton.logprobs  # noqa: F401  (registers ppokernels::token_logprobs_triton)

NAME = "token_logprobs"


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each label under ``softmax(logits / temperature)``, and its entropy.

    With z = logits / temperature, lse = log sum_j exp(z_j), p = exp(z - lse):
    ``logprobs = z_y - lse`` and ``entropy = lse - sum_j p_j z_j``, from one read of each row
    (online log-sum-exp in fp32); no [N, V] intermediate. The gradient with respect to the logits
    from both outputs' upstream gradients g_lp, g_ent is formed in one more pass:
    ``dz_j = (g_lp (1[j = y] - p_j) - g_ent p_j (z_j - E_p[z])) / temperature``.

    Args:
        logits: (..., V) float32/bfloat16/float16 (float64 for gradcheck). The last dim must be
            contiguous for a zero-copy call; the leading dims may be strided (e.g.
            ``logits[:, :-1]`` of a [B, S, V] tensor), else a copy is made.
        labels: (...) int64 or int32 token ids, logits.shape[:-1]. Tokens equal to
            ``ignore_index`` give 0 and get no gradient; any other label outside [0, V) raises
            IndexError. CPU C++: checked inside the kernel (no extra pass). Other backends check
            in Python, which on CUDA costs one host sync; under torch.compile the check is skipped
            and the kernels write NaN for such tokens (they never read out of bounds).
        temperature: > 0, divides the logits before the softmax (forward, entropy and backward).
        with_entropy: also return the per-token entropy (differentiable).
        inplace_backward: the backward writes the gradient into the logits' own memory instead of
            a new [..., V] buffer. **The logits are destroyed by the backward**: do not read them
            afterwards. The write goes through a registered op that declares the mutation, so
            autograd's version counter catches any other user of the logits that saved them for
            its own backward (an error, not a wrong gradient); a second backward also errors.
        backend: "auto", "cpp", "triton" or "reference".

    Returns:
        ``(logprobs, entropy or None)``: (...) float32 (float64 for float64 logits). Each row's
        values are bitwise independent of the batch it is computed in.
    """
    _check(logits, labels, temperature, ignore_index)
    if labels.dtype != torch.int64:
        labels = labels.long()
    if logits.dim() > 0 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    b = _backend.choose(NAME, logits.device, backend)
    if not (b == "cpp" and logits.device.type == "cpu") and not torch.compiler.is_compiling():
        _check_label_range(labels, logits.shape[-1], ignore_index)
    args = (float(temperature), bool(with_entropy), ignore_index)
    if b == "reference":
        return reference.token_logprobs(logits, labels, **dict(zip(_REF_KW, args, strict=True)))
    fn = getattr(torch.ops.ppokernels, "token_logprobs" + ("_triton" if b == "triton" else ""))
    lp, ent, _ = fn(logits, labels, *args, bool(inplace_backward))
    return lp, (ent if with_entropy else None)


_REF_KW = ("temperature", "with_entropy", "ignore_index")


def _check(logits, labels, temperature, ignore_index):
    _checks.tensor(NAME, "logits", logits)
    _checks.tensor(NAME, "labels", labels, floating=False)
    if logits.dim() < 1:
        raise ValueError(f"{NAME}: logits must have shape (..., V), got a scalar")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{NAME}: labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{NAME}: labels has shape {tuple(labels.shape)} but logits has shape "
            f"{tuple(logits.shape)} (expected labels.shape == logits.shape[:-1])"
        )
    _checks.same_device(NAME, "labels", labels, logits)
    _checks.positive(NAME, "temperature", temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{NAME}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if logits.shape[-1] == 0 and labels.numel() > 0:
        raise ValueError(f"{NAME}: logits has an empty vocabulary (V = 0)")


def _check_label_range(labels, V, ignore_index):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if labels.numel() and bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise IndexError(
            f"{NAME}: labels contains {int(labels.flatten()[i])} (flat index {i}), outside "
            f"[0, V) for V = {V} and not ignore_index = {ignore_index}"
        )


def _fake(logits, labels, temperature, with_entropy, ignore_index, inplace_backward):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ent_shape = labels.shape if with_entropy else (0,)
    return (
        logits.new_empty(labels.shape, dtype=dtype),
        logits.new_empty(ent_shape, dtype=dtype),
        logits.new_empty(labels.shape, dtype=dtype),
    )


def _fake_backward(grad_lp, grad_ent, logits, labels, lse, entropy, temperature, ignore_index):
    return torch.empty_like(logits)


def _fake_backward_(grad_lp, grad_ent, logits, labels, lse, entropy, temperature, ignore_index):
    return None


register_fake_cpp("token_logprobs", _fake)
register_fake_cpp("token_logprobs_backward", _fake_backward)
register_fake_cpp("token_logprobs_backward_", _fake_backward_)


def _setup_context(ctx, inputs, output):
    logits, labels, ctx.temperature, ctx.with_entropy, ctx.ignore_index, ctx.inplace = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)  # saved for the backward only; not exposed
    ctx.save_for_backward(logits, labels, lse, entropy if ctx.with_entropy else None)


def _make_backward(backward_op, backward_inplace_op):
    def backward(ctx, grad_lp, grad_ent, _grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_ent = grad_ent if ctx.with_entropy else None
        args = (grad_lp, grad_ent, logits, labels, lse, entropy, ctx.temperature, ctx.ignore_index)
        if ctx.inplace:
            backward_inplace_op(*args)
            # the logits are now the gradient: bump their version so that autograd refuses any
            # later use of a saved copy of them (another node, or a second backward)
            torch.autograd.graph.increment_version(logits)
            grad = logits
        else:
            grad = backward_op(*args)
        return grad, None, None, None, None, None

    return backward


def _variants():
    out = []
    if _backend.CPP_ERROR is None:
        out.append(("", "_"))
    if _backend.HAS_TRITON:
        out.append(("_triton", "_triton_"))
    return out


for _sfx, _isfx in _variants():
    torch.library.register_autograd(
        f"ppokernels::token_logprobs{_sfx}",
        _make_backward(
            op(f"ppokernels::token_logprobs_backward{_sfx}"),
            op(f"ppokernels::token_logprobs_backward{_isfx}"),
        ),
        setup_context=_setup_context,
    )
