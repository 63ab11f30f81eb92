"""token_logprobs: per-token log-probs and entropy from logits, in one pass per row."""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, op, register_autograd, register_fake_cpp, variants

if _backend.HAS_TRITON:
    import ppokernels.triton.token_logprobs  # noqa: F401  (registers ppokernels::token_logprobs_triton)

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

    Infinite logits: ``-inf`` masks a vocabulary entry (p = 0, no NaN in outputs or gradients);
    a ``+inf`` logit (an overflow upstream) makes the softmax undefined, and that row's log-prob
    and entropy are NaN on every backend, as ``torch.log_softmax`` gives.

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
            Logits whose elements overlap (``expand``-ed, stride 0) cannot hold their own
            gradient: for them the backward writes a new buffer, as without this flag.
        backend: "auto", "cpp", "triton" or "reference".

    Returns:
        ``(logprobs, entropy or None)``: (...) float32 (float64 for float64 logits). Each row's
        values are bitwise independent of the batch it is computed in.
    """
    _check(logits, labels, temperature, ignore_index)
    _checks.flag(NAME, "with_entropy", with_entropy)
    _checks.flag(NAME, "inplace_backward", inplace_backward)
    if inplace_backward and _overlaps(logits):
        # expanded (stride-0) or otherwise overlapping logits: one element stands for several
        # entries, so an in-place gradient would be summed over them; use a new buffer instead
        inplace_backward = False
    if labels.dtype != torch.int64:
        labels = labels.long()
    if logits.dim() > 0 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    _checks.not_meta(NAME, "logits", logits)
    b = _backend.choose(NAME, logits.device, backend)
    if not (b == "cpp" and logits.device.type == "cpu") and not torch.compiler.is_compiling():
        _check_label_range(labels, logits.shape[-1], ignore_index)
    args = (float(temperature), bool(with_entropy), ignore_index)
    if b == "reference":
        return reference.token_logprobs(logits, labels, **dict(zip(_REF_KW, args, strict=True)))
    try:
        lp, ent, _ = kernel(NAME, b)(logits, labels, *args, bool(inplace_backward))
    except RuntimeError as e:
        # the CPU kernel checks the label range in its own pass (no extra pass over labels here);
        # only RuntimeError crosses the stable ABI, so its message becomes the IndexError again
        if str(e).startswith(f"{NAME}: labels contains"):
            raise IndexError(str(e)) from None
        raise
    return lp, (ent if with_entropy else None)


_REF_KW = ("temperature", "with_entropy", "ignore_index")


def _overlaps(x: torch.Tensor) -> bool:
    """Whether two index tuples of ``x`` may share one element (a sufficient test for "no": each
    stride, in increasing order, passes the span of the smaller ones)."""
    span = 0
    dims = zip(x.stride(), x.shape, strict=True)
    for stride, size in sorted((st, sz) for st, sz in dims if sz > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _check(logits, labels, temperature, ignore_index):
    _checks.tensor(NAME, "logits", logits)
    _checks.labels(NAME, "labels", labels)
    if logits.dim() < 1:
        raise ValueError(f"{NAME}: logits must have shape (..., V), got a scalar")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{NAME}: labels has shape {tuple(labels.shape)} but logits has shape "
            f"{tuple(logits.shape)} (expected labels.shape == logits.shape[:-1])"
        )
    _checks.same_device(NAME, "labels", labels, logits)
    _checks.positive(NAME, "temperature", temperature)
    _checks.integer(NAME, "ignore_index", ignore_index)
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


# ------------------------------------------------------------------ fake kernels (C++ ops)
def _fake(logits, labels, temperature, with_entropy, ignore_index, inplace_backward):
    dtype = acc_dtype(logits)
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


# ------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    logits, labels, ctx.temperature, ctx.with_entropy, ctx.ignore_index, ctx.inplace = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)  # saved for the backward only; not exposed
    if ctx.needs_input_grad[0]:  # only the logits are differentiable
        ctx.save_for_backward(logits, labels, lse, entropy if ctx.with_entropy else None)


def _make_backward(backward_op, backward_inplace_op):
    def backward(ctx, grad_lp, grad_ent, _grad_lse):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
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


# the in-place backward of each variant is its backward op's name + "_"
for _fwd, _bwd in variants(NAME, f"{NAME}_backward"):
    register_autograd(_fwd, _make_backward(op(_bwd), op(f"{_bwd}_")), setup_context=_setup_context)
