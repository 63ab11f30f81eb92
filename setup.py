"""Build of the ``ppokernels._C`` extension.

Environment knobs:
  PPOKERNELS_BUILD_EXT=0       pure-Python install (reference and Triton backends only)
  PPOKERNELS_BUILD_CUDA=auto   auto: build csrc/cuda when torch is a CUDA build and nvcc is found;
                               1: require it (error if impossible); 0: CPU kernels only
  PPOKERNELS_CUDA_ARCHS="8.0;9.0"  compute capabilities for the CUDA kernels (replaces any
                               TORCH_CUDA_ARCH_LIST in the environment)
  MAX_JOBS                     parallel compile jobs (honoured by torch's ninja build)
  PPOKERNELS_CPU_SIMD=auto     auto: AVX2 + FMA for the CPU kernels when the build machine has
                               them (ATen's AVX2 Vectorized, SLEEF's vector exp/log); 0: none
  DEBUG=1                      -O0 -g
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


def _simd_flags():
    """Flags that select ATen's AVX2 Vectorized<float> (csrc/include/ppokernels/cpu_vec.h).

    The kernels then need an AVX2 CPU at run time, so this is only on when the build machine has
    AVX2, FMA and F16C (a local build runs where it was built)."""
    mode = os.environ.get("PPOKERNELS_CPU_SIMD", "auto").lower()
    if mode in ("0", "off", "false") or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def extensions():
    if os.environ.get("PPOKERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-DPy_LIMITED_API=0x030A0000", *_simd_flags()]
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))]
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
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
