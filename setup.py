"""Build of the binary modules ``ppokernels._C`` (schemas and CPU kernels) and
``ppokernels._C_cuda`` (CUDA kernels), both on the LibTorch stable ABI.

Both are compiled with -DTORCH_TARGET_VERSION = 2.11 and the Python limited API (abi3, cp311), so
one binary wheel loads on every torch from 2.11 on and every CPython from 3.11 on: the binaries
use only torch/csrc/stable, torch/headeronly and the C shim (tests/build/test_binary_abi.py checks
that no at::, c10:: or torch:: C++ symbol is undefined in them).

Environment knobs:
  PPOKERNELS_BUILD_EXT=0       pure-Python install (reference and Triton backends only)
  PPOKERNELS_BUILD_CUDA=auto   auto: build _C_cuda when torch is a CUDA build and nvcc is found;
                               1: require it (error if impossible); 0: CPU kernels only
  PPOKERNELS_CUDA_ARCHS="8.0;9.0;10.0;12.0+PTX"  compute capabilities of _C_cuda (replaces any
                               TORCH_CUDA_ARCH_LIST in the environment)
  MAX_JOBS                     parallel compile jobs (honoured by torch's ninja build)
  DEBUG=1                      -O0 -g

The CPU kernels (csrc/cpu/*.cpp) are compiled once per ISA level into the one extension, whatever
the build machine (CPU_LEVELS below; on x86-64 scalar, avx2 and avx512, elsewhere scalar), and the
level is chosen when the extension is loaded, from the CPU it runs on (csrc/cpu_isa.cpp).
PPOKERNELS_CPU_ISA=scalar|avx2|avx512 at run time forces a lower level than the CPU supports.
"""

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The oldest torch the binaries load on: the stable ABI's target version (0xMMmm000000000000).
TORCH_TARGET = (2, 11)
TORCH_TARGET_FLAG = (
    f"-DTORCH_TARGET_VERSION=0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"
)
# The oldest CPython of the abi3 binaries (Py_LIMITED_API and the wheel's cp311-abi3 tag).
PY_LIMITED = "cp311"
PY_LIMITED_FLAG = "-DPy_LIMITED_API=0x030B0000"
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"


def _is_toolkit(cuda_home) -> bool:
    """Whether cuda_home is a CUDA toolkit (nvcc and the runtime headers), not merely the prefix of
    an nvcc wrapper script (torch takes /usr/local for /usr/local/bin/nvcc)."""
    return cuda_home is not None and all(
        os.path.exists(os.path.join(cuda_home, p))
        for p in (os.path.join("bin", "nvcc"), os.path.join("include", "cuda_runtime.h"))
    )


def _want_cuda(torch, cuda_home):
    mode = os.environ.get("PPOKERNELS_BUILD_CUDA", "auto").lower()
    possible = torch.version.cuda is not None and _is_toolkit(cuda_home)
    if mode in ("0", "false", "off"):
        return False
    if mode in ("1", "true", "on"):
        if not possible:
            raise RuntimeError(
                "PPOKERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r} "
                "(a toolkit has bin/nvcc and include/cuda_runtime.h). Install a CUDA build of "
                "torch and the CUDA toolkit, and set CUDA_HOME to the toolkit (/usr/local/cuda)."
            )
        return True
    if mode != "auto":
        raise RuntimeError(f"PPOKERNELS_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return possible


# ISA levels of the CPU kernels: name (as PPOKERNELS_CPU_ISA spells it) -> ATen's CPU_CAPABILITY
# and the compiler flags (ATen's own per-level flags). ppokernels/cpu_isa.h has the scheme.
CPU_LEVELS = {
    "scalar": ("DEFAULT", []),
    "avx2": ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    "avx512": (
        "AVX512",
        ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"],
    ),
}
CPU_KERNELS = os.path.join("csrc", "cpu")


def _cpu_levels() -> list[str]:
    """The levels built: all of them for x86-64 (the build machine's own CPU does not matter)."""
    return list(CPU_LEVELS) if platform.machine() in ("x86_64", "AMD64") else ["scalar"]


def _is_cpu_kernel(source: str) -> bool:
    return os.path.relpath(os.path.dirname(os.path.abspath(source)), ROOT) == CPU_KERNELS


def _level_args(extra_postargs, level: str):
    """The compile flags of one level: the extension's C++ flags plus the level's."""
    capability, flags = CPU_LEVELS[level]
    add = [*flags, f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    if isinstance(extra_postargs, dict):
        return {**extra_postargs, "cxx": list(extra_postargs["cxx"]) + add}
    return list(extra_postargs or []) + add


def _build_ext_class(base):
    """``base`` (torch's BuildExtension) compiling each CPU kernel source once per level.

    setuptools compiles every source of an extension with the same flags, so the kernel sources
    go through the compiler (torch's ninja wrapper) once more per level, each level in its own
    build folder (its own build.ninja: incremental builds keep working). The objects of the
    other sources and of the scalar level come first in the link: the linker keeps the first copy
    of an inline function, so code that runs on any CPU never gets a copy compiled for AVX."""

    class IsaBuildExt(base):
        def build_extension(self, ext):
            compile_once = self.compiler.compile

            def compile_per_level(sources, output_dir=None, extra_postargs=None, **kw):
                kernels = [s for s in sources if _is_cpu_kernel(s)]
                others = [s for s in sources if s not in kernels]
                objects = compile_once(
                    others, output_dir=output_dir, extra_postargs=extra_postargs, **kw
                )
                for level in _cpu_levels() if kernels else []:
                    objects += compile_once(
                        kernels,
                        output_dir=os.path.join(output_dir, "cpu_" + level),
                        extra_postargs=_level_args(extra_postargs, level),
                        **kw,
                    )
                return objects

            self.compiler.compile = compile_per_level
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_once

    return IsaBuildExt


def _cudart_dir(cuda_home: str) -> str:
    """The folder of the toolkit's libcudart.so: torch adds CUDA_HOME/lib64, but toolkits lay it out
    as lib64, lib or targets/<arch>-linux/lib. At run time the process already has torch's own
    libcudart.so.<major> loaded (the soname is what the loader matches)."""
    for sub in ("lib64", "lib", os.path.join("targets", f"{platform.machine()}-linux", "lib")):
        if glob.glob(os.path.join(cuda_home, sub, "libcudart.so*")):
            return os.path.join(cuda_home, sub)
    raise RuntimeError(f"PPOKERNELS_BUILD_CUDA: no libcudart.so under {cuda_home}")


def _write_build_info(cuda_major: int | None) -> None:
    """ppokernels/_build_info.py: what the binaries were built for, read by ppokernels/_backend.py
    before it imports them (a _C_cuda for another CUDA major is never imported)."""
    text = (
        '"""Written by setup.py: what the binary modules were built for."""\n\n'
        f'TORCH_TARGET = "{TORCH_TARGET[0]}.{TORCH_TARGET[1]}"\n'
        f"CUDA_MAJOR = {cuda_major!r}\n"
    )
    with open(os.path.join(ROOT, "ppokernels", "_build_info.py"), "w") as f:
        f.write(text)


def extensions():
    if os.environ.get("PPOKERNELS_BUILD_EXT", "1") == "0":
        _write_build_info(None)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # Python's own CFLAGS bring -g: the debug sections were 94% of _C (35 of 37 MB)
    link = [] if debug else ["-Wl,--strip-debug"]
    stable = [TORCH_TARGET_FLAG, PY_LIMITED_FLAG]
    # the levels compiled in, for csrc/cpu_isa.cpp
    have = [f"-DPPK_CPU_HAVE_{CPU_LEVELS[lv][0]}" for lv in _cpu_levels() if lv != "scalar"]
    include = [os.path.join(ROOT, "csrc", "include")]
    cpu_sources = [
        "csrc/ops.cpp",
        "csrc/cpu_isa.cpp",
        *sorted(glob.glob(os.path.join(CPU_KERNELS, "*.cpp"), root_dir=ROOT)),
    ]
    exts = [
        CppExtension(
            "ppokernels._C",
            cpu_sources,
            include_dirs=include,
            py_limited_api=True,
            extra_compile_args={"cxx": opt + stable + have},
            extra_link_args=link,
        )
    ]
    cuda_major = None
    if _want_cuda(torch, CUDA_HOME):
        archs = os.environ.get("PPOKERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        # set, not setdefault: an image's own TORCH_CUDA_ARCH_LIST would otherwise win (more
        # architectures, a longer build, or ones this nvcc rejects)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cuda_major = int(torch.version.cuda.split(".")[0])
        defs = [*stable, "-DUSE_CUDA", f"-DPPK_CUDA_MAJOR={cuda_major}"]
        exts.append(
            CUDAExtension(
                "ppokernels._C_cuda",
                ["csrc/cuda_module.cpp", *sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))],
                include_dirs=include,
                library_dirs=[_cudart_dir(CUDA_HOME)],
                py_limited_api=True,
                extra_compile_args={"cxx": opt + defs, "nvcc": opt + ["-lineinfo", *defs]},
                extra_link_args=link,
            )
        )
    _write_build_info(cuda_major)
    return exts, {"build_ext": _build_ext_class(BuildExtension)}


ext_modules, cmdclass = extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED}} if ext_modules else {},
)
