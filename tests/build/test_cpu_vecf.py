"""Our SIMD math (csrc/include/ppokernels/cpu_vecf.h, which replaced ATen's at::vec and SLEEF when
the extension moved to the stable ABI) against the C library, at every ISA level this CPU runs:
exp and log within 2 ulp, log1p within 3, over a sweep of fp32 values with the special values in
their right class (inf, NaN, 0, subnormals), and bf16 / fp16 stores rounding exactly as torch's
scalar conversions. The C++ driver is tests/build/cpp/vecf_math.cpp, compiled here with g++."""

import os
import shutil
import subprocess

import pytest

from .test_cpu_isa import expected_levels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = {  # setup.py CPU_LEVELS
    "scalar": ("DEFAULT", []),
    "avx2": ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    "avx512": (
        "AVX512",
        ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"],
    ),
}


@pytest.fixture(scope="module")
def torch_include():
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


@pytest.mark.parametrize("level", expected_levels())
def test_math_within_2_ulp(level, torch_include, tmp_path):
    assert shutil.which("g++"), "g++ is needed to compile the SIMD math check"
    cap, flags = FLAGS[level]
    exe = str(tmp_path / "vecf")
    cmd = [
        "g++",
        "-O2",
        "-std=c++17",
        *flags,
        f"-DCPU_CAPABILITY={cap}",
        f"-DCPU_CAPABILITY_{cap}",
        "-DTORCH_TARGET_VERSION=0x020b000000000000",
        f"-I{ROOT}/csrc/include",
        *torch_include,
        os.path.join(ROOT, "tests", "build", "cpp", "vecf_math.cpp"),
        "-o",
        exe,
    ]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    worst = {ln.split()[0]: float(ln.split()[1]) for ln in run.stdout.splitlines()}
    assert worst.keys() == {"exp", "log", "log1p", "half_roundtrip_mismatches"}, run.stdout
    for fn, bound in (("exp", 2.0), ("log", 2.0), ("log1p", 3.0)):
        assert worst[fn] <= bound, f"{level} {fn}: {run.stdout}"
    assert worst["half_roundtrip_mismatches"] == 0, run.stdout
