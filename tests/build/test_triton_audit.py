"""Static sm_90 audit of the Triton GEMM kernels (no GPU needed).

Every kernel whose module uses ``tl.dot`` is compiled for sm_90 with the runtime launch options
(its module's ``AOT`` table) and must contain a dot; in bf16 (the training dtype) each must
issue Hopper's ``wgmma`` and must not spill registers. Registers, stack (spill) bytes and shared
memory of every such kernel, all dtypes, are reported in the test's output (``pytest -rA``) and
as the ``sm90_usage`` property of the junit XML.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def sm90_gemm_kernels() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "_triton_aot.py")
    proc = subprocess.run(
        [sys.executable, script, "90", "--dot-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failed"], "\n".join(result["failed"])
    assert result["kernels"], "no kernel with tl.dot found"
    return result["kernels"]


def _table(kernels: dict) -> str:
    rows = [f"{'kernel (sm_90)':<100} {'regs':>5} {'spill B':>7} {'smem B':>7} warps stages wgmma"]
    for name, k in sorted(kernels.items()):
        short = name.split("._linear_logprobs_kernels.")[-1].split("triton.")[-1]
        rows.append(
            f"{short[:100]:<100} {k['n_regs']!s:>5} {k['n_spills']!s:>7} {k['shared']:>7} "
            f"{k['num_warps']:>5} {k['num_stages']:>6} {k['wgmma']!s:>5}"
        )
    return "\n".join(rows)


def test_sm90_usage_report(sm90_gemm_kernels, record_property):
    report = _table(sm90_gemm_kernels)
    record_property("sm90_usage", report)
    print(report)  # shown with -rA
    assert all(k["n_regs"] is not None for k in sm90_gemm_kernels.values()), (
        "cuobjdump (triton/backends/nvidia/bin) gave no resource usage"
    )


def test_bf16_gemm_kernels_use_wgmma_without_spills(sm90_gemm_kernels):
    bf16 = {n: k for n, k in sm90_gemm_kernels.items() if "[bf16]" in n}
    assert bf16, "no bf16 configuration of the GEMM kernels"
    for name, k in bf16.items():
        assert k["has_dot"], f"{name}: no tt.dot after inlining"
        assert k["wgmma"], f"{name}: no wgmma in the sm_90 PTX"
        assert k["n_spills"] == 0, f"{name}: {k['n_spills']} bytes of register spills"
