"""The binary modules are built on the LibTorch stable ABI (setup.py, csrc/include/ppokernels/
stable.h): abi3 files that refer to no C++ symbol of at::, c10:: or torch:: (only the C shim and
header-only code), so one binary loads on every torch from 2.11 on. Read off the loaded files."""

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

import ppokernels
from ppokernels import _backend
from ppokernels.testing import binary_skip_reason

if binary_skip_reason():
    pytest.skip(binary_skip_reason(), allow_module_level=True)

UNSTABLE = re.compile(r"\b(at|c10|torch|caffe2)::")


def _binaries() -> list[str]:
    """The files of the binary modules that are present (_C always, _C_cuda in CUDA builds)."""
    out = []
    for name in ("ppokernels._C", "ppokernels._C_cuda"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            out.append(spec.origin)
    return out


def test_cpu_binary_loaded_and_reported():
    facts = ppokernels.info()
    assert facts["binary_cpu"] and "stable ABI" in facts["binary_cpu"]
    assert facts["binary_cpu_reason"] is None
    assert facts["cpu_isa"] in _backend.CPU_ISAS
    assert facts["cpp_cpu_kernels"]


@pytest.mark.parametrize("path", _binaries(), ids=os.path.basename)
def test_abi3_file_name(path):
    assert path.endswith(".abi3.so"), path


@pytest.mark.parametrize("path", _binaries(), ids=os.path.basename)
def test_no_unstable_torch_symbols(path):
    assert shutil.which("nm"), "nm (binutils) is needed to read the binary"
    nm = subprocess.run(
        ["nm", "-D", "-C", "--undefined-only", path], capture_output=True, text=True, check=True
    )
    unstable = [ln.split()[-1] for ln in nm.stdout.splitlines() if UNSTABLE.search(ln)]
    assert not unstable, f"{os.path.basename(path)} needs unstable torch symbols: {unstable[:20]}"
    # and it does use the stable C shim (a sanity check that nm read the right file)
    assert "aoti_torch_" in nm.stdout or "torch_call_dispatcher" in nm.stdout
