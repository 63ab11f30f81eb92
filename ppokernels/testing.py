"""Test helpers: which backends can run here, tolerances, and the "error relative to eager
PyTorch" rule for low-precision dtypes (flash-attention's convention)."""

from __future__ import annotations

import torch

from ppokernels import _backend


def available_backends(device_type: str) -> list[str]:
    """Backends that can run ops on tensors of ``device_type`` in this process."""
    out = ["reference"]
    if _backend.has_cpp(device_type):
        out.append("cpp")
    if _backend.has_triton(device_type):
        out.append("triton")
    return out


# The reason of every skip for a missing binary module: the pure-Python wheel's CI job
# (PPOKERNELS_PURE=1, tests/conftest.py) allows exactly these skips, every other job fails on them.
NO_BINARY = "needs the binary module ppokernels._C"


def binary_skip_reason() -> str | None:
    """Why the binary module's tests cannot run here (NO_BINARY and the load reason), or None."""
    if _backend.has_cpp("cpu"):
        return None
    return f"{NO_BINARY} ({_backend.info()['binary_cpu_reason']})"


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backend_params() -> list[tuple[str, str]]:
    """(device, backend) pairs that can run here, for ``pytest.mark.parametrize``."""
    return [(d, b) for d in devices() for b in available_backends(d)]


# Tolerances for float32 kernels against a float64 reference (torch's defaults, slightly relaxed
# because kernels and reference sum in different orders).
TOL = {
    torch.float64: dict(rtol=1e-8, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(out, ref64, eager, *, factor: float = 2.0, atol: float = 1e-6):
    """``out``'s error against ``ref64`` is at most ``factor`` x the error of ``eager`` (the same
    computation in plain PyTorch at the input's low precision), plus ``atol``."""
    err = max_abs_err(out, ref64)
    eager_err = max_abs_err(eager, ref64)
    assert err <= factor * eager_err + atol, (
        f"kernel error {err:.3e} > {factor} x eager error {eager_err:.3e} + {atol:.1e}"
    )
