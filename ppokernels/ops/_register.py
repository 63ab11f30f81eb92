"""Registration helpers: fake kernels and autograd formulas for every built variant of an op."""

from __future__ import annotations

import torch

from ppokernels import _backend


def variants(name: str, backward: str | None = None) -> list[tuple[str, str | None]]:
    """``(forward, backward)`` qualified op names of each built backend of ``name``.

    The C++ ops exist when ``_C`` is loaded; the ``_triton`` ops when triton is importable (the
    caller imports its ``ppokernels.triton.<stem>`` module first).
    """
    out = []
    if _backend.CPP_ERROR is None:
        out.append((f"ppokernels::{name}", backward and f"ppokernels::{backward}"))
    if _backend.HAS_TRITON:
        out.append((f"ppokernels::{name}_triton", backward and f"ppokernels::{backward}_triton"))
    return out


def op(qualname: str):
    """The OpOverloadPacket of ``ppokernels::<name>``."""
    return getattr(torch.ops.ppokernels, qualname.split("::")[1])


def register_fake_cpp(name: str, fn) -> None:
    """Fake (meta) kernel of a C++ op; Triton ops get theirs from tracing the triton_op body."""
    if _backend.CPP_ERROR is None:
        torch.library.register_fake(f"ppokernels::{name}")(fn)
