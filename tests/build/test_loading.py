"""Loading of the compiled binaries (ppokernels/_backend.py): a binary that cannot load, one
skipped by PPOKERNELS_NO_EXT=1 and one never built all leave `import ppokernels` working, with
every op on the reference backend on CPU tensors. The first two warn exactly once and say why;
the pure-Python install is intended and stays quiet. Each case runs in a fresh interpreter,
since loading happens once, at import."""

import glob
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import ppokernels
from ppokernels import _backend

# The folder holding the ppokernels under test: the source tree, or site-packages when the tests
# run against an installed wheel (.ci/wheels.sh).
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(ppokernels.__file__)))

# Imports ppokernels recording the warnings of that import alone (torch, and triton where it is
# installed, are imported first, so their own warnings are not counted), runs every public op on
# small CPU tensors against ppokernels.reference, asks for backend="cpp", and prints a JSON line.
SCRIPT = r"""
import importlib.util, json, sys, warnings
# an editable install's finder maps ppokernels._C to the source tree whatever package is imported:
# drop it, so that the binaries found are those beside the ppokernels in cwd
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import torch
if importlib.util.find_spec("triton") is not None:
    import triton
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ppokernels
from ppokernels import _backend, reference

g = torch.Generator().manual_seed(0)
B, T, H, V = 3, 8, 4, 11
x, lp, old, adv, values, rewards = torch.randn(6, B, T, generator=g, dtype=torch.float64)
mask = torch.rand(B, T, generator=g) > 0.2
logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
labels = torch.randint(0, V, (B, T), generator=g)
hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
weight = torch.randn(V, H, generator=g, dtype=torch.float64)
scores, group = torch.randn(6, generator=g, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1])
calls = {
    "kl_penalty": lambda m: m.kl_penalty(lp, old),
    "discounted_returns": lambda m: m.discounted_returns(rewards, mask, gamma=0.9),
    "gae": lambda m: m.gae(rewards, values, mask, gamma=0.9, lam=0.95),
    "group_advantages": lambda m: m.group_advantages(scores, group),
    "masked_mean": lambda m: m.masked_mean(x, mask),
    "masked_var": lambda m: m.masked_var(x, mask),
    "masked_whiten": lambda m: m.masked_whiten(x, mask),
    "token_logprobs": lambda m: m.token_logprobs(logits, labels, with_entropy=True),
    "linear_logprobs": lambda m: m.linear_logprobs(hidden, weight, labels),
    "ppo_policy_loss": lambda m: m.ppo_policy_loss(lp, old, adv, mask),
    "value_loss": lambda m: m.value_loss(values, old, rewards, mask, clip=0.2),
    "rollout_correction": lambda m: m.rollout_correction(lp, old, mask, bounds=(0.5, 2.0)),
}
ran = {}
for name, call in calls.items():
    torch.testing.assert_close(call(ppokernels), call(reference))
    ran[name] = _backend.choose(name, torch.device("cpu"))
logp = reference.linear_logprobs(hidden, weight, labels)[0]
torch.testing.assert_close(
    ppokernels.linear_ppo_policy_loss(hidden, weight, labels, old, adv, mask),
    reference.ppo_policy_loss(logp, old, adv, mask),
)
ran["linear_ppo_policy_loss"] = _backend.choose("ppo_policy_loss", torch.device("cpu"))
try:
    ppokernels.kl_penalty(lp, old, backend="cpp")
    cpp_error = None
except ppokernels.BackendUnavailable as e:
    cpp_error = str(e)
print(json.dumps({
    "file": ppokernels.__file__,
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    "info": ppokernels.info(),
    "ran": ran,
    "cpp_error": cpp_error,
}))
"""

# Every public op (the functions of ppokernels.__all__ but info): the script must run them all.
PUBLIC_OPS = {
    name
    for name in ppokernels.__all__
    if name != "info" and inspect.isfunction(getattr(ppokernels, name))
}


def _run(path: str = PKG_PARENT, **env: str) -> dict:
    """SCRIPT in a fresh interpreter with ``path`` first on PYTHONPATH and in cwd (so that the
    ppokernels found is the one in ``path``), the loading variables unset unless given."""
    clean = ("PPOKERNELS_NO_EXT", "PPOKERNELS_BACKEND", "PPOKERNELS_CPU_ISA")
    full = {k: v for k, v in os.environ.items() if k not in clean} | env
    full["PYTHONPATH"] = os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", SCRIPT]
    r = subprocess.run(cmd, env=full, cwd=path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["file"].startswith(os.path.join(path, "ppokernels")), out["file"]
    return out


def _copy_package(dst: str) -> str:
    """A copy of the ppokernels package under ``dst`` without any compiled ``_C*`` binary."""
    shutil.copytree(
        os.path.join(PKG_PARENT, "ppokernels"),
        os.path.join(dst, "ppokernels"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for f in glob.glob(os.path.join(dst, "ppokernels", "_C*")):
        os.remove(f)
    return dst


def _assert_on_reference(out: dict) -> None:
    assert set(out["ran"]) == PUBLIC_OPS
    assert set(out["ran"].values()) == {"reference"}, out["ran"]
    info = out["info"]
    assert info["binary_cpu"] is None and info["binary_cuda"] is None
    assert not info["cpp_cpu_kernels"] and not info["cpp_cuda_kernels"]
    assert info["cpu_isa"] is None


def test_no_ext_skips_the_binaries_and_says_so():
    out = _run(PPOKERNELS_NO_EXT="1")
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "PPOKERNELS_NO_EXT=1" in out["warnings"][0]
    assert "Triton and reference" in out["warnings"][0]
    reason = "skipped on purpose by PPOKERNELS_NO_EXT=1"
    assert out["info"]["binary_cpu_reason"] == reason
    assert out["info"]["binary_cuda_reason"] == reason
    _assert_on_reference(out)
    assert "PPOKERNELS_NO_EXT" in out["cpp_error"] and "unset" in out["cpp_error"]


def test_broken_binary_warns_once_and_falls_back(tmp_path):
    path = _copy_package(str(tmp_path))
    with open(os.path.join(path, "ppokernels", "_C.abi3.so"), "wb") as f:
        f.write(b"not an ELF file, " * 64)
    out = _run(path)
    assert len(out["warnings"]) == 1, out["warnings"]
    warning = out["warnings"][0]
    assert "not loaded" in warning and "_C.abi3.so" in warning, warning
    assert "Triton and reference" in warning and "pip install" in warning
    reason = out["info"]["binary_cpu_reason"]
    assert reason.startswith("ImportError: ") and "_C.abi3.so" in reason, reason
    assert out["info"]["binary_cuda_reason"] == reason  # _C_cuda needs _C's schemas
    _assert_on_reference(out)
    assert reason in out["cpp_error"] and "pip install" in out["cpp_error"]


def test_pure_python_install_is_quiet(tmp_path):
    out = _run(_copy_package(str(tmp_path)))
    assert out["warnings"] == []
    assert out["info"]["binary_cpu_reason"] == "not built (pure-Python install)"
    assert out["info"]["binary_cuda_reason"] == "not built (pure-Python install)"
    assert out["info"]["binary_torch_range"] == f">= {_backend.TORCH_TARGET}"
    _assert_on_reference(out)
    assert "not built" in out["cpp_error"] and "pip install" in out["cpp_error"]


@pytest.mark.parametrize(
    "version, supported",
    [
        ("2.10.0", False),
        ("2.10.1+cu128", False),
        ("2.11.0", True),
        ("2.11.0+cu130", True),
        ("2.12.0a0+git123", True),
        ("2.15.0", True),
    ],
)
def test_binary_supports(monkeypatch, version, supported):
    monkeypatch.setattr(_backend, "TORCH_TARGET", "2.11")
    reason = _backend._binary_supports(version)
    if supported:
        assert reason is None
    else:
        assert reason == (
            f"torch {version} is older than 2.11, the oldest torch this binary supports"
        )


def test_info_names_the_binaries():
    info = _backend.info()
    for side in ("cpu", "cuda"):
        loaded = _backend.BINARIES[side].module is not None
        assert (info[f"binary_{side}"] is not None) == loaded
        assert (info[f"binary_{side}_reason"] is None) == loaded
    if info["binary_cpu"] is not None:
        assert info["binary_cpu"] == f"ppokernels._C (stable ABI, torch >= {_backend.TORCH_TARGET})"
    assert info["binary_torch_range"] == f">= {_backend.TORCH_TARGET}"


def _load_cuda(monkeypatch, torch_cuda, built_major, built=True, import_error=None):
    """_backend._load_cuda on a torch that reports CUDA ``torch_cuda``, with a ``_C_cuda`` built
    for ``built_major`` (when ``built``) whose import fails with ``import_error`` if given: the
    CUDA rules checked on any machine. Returns the Binary, the warning and what was imported."""
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(_backend, "CUDA_MAJOR", built_major)
    find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args):
        if name == "ppokernels._C_cuda":
            return object() if built else None
        return find_spec(name, *args)

    imported = []

    def fake_import(name):
        imported.append(name)
        return (None, import_error) if import_error else (types.ModuleType(name), None)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(_backend, "_import", fake_import)
    binary, warning = _backend._load_cuda()
    return binary, warning, imported


def test_cuda_binary_needs_a_cuda_torch(monkeypatch):
    binary, warning, imported = _load_cuda(monkeypatch, None, 13)
    assert binary.reason == f"torch {torch.__version__} is a CPU build"
    assert warning is None and imported == []


def test_cuda_binary_not_built_is_quiet(monkeypatch):
    binary, warning, imported = _load_cuda(monkeypatch, "13.0", None, built=False)
    assert binary.reason == "not built (a CPU-only build)" and "PPOKERNELS_BUILD_CUDA" in binary.how
    assert warning is None and imported == []


def test_cuda_major_mismatch_is_not_imported(monkeypatch):
    binary, warning, imported = _load_cuda(monkeypatch, "12.8", 13)
    assert imported == []  # a second CUDA runtime next to torch's is never loaded
    assert binary.module is None
    assert binary.reason == f"built for CUDA 13, torch {torch.__version__} uses CUDA 12"
    assert binary.reason in warning and "CUDA tensors run on the Triton" in warning
    assert "CUDA 13" in binary.how and "CUDA 12" in binary.how


@pytest.mark.parametrize("torch_cuda, built_major", [("13.0", 13), ("12.8", None)])
def test_cuda_binary_loads(monkeypatch, torch_cuda, built_major):
    binary, warning, imported = _load_cuda(monkeypatch, torch_cuda, built_major)
    assert imported == ["_C_cuda"] and binary.module is not None
    assert binary.reason is None and warning is None


def test_cuda_binary_load_error_warns(monkeypatch):
    error = "OSError: libcudart.so.13: cannot open shared object file"
    binary, warning, imported = _load_cuda(monkeypatch, "13.0", 13, import_error=error)
    assert imported == ["_C_cuda"] and binary.module is None
    assert binary.reason == error and error in warning and "To get them" in warning
