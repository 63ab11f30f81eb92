"""Runtime ISA dispatch of the CPU kernels (csrc/include/ppokernels/cpu_isa.h): the level comes
from the running CPU, PPOKERNELS_CPU_ISA forces a lower one, every level the machine supports
gives the same results within fp32 rounding (and matches the fp64 reference), and the build put
the right instructions in each level's copy."""

import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from ppokernels import _backend
from ppokernels.testing import TOL, binary_skip_reason

from . import _cpu_isa_cases as cases

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

X86 = platform.machine() in ("x86_64", "AMD64")
if binary_skip_reason():
    pytest.skip(binary_skip_reason(), allow_module_level=True)


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return {w for line in f if line.startswith("flags") for w in line.split()}


def expected_levels() -> list[str]:
    """The levels this CPU supports, read from /proc/cpuinfo (not from the extension)."""
    if not X86:
        return ["scalar"]
    flags = _cpu_flags()
    levels = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            levels.append("avx512")
    return levels


def _run(args, isa, **kw):
    env = dict(os.environ, PPOKERNELS_CPU_ISA=isa, PPOKERNELS_BACKEND="")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, **kw
    )


def test_best_level_by_default():
    from ppokernels import _C

    best = expected_levels()[-1]
    assert _C.cpu_isa_supported() == best
    if not os.environ.get("PPOKERNELS_CPU_ISA"):
        assert _backend.cpu_isa() == best


@pytest.mark.parametrize("isa", ["", *expected_levels()])
def test_info_json_reports_level(isa):
    r = _run(["-m", "ppokernels.cli", "info", "--json"], isa, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cpu_isa"] == (isa or expected_levels()[-1])
    assert "PPOKERNELS_CPU_ISA" not in r.stderr  # a supported level: no warning


@pytest.mark.parametrize("value", ["avx9000", "AVX2", "sse"])
def test_unknown_level_is_a_clear_error(value):
    r = _run(["-c", "import ppokernels"], value, timeout=300)
    assert r.returncode != 0
    assert "PPOKERNELS_CPU_ISA" in r.stderr and repr(value) in r.stderr, r.stderr
    assert "scalar, avx2, avx512" in r.stderr


def test_level_above_the_cpu_warns_and_falls_back():
    above = {"scalar": "avx2", "avx2": "avx512"}.get(expected_levels()[-1])
    if above is None:  # this CPU has the top level: nothing is above it, check the top instead
        r = _run(["-W", "error", "-c", "import ppokernels"], "avx512", timeout=300)
        assert r.returncode == 0, r.stderr
        return
    r = _run(["-m", "ppokernels.cli", "info", "--json"], above, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "PPOKERNELS_CPU_ISA" in r.stderr
    assert json.loads(r.stdout)["cpu_isa"] == expected_levels()[-1]


def test_stems_list_matches_the_sources():
    """csrc/include/ppokernels/cpu_isa.h registers the stems it lists: every kernel source."""
    with open(os.path.join(ROOT, "csrc", "include", "ppokernels", "cpu_isa.h")) as f:
        header = f.read()
    listed = re.findall(r"^\s*X\((\w+)\)", header, flags=re.M)
    sources = sorted(
        os.path.basename(p)[:-4] for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    assert sorted(listed) == sources


@pytest.fixture(scope="module")
def per_level(tmp_path_factory):
    """The cases' results in a fresh process per supported level."""
    d = tmp_path_factory.mktemp("isa")
    torch.save(cases.inputs(), d / "in.pt")
    out = {}
    for isa in expected_levels():
        r = _run(
            [
                os.path.join(ROOT, "tests", "build", "_cpu_isa_cases.py"),
                str(d / "in.pt"),
                str(d / f"{isa}.pt"),
            ],
            isa,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        out[isa] = torch.load(d / f"{isa}.pt")
        assert out[isa].pop("cpu_isa") == isa
    return out


def test_levels_agree_and_match_the_reference(per_level):
    x64 = {k: (v.double() if v.is_floating_point() else v) for k, v in cases.inputs().items()}
    ref = cases.run(x64, "reference")
    levels = list(per_level)
    first = per_level[levels[0]]
    assert first.keys() == ref.keys()
    for key, want in ref.items():
        # absolute tolerances relative to the largest entry (long scans, sums over rows)
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        for isa in levels:
            got = per_level[isa][key]
            assert got.dtype == torch.float32, (isa, key)
            torch.testing.assert_close(
                got.double(),
                want,
                rtol=TOL[torch.float32]["rtol"],
                atol=TOL[torch.float32]["atol"] * scale,
                msg=lambda m, w=f"{isa} {key}": f"{w}: {m}",
            )
            # the levels differ only in summation order and exp/log rounding
            torch.testing.assert_close(
                got,
                first[key],
                rtol=1e-5,
                atol=1e-6 * scale,
                msg=lambda m, w=f"{isa} vs {levels[0]} {key}": f"{w}: {m}",
            )


def _functions(so: str) -> dict[str, str]:
    """Disassembly of the extension, per function (demangled name -> its instructions)."""
    text = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", so],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    funcs, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            funcs[name] = ""
        elif name is not None:
            funcs[name] += line + "\n"
    return funcs


def test_each_level_has_its_own_instructions():
    """The scalar copy and the loader use no AVX (they run on any x86-64 CPU); the AVX2 copy uses
    256-bit registers and no AVX-512; the AVX-512 copy uses 512-bit registers."""
    from ppokernels import _C

    if not X86:
        assert _C.cpu_isa_supported() == "scalar"
        return
    assert shutil.which("objdump"), "objdump (binutils) is needed to read the extension"
    funcs = _functions(_C.__file__)
    vex = re.compile(r"\t(v[a-z0-9]+)\s|%[yz]mm")

    def code(pattern):
        return "".join(body for n, body in funcs.items() if re.search(pattern, n))

    baseline = code(
        r"ppokernels::DEFAULT::|^ppokernels::cpu_isa|^ppokernels::\(anonymous namespace\)"
    )
    assert "register_kl" in "".join(funcs) and baseline
    assert not vex.search(baseline), vex.search(baseline)
    avx2 = code(r"ppokernels::AVX2::")
    assert "%ymm" in avx2 and "%zmm" not in avx2
    assert "%zmm" in code(r"ppokernels::AVX512::")
