"""Build of the ``ppokernels._C`` extension.

Environment knobs:
  PPOKERNELS_BUILD_EXT=0       pure-Python install (reference and Triton backends only)
  PPOKERNELS_BUILD_CUDA=auto   auto: build csrc/cuda when torch is a CUDA build and nvcc is found;
                               1: require it (error if impossible); 0: CPU kernels only
  PPOKERNELS_CUDA_ARCHS="8.0;9.0"  compute capabilities for the CUDA kernels (replaces any
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


def _want_cuda(torch, cuda_home):
    mode = os.environ.get("PPOKERNELS_BUILD_CUDA", "auto").lower()
    possible = torch.version.cuda is not None and cuda_home is not None
    if mode in ("0", "false", "off"):
        return False
    if mode in ("1", "true", "on"):
        if not possible:
            raise RuntimeError(
                "PPOKERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}. "
                "Install a CUDA build of torch and the CUDA toolkit (nvcc)."
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


def extensions():
    if os.environ.get("PPOKERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # the levels compiled in, for csrc/cpu_isa.cpp
    have = [f"-DPPK_CPU_HAVE_{CPU_LEVELS[lv][0]}" for lv in _cpu_levels() if lv != "scalar"]
    cxx = opt + ["-fopenmp", "-DPy_LIMITED_API=0x030A0000", *have]
    sources = [
        "csrc/ops.cpp",
        "csrc/cpu_isa.cpp",
        *sorted(glob.glob(os.path.join(CPU_KERNELS, "*.cpp"), root_dir=ROOT)),
    ]
    include = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(include_dirs=include, py_limited_api=True, extra_link_args=["-fopenmp"])
    if _want_cuda(torch, CUDA_HOME):
        archs = os.environ.get("PPOKERNELS_CUDA_ARCHS", "8.0;9.0")
        # set, not setdefault: an image's own TORCH_CUDA_ARCH_LIST would otherwise win (more
        # architectures, a longer build, or ones this nvcc rejects)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
        nvcc = opt + ["-lineinfo", "-DPPK_WITH_CUDA"]
        ext = CUDAExtension(
            "ppokernels._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DPPK_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = CppExtension("ppokernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


ext_modules, cmdclass = extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
