"""The one place that knows which backends are built and picks one for an op call.

Backends:
  ``cpp``        the compiled kernels, two stable-ABI (abi3) binaries: ``ppokernels._C`` defines
                 the op schemas and the CPU C++ kernels, ``ppokernels._C_cuda`` (in CUDA builds)
                 adds the CUDA C++ kernels; torch dispatches on the device.
  ``triton``     Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
  ``reference``  plain PyTorch from :mod:`ppokernels.reference`, differentiable by autograd.

``auto`` picks, for CUDA tensors, the faster built GPU kernel of the op (``FASTEST_GPU``, from the
benchmarks), for CPU tensors the C++ kernel, and the reference when nothing is built.
``PPOKERNELS_BACKEND``, when set before ppokernels is imported, replaces ``auto``. Asking for a
backend that is not built is an error that says how to build it; there is no silent fallback.

A binary that is present but cannot load (a torch older than the stable-ABI target, a missing
CUDA runtime, an undefined symbol) never breaks ``import ppokernels``: the import warns once,
``info()`` says why, and the Triton and reference backends serve. ``PPOKERNELS_NO_EXT=1`` skips
both binaries on purpose.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch
from torch.torch_version import TorchVersion

BACKENDS = ("auto", "cpp", "triton", "reference")

# ISA levels of the CPU C++ kernels, lowest first (csrc/include/ppokernels/cpu_isa.h).
CPU_ISAS = ("scalar", "avx2", "avx512")

try:  # written by setup.py next to the binaries; absent in a tree setup.py never built
    from ppokernels._build_info import CUDA_MAJOR, TORCH_TARGET
except ImportError:
    CUDA_MAJOR, TORCH_TARGET = None, "2.11"

BINARY_NAME = {
    "cpu": f"ppokernels._C (stable ABI, torch >= {TORCH_TARGET})",
    "cuda": f"ppokernels._C_cuda (stable ABI, torch >= {TORCH_TARGET}"
    + (f", CUDA {CUDA_MAJOR})" if CUDA_MAJOR is not None else ")"),
}

_GET_CPU = (
    "install the binary wheel: pip install ppokernels-*-abi3-*.whl, or build from source: "
    "pip install --no-build-isolation . (without PPOKERNELS_BUILD_EXT=0)"
)
_GET_CUDA = (
    "install the binary wheel built for this torch's CUDA, or build from source with a CUDA "
    "build of torch and nvcc on PATH: PPOKERNELS_BUILD_CUDA=1 pip install --no-build-isolation ."
)


@dataclass(frozen=True)
class Binary:
    """One compiled binary: the module when loaded, else why not and how to get it."""

    module: ModuleType | None
    reason: str | None = None
    how: str = ""


def _binary_supports(torch_version: str) -> str | None:
    """Why the binaries cannot load into torch ``torch_version``, None when they can.

    Checked before the import: a binary built for the stable ABI of TORCH_TARGET needs symbols an
    older libtorch lacks, and the loader's "undefined symbol" would not say that torch is the cause.
    """
    if TorchVersion(torch_version) < TORCH_TARGET:
        return (
            f"torch {torch_version} is older than {TORCH_TARGET}, "
            "the oldest torch this binary supports"
        )
    return None


def _import(name: str) -> tuple[ModuleType | None, str | None]:
    """``ppokernels.<name>``, or None and the error that stopped it."""
    try:
        return importlib.import_module(f"ppokernels.{name}"), None
    # ImportError and OSError from the loader, and whatever a static initialiser raises (torch's
    # op registration raises RuntimeError): none of them may break `import ppokernels`.
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _load_cuda() -> tuple[Binary, str | None]:
    """``_C_cuda`` (after ``_C``, which defines the schemas its kernels register for), and the
    warning to give when a built one cannot load."""
    if torch.version.cuda is None:
        return Binary(None, f"torch {torch.__version__} is a CPU build", _GET_CUDA), None
    if importlib.util.find_spec("ppokernels._C_cuda") is None:
        return Binary(None, "not built (a CPU-only build)", _GET_CUDA), None
    major = int(torch.version.cuda.split(".")[0])
    # Compared before the import: a module built for another CUDA major would load a second CUDA
    # runtime next to torch's, or fail with a loader error that does not name the mismatch.
    if CUDA_MAJOR is not None and CUDA_MAJOR != major:
        reason = f"built for CUDA {CUDA_MAJOR}, torch {torch.__version__} uses CUDA {major}"
        how = (
            f"install a torch built for CUDA {CUDA_MAJOR}, or the ppokernels binary wheel built "
            f"for CUDA {major}, or build from source: "
            "PPOKERNELS_BUILD_CUDA=1 pip install --no-build-isolation ."
        )
    else:
        module, reason = _import("_C_cuda")
        if module is not None:
            return Binary(module), None
        how = _GET_CUDA
    warning = (
        f"the CUDA C++ kernels are not loaded: {reason}; CUDA tensors run on the Triton and "
        f"reference backends. To get them: {how}"
    )
    return Binary(None, reason, how), warning


def _load() -> tuple[Binary, Binary, str | None]:
    """``_C`` then ``_C_cuda``, and the one warning to give when something built is lost (None
    for a pure-Python install: no binary there is intended)."""
    no_ext = os.environ.get("PPOKERNELS_NO_EXT", "")
    if no_ext not in ("", "0"):
        skipped = Binary(
            None, f"skipped on purpose by PPOKERNELS_NO_EXT={no_ext}", "unset PPOKERNELS_NO_EXT"
        )
        warning = (
            f"the C++ kernels (CPU, and CUDA if built) are {skipped.reason}; ops run on the "
            "Triton and reference backends. To get them: unset PPOKERNELS_NO_EXT"
        )
        return skipped, skipped, warning
    if importlib.util.find_spec("ppokernels._C") is None:
        absent = Binary(None, "not built (pure-Python install)", _GET_CPU)
        return absent, absent, None
    reason = _binary_supports(torch.__version__)
    if reason is not None:
        how = f"upgrade torch: pip install 'torch>={TORCH_TARGET}'"
    else:
        module, reason = _import("_C")
        if module is not None:
            cuda, warning = _load_cuda()
            return Binary(module), cuda, warning
        how = _GET_CPU
    lost = Binary(None, reason, how)
    warning = (
        f"the C++ kernels (CPU, and CUDA if built) are not loaded: {reason}; ops run on the "
        f"Triton and reference backends. To get them: {how}"
    )
    return lost, lost, warning


_cpu_binary, _cuda_binary, _warning = _load()
BINARIES = {"cpu": _cpu_binary, "cuda": _cuda_binary}  # keyed like device types
if _warning is not None:
    warnings.warn(_warning, RuntimeWarning, stacklevel=2)
_C = _cpu_binary.module  # the schemas and the CPU kernels; None when not loaded


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
# time for sm_90 (wgmma in bf16, no register spills: tests/build/test_triton_audit.py), while
# the CUDA C++ linear_logprobs (cuBLAS GEMMs on chunks with fused epilogues) is compile-checked
# only; `backend="cpp"` runs it.
FASTEST_GPU: dict[str, str] = {}

TRITON_HINT = (
    "install triton (pip install triton); on CPU tensors Triton runs only with "
    "TRITON_INTERPRET=1 set before ppokernels is imported"
)


class BackendUnavailable(RuntimeError):
    """A backend was asked for that is not built or cannot run on the given device."""


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _registered(key: str) -> frozenset[str]:
    names = torch._C._dispatch_get_registrations_for_dispatch_key(key)
    return frozenset(n.split("::")[1] for n in names if n.startswith("ppokernels::"))


# Ops with a C++ kernel per device type, read once at import (not while torch.compile traces).
# Only from a loaded binary: one whose static initialiser failed may have registered some kernels.
CPP_KERNELS = {
    side: _registered(key)
    for side, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if BINARIES[side].module is not None
}


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


# Read once, at import: an environment lookup costs about 0.5 us, paid by every op call.
BACKEND_OVERRIDE = os.environ.get("PPOKERNELS_BACKEND") or None


def requested(backend: str = "auto") -> str:
    """The backend asked for: ``backend``, with ``auto`` replaced by PPOKERNELS_BACKEND when it
    was set at import (not checked; :func:`choose` checks it and resolves ``auto``)."""
    if backend == "auto":
        return BACKEND_OVERRIDE or "auto"
    return backend


def choose(
    op: str, device: torch.device, backend: str = "auto", dtype: torch.dtype | None = None
) -> str:
    """Backend that runs ``op`` on ``device`` (inputs of ``dtype``): "cpp", "triton" or
    "reference"."""
    backend = requested(backend)
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
        binary = BINARIES["cuda" if dev == "cuda" else "cpu"]
        if binary.module is not None:
            raise BackendUnavailable(f"{op}: ppokernels has no C++ kernel for {dev} tensors")
        raise BackendUnavailable(
            f"{op}: the C++ kernel for {dev} tensors is not loaded ({binary.reason}); "
            f"to get it: {binary.how}"
        )
    if backend == "triton" and not has_triton(dev):
        raise BackendUnavailable(
            f"{op}: the Triton backend cannot run on {dev} tensors; {TRITON_HINT}"
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
        "binary_cpu": BINARY_NAME["cpu"] if _C is not None else None,
        "binary_cpu_reason": BINARIES["cpu"].reason,
        "binary_cuda": BINARY_NAME["cuda"] if BINARIES["cuda"].module is not None else None,
        "binary_cuda_reason": BINARIES["cuda"].reason,
        "binary_torch_range": f">= {TORCH_TARGET}",
        "cpp_cpu_kernels": has_cpp("cpu"),
        "cpp_cuda_kernels": has_cpp("cuda"),
        "cpu_isa": cpu_isa(),
        "cuda_available": torch.cuda.is_available(),
        "triton_interpreter": interpreting(),
        "backend_override": BACKEND_OVERRIDE,
    }
