"""Registration helpers shared by every ``ops/<stem>.py``: the built variants of an op, the one
rule that picks the C++ or the Triton op, and fake kernels of the C++ ops."""

from __future__ import annotations

import torch

from ppokernels import _backend


def variants(name: str, backward: str | None = None) -> list[tuple[str, str | None]]:
    """``(forward, backward)`` qualified op names of each built backend of ``name``.

    The C++ ops exist when ``_C`` is loaded; the ``_triton`` ops when triton is importable (the
    caller imports its ``ppokernels.triton.<stem>`` module first).
    """
    out = []
    if _backend._C is not None:
        out.append((f"ppokernels::{name}", backward and f"ppokernels::{backward}"))
    if _backend.HAS_TRITON:
        out.append((f"ppokernels::{name}_triton", backward and f"ppokernels::{backward}_triton"))
    return out


def op(qualname: str):
    """The OpOverloadPacket of ``ppokernels::<name>``."""
    return getattr(torch.ops.ppokernels, qualname.split("::")[1])


def kernel(name: str, backend: str):
    """The registered op that runs ``name`` on ``backend`` ("cpp" or "triton", as returned by
    :func:`ppokernels._backend.choose`): ``ppokernels::<name>`` or ``ppokernels::<name>_triton``."""
    if backend not in ("cpp", "triton"):
        raise ValueError(f"{name}: no registered op for backend {backend!r}")
    return getattr(torch.ops.ppokernels, name if backend == "cpp" else f"{name}_triton")


def register_fake_cpp(name: str, fn) -> None:
    """Fake (meta) kernel of a C++ op; Triton ops get theirs from tracing the triton_op body."""
    if _backend._C is not None:
        torch.library.register_fake(f"ppokernels::{name}")(fn)
