"""Math shared by the Triton kernels, and the registry of their ahead-of-time compile specs."""

from __future__ import annotations

import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# Kernels and example signatures that tests compile ahead of time for sm_80 / sm_90:
# (kernel, {arg: type}, {constexpr: value}). Appended by each kernel module at import.
AOT_SPECS: list[tuple[object, dict[str, str], dict[str, object]]] = []


def launch(kernel):
    """``wrap_triton(kernel)``: the launcher every ``triton_op`` uses, so torch.compile traces it.

    Under TRITON_INTERPRET=1, ``@triton.jit`` gives an interpreter object that torch < 2.13's
    ``wrap_triton`` rejects ("only works on functions annotated with triton.jit"); torch 2.13
    returns it unchanged. Do the same here, so the interpreter tests run on every supported torch
    (eager launches are identical; compiling an interpreted kernel is not possible either way).
    """
    if isinstance(kernel, (JITFunction, Autotuner)):
        return wrap_triton(kernel)
    return kernel


def aot(kernel, signature: dict[str, str], **constexprs) -> None:
    """Records one ahead-of-time compile configuration of ``kernel``."""
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    AOT_SPECS.append((kernel, sig, constexprs))


@triton.jit
def expm1(y):
    """exp(y) - 1, by a Taylor series near 0 where the direct form cancels (|y| < 0.25)."""
    s = 1.0 + y / 8.0
    s = 1.0 + y / 7.0 * s
    s = 1.0 + y / 6.0 * s
    s = 1.0 + y / 5.0 * s
    s = 1.0 + y / 4.0 * s
    s = 1.0 + y / 3.0 * s
    s = 1.0 + y / 2.0 * s
    return tl.where(tl.abs(y) < 0.25, y * s, tl.exp(y) - 1.0)


# ---------------------------------------------------------------- online softmax statistics
# Per-row statistics of z = logits / temperature over the columns seen so far (the Triton form of
# csrc/include/ppokernels/logprobs.h): m = max z, s = sum exp(z - m), u = sum exp(z - m) (z - m).
# Then lse = m + log s, E_p[z] = m + u / s, entropy = log s - u / s. Shared by token_logprobs and
# linear_logprobs.


@triton.jit
def softmax_stats_tile(m, s, u, z, WITH_ENTROPY: tl.constexpr):
    """Folds a [R, C] tile ``z`` (padding columns -inf, never 0) into the [R] stats (m, s, u).

    One rescale per row and tile, one exp per element; start from m = -inf, s = u = 0. Without
    WITH_ENTROPY, u is returned unchanged.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # a.m == m_new (also -inf == -inf) needs no rescale; an empty prefix has c = 0, c * d := 0
    d = tl.where(m == m_new, 0.0, m - m_new)
    c = tl.exp(d)
    # shift by 0 while the max is still -inf, so -inf columns give exp(-inf) = 0, not NaN
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    x = z - base[:, None]
    e = tl.exp(x)
    if WITH_ENTROPY:
        # e * x for a masked column is 0 * -inf: clamp x to a finite value first
        ex = e * tl.maximum(x, -3.0e38)
        u = c * u + tl.where(c > 0.0, c * d, 0.0) * s + tl.sum(ex, axis=1)
    s = c * s + tl.sum(e, axis=1)
    return m_new, s, u
