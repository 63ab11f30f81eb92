"""Every Triton kernel configuration compiles to sm_80 and sm_90 cubin (ahead of time, no GPU).

The configurations are the kernel modules' ``AOT`` tables: every input dtype each op accepts
(fp32, fp64, bf16, fp16), every constexpr switch, and the runtime launch's ``num_warps`` /
``num_stages`` (the launchers read the same tables, so the two cannot drift).
"""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

STEMS = (
    "token_logprobs",
    "linear_logprobs",
    "kl_penalty",
    "ppo_policy_loss",
    "value_loss",
    "gae",
    "masked_whiten",
    "group_advantages",
    "rollout_correction",
)


def _aot(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "_triton_aot.py")
    proc = subprocess.run(
        [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=3000
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_aot_tables_cover_every_dtype_and_module():
    from ppokernels.triton import MODULES

    for name in MODULES:
        table = importlib.import_module(name).AOT
        kernels = {spec.kernel for spec in table}
        assert kernels, name
        for kernel in kernels:
            specs = [spec for spec in table if spec.kernel is kernel]
            dtypes = {spec.dtype for spec in specs}
            # finalize kernels read accumulator-dtype partials only: fp32 and fp64; one whose
            # pointers are fp64 whatever the input dtype has a single signature to compile
            typed = any(
                "*fp32" in str(spec.signature) or "*bf16" in str(spec.signature) for spec in specs
            )
            if "finalize" in kernel.fn.__name__:
                want = {"fp32", "fp64"} if typed else {"fp32"}
            else:
                want = {"fp32", "fp64", "bf16", "fp16"}
            assert want <= dtypes, (kernel.fn.__name__, dtypes)
            # kernel names: _<stem>_<role>_kernel
            stem = max((s for s in STEMS if name.split(".")[-1].startswith(s)), key=len)
            assert re.fullmatch(rf"_{stem}_[a-z0-9_]+_kernel", kernel.fn.__name__), kernel


def test_triton_kernels_compile_for_sm80_sm90():
    # _triton_aot.py asserts that each cubin has the spec's (= the launch's) num_warps/num_stages
    result = _aot("80", "90")
    assert not result["failed"], "\n".join(result["failed"])
    assert len(result["compiled"]) >= 2 * 100, len(result["compiled"])
