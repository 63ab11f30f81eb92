"""Math shared by the Triton kernels, the one launcher, and the shape of the ahead-of-time compile
tables.

Every kernel module keeps its launch configurations (block sizes, ``num_warps``, ``num_stages``) in
one table that both its launchers and its ``AOT`` table read, so the compile test
(tests/build/_triton_aot.py) and the sm_90 audit (tests/build/test_triton_audit.py) build exactly
what runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


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


# ------------------------------------------------------------ ahead-of-time compile tables
# Input dtypes a kernel may see (every float dtype the public ops accept) and the accumulator of
# each: fp64 stays fp64, the rest accumulate in fp32 (``ppokernels._dtypes.acc_dtype``).
DTYPES = ("fp32", "fp64", "bf16", "fp16")
_NAMES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Triton's name of a float dtype ("bf16"), the key of the launch tables."""
    return _NAMES[dtype]


def acc_name(dt: str) -> str:
    return "fp64" if dt == "fp64" else "fp32"


class Spec(NamedTuple):
    """One compile configuration: what ``triton.compile(ASTSource(...))`` needs, plus the
    launch options (``num_warps``, ``num_stages``) the runtime launch uses for it."""

    kernel: object
    signature: dict[str, str]  # every argument, constexprs as "constexpr"
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    dtype: str  # the input dtype this spec stands for

    @property
    def name(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel.fn.__name__}[{self.dtype}]({flags})"


def aot_table(kernel, signature: dict[str, str], config, *, variants=({},), dtypes=DTYPES):
    """The compile specs of ``kernel``: each input dtype with the first constexpr variant, and each
    further variant with bf16 (the hot dtype), so every dtype and every switch is compiled once.

    ``signature`` maps arguments to Triton types, with ``T`` for the input dtype and ``A`` for its
    accumulator (``"*T"``, ``"*A"``). ``config(dt)`` returns the launch table entry the runtime
    uses for input dtype ``dt``: its block constexprs plus ``num_warps`` and ``num_stages``.
    A variant may hold callables of ``dt`` (e.g. ``F64=lambda dt: dt == "fp64"``).
    """
    specs = []
    pairs = [(dt, variants[0]) for dt in dtypes]
    pairs += [("bf16" if "bf16" in dtypes else dtypes[0], v) for v in variants[1:]]
    for dt, variant in pairs:
        cfg = dict(config(dt))
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        consts = {k: (v(dt) if callable(v) else v) for k, v in {**variant, **cfg}.items()}
        sig = {
            a: t.replace("T", dt).replace("A", acc_name(dt)) if t.startswith("*") else t
            for a, t in signature.items()
        }
        sig.update({k: "constexpr" for k in consts})
        names = getattr(kernel, "arg_names", None)  # None: interpreted kernel (never compiled)
        if names is not None:
            missing = set(names) ^ set(sig)
            assert not missing, f"{kernel.fn.__name__}: AOT signature mismatch {missing}"
            sig = {a: sig[a] for a in names}  # the compiler reads the arguments in order
        specs.append(Spec(kernel, sig, consts, warps, stages, dt))
    return specs


# ---------------------------------------------------------------- the exp(y) - 1 series
# The same series, bound and Horner order as csrc/include/ppokernels/common.h (exp_series_tail,
# expm1_poly, expm1_minus_y), term for term: exp(y) - 1 and exp(y) - 1 - y cancel near y = 0, so
# for |y| < EXP_SERIES_BOUND they are evaluated as
#   exp(y) - 1     = y (1 + (y / 2) tail(y))
#   exp(y) - 1 - y = y^2 (1 / 2) tail(y),     tail(y) = 1 + y/3 (1 + y/4 (1 + ... (1 + y/N)))
# with N = 10 (fp32 and narrower; relative truncation error < 1e-10 at |y| < 0.5) or 15 (fp64,
# < 6e-18), and from exp beyond the bound (a few ulp at most there). See common.h for the bounds.
EXP_SERIES_BOUND: tl.constexpr = tl.constexpr(0.5)


@triton.jit
def _exp_series_tail(y, N: tl.constexpr):
    """tail(y) above, Horner from the highest power down, multiplying by 1/n."""
    s = 1.0 + y * (1.0 / N)
    for i in tl.static_range(N - 3):
        s = 1.0 + y * (1.0 / (N - 1 - i)) * s
    return s


@triton.jit
def _exp_series_terms(y):
    if y.dtype == tl.float64:
        return _exp_series_tail(y, 15)
    else:
        return _exp_series_tail(y, 10)


@triton.jit
def expm1(y):
    """exp(y) - 1 without cancellation near 0 (common.h ``expm1_poly``)."""
    s = 1.0 + y * 0.5 * _exp_series_terms(y)
    return tl.where(tl.abs(y) < EXP_SERIES_BOUND, y * s, tl.exp(y) - 1.0)


@triton.jit
def expm1_minus_y(y):
    """exp(y) - 1 - y without cancellation near 0 (common.h ``expm1_minus_y``); the k3 KL
    estimator is ``expm1_minus_y(-x)``."""
    near = y * y * (0.5 * _exp_series_terms(y))
    return tl.where(tl.abs(y) < EXP_SERIES_BOUND, near, tl.exp(y) - 1.0 - y)


# ---------------------------------------------------------------- online softmax statistics
# Per-row statistics of z = logits / temperature over the columns seen so far (the Triton form of
# csrc/include/ppokernels/token_logprobs.h): m = max z, s = sum exp(z - m), u = sum exp(z - m) (z
# - m).
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
