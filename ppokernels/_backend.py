"""The one place that knows which backends are built and picks one for an op call.

Backends:
  ``cpp``        the compiled extension ``ppokernels._C``: the CPU C++ kernel for CPU tensors, the
                 CUDA C++ kernel for CUDA tensors (torch dispatches on the device).
  ``triton``     Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
  ``reference``  plain PyTorch from :mod:`ppokernels.reference`, differentiable by autograd.

``auto`` picks, for CUDA tensors, the faster built GPU kernel of the op (``FASTEST_GPU``, from the
benchmarks), for CPU tensors the C++ kernel, and the reference when nothing is built.
``PPOKERNELS_BACKEND`` replaces ``auto`` when set. Asking for a backend that is not built is an
error that says how to build it; there is no silent fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")

# ISA levels of the CPU C++ kernels, lowest first (csrc/include/ppokernels/cpu_isa.h).
CPU_ISAS = ("scalar", "avx2", "avx512")

try:  # the compiled extension registers the C++ kernels when loaded
    from ppokernels import _C

    CPP_ERROR: str | None = None
except ImportError as e:  # pure-Python install (PPOKERNELS_BUILD_EXT=0) or a failed build
    _C = None
    CPP_ERROR = str(e)


def _check_cpu_isa() -> None:
    """PPOKERNELS_CPU_ISA, read by the extension when it was loaded: an unknown value is an
    error, a level above what this CPU supports a warning (the extension took the supported one).
    """
    asked = os.environ.get("PPOKERNELS_CPU_ISA", "")
    if asked and asked not in CPU_ISAS:
        raise ValueError(
            f"PPOKERNELS_CPU_ISA={asked!r} is not an ISA level of the CPU kernels; "
            f"use one of {', '.join(CPU_ISAS)} (or leave it unset for the best this CPU supports)"
        )
    if asked and _C is not None and _C.cpu_isa() != asked:
        import warnings

        warnings.warn(
            f"PPOKERNELS_CPU_ISA={asked} asks for more than this CPU (or build) supports; "
            f"the CPU kernels use {_C.cpu_isa()}",
            RuntimeWarning,
            stacklevel=2,
        )


_check_cpu_isa()


def cpu_isa() -> str | None:
    """ISA level of the CPU C++ kernels in use ("scalar", "avx2", "avx512"); None if not built."""
    return _C.cpu_isa() if _C is not None else None


HAS_TRITON = importlib.util.find_spec("triton") is not None

# Which GPU kernel `auto` takes when both the Triton and the CUDA C++ kernels of an op are built:
# keys "<op>" or "<op>:<dtype>" (e.g. "linear_logprobs:bfloat16", which wins over "<op>"), values
# "triton" or "cpp". The rule: the faster of the two in the GPU check's `llm` benchmarks
# (benchmarks/gpu_check.sh), per op and input dtype. No GPU run has been recorded yet, so the
# table is empty and `auto` takes Triton for every op on CUDA: its kernels are checked ahead of
# time for sm_90 (wgmma in bf16, no register spills: tests/test_triton_audit.py), while the CUDA
# C++ linear_logprobs (cuBLAS GEMMs on chunks with fused epilogues) is compile-checked only;
# `backend="cpp"` runs it.
FASTEST_GPU: dict[str, str] = {}

BUILD_HINT = {
    "cpp": "build the extension: pip install --no-build-isolation -e . "
    "(without PPOKERNELS_BUILD_EXT=0)",
    "cuda": "build the CUDA kernels: PPOKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e . "
    "with a CUDA build of torch and nvcc on PATH",
    "triton": "install triton (pip install triton); on CPU tensors Triton runs only with "
    "TRITON_INTERPRET=1 set before ppokernels is imported",
}


class BackendUnavailable(RuntimeError):
    """A backend was asked for that is not built or cannot run on the given device."""


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _registered(key: str) -> frozenset[str]:
    names = torch._C._dispatch_get_registrations_for_dispatch_key(key)
    return frozenset(n.split("::")[1] for n in names if n.startswith("ppokernels::"))


# Ops with a C++ kernel per device type, read once at import (not while torch.compile traces).
CPP_KERNELS = {"cpu": _registered("CPU"), "cuda": _registered("CUDA")} if CPP_ERROR is None else {}


def has_cpp(device_type: str = "cpu", op: str = "kl_penalty") -> bool:
    """Whether ``ppokernels::<op>`` has a C++ kernel for ``device_type`` ("cpu" or "cuda")."""
    return op in CPP_KERNELS.get(device_type, ())


def has_triton(device_type: str = "cuda") -> bool:
    """Whether Triton kernels can run on tensors of ``device_type``."""
    if not HAS_TRITON:
        return False
    return device_type == "cuda" or (device_type == "cpu" and interpreting())


def fastest_gpu(op: str, dtype: torch.dtype | None = None) -> str:
    """The entry of FASTEST_GPU for ``op`` (and ``dtype`` when given), "triton" by default."""
    if dtype is not None:
        key = f"{op}:{str(dtype).removeprefix('torch.')}"
        if key in FASTEST_GPU:
            return FASTEST_GPU[key]
    return FASTEST_GPU.get(op, "triton")


def choose(
    op: str, device: torch.device, backend: str = "auto", dtype: torch.dtype | None = None
) -> str:
    """Backend that runs ``op`` on ``device`` (inputs of ``dtype``): "cpp", "triton" or
    "reference"."""
    if backend == "auto":
        backend = os.environ.get("PPOKERNELS_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    dev = device.type
    if backend == "auto":
        if dev == "cuda":
            order = ("triton", "cpp") if fastest_gpu(op, dtype) == "triton" else ("cpp", "triton")
        else:
            order = ("cpp",)
        for b in order:
            if (b == "cpp" and has_cpp(dev, op)) or (b == "triton" and has_triton(dev)):
                return b
        return "reference"
    if backend == "cpp" and not has_cpp(dev, op):
        hint = BUILD_HINT["cuda" if dev == "cuda" else "cpp"]
        why = f" ({CPP_ERROR})" if CPP_ERROR else ""
        raise BackendUnavailable(
            f"{op}: the C++ kernel for {dev} tensors is not built{why}; {hint}"
        )
    if backend == "triton" and not has_triton(dev):
        raise BackendUnavailable(
            f"{op}: the Triton backend cannot run on {dev} tensors; {BUILD_HINT['triton']}"
        )
    return backend


def info() -> dict[str, object]:
    """What is built and importable, for ``ppokernels info`` and bug reports."""
    triton_version = None
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cpp_cpu_kernels": has_cpp("cpu"),
        "cpp_cuda_kernels": has_cpp("cuda"),
        "cpu_isa": cpu_isa(),
        "cpp_error": CPP_ERROR,
        "cuda_available": torch.cuda.is_available(),
        "triton_interpreter": interpreting(),
        "backend_override": os.environ.get("PPOKERNELS_BACKEND"),
    }
