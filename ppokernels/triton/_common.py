"""Math shared by the Triton kernels, and the registry of their ahead-of-time compile specs."""

from __future__ import annotations

import triton
import triton.language as tl

# Kernels and example signatures that tests compile ahead of time for sm_80 / sm_90:
# (kernel, {arg: type}, {constexpr: value}). Appended by each kernel module at import.
AOT_SPECS: list[tuple[object, dict[str, str], dict[str, object]]] = []


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
