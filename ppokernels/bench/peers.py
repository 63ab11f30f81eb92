"""The competition as benchmark providers: the trainers' and kernel libraries' own functions.

``peer(name)`` returns the real function or class of a released package, or raises
``PeerUnavailable`` with the reason (not installed, an import error, needs a GPU); the suite turns
that into a skip with the reason, never into a stand-in formula. The peers (package, module,
object):

| name | package | object |
|---|---|---|
| ``trl-selective`` | trl | ``trl.trainer.utils.selective_log_softmax`` |
| ``trl-entropy`` | trl | ``trl.trainer.utils.entropy_from_logits`` |
| ``trl-chunked`` | trl >= 1.16 | ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` |
| ``verl-logprobs`` | verl | ``verl.utils.torch_functional.logprobs_from_logits`` |
| ``verl-entropy`` | verl | ``verl.utils.torch_functional.entropy_from_logits`` |
| ``verl-fused-linear`` | verl | ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` |
| ``verl-triton`` | verl (GPU) | ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` |
| ``openrlhf-logprobs`` | openrlhf | ``openrlhf.models.utils.log_probs_from_logits`` |
| ``liger-grpo`` | liger-kernel | ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` |
| ``liger-flce`` | liger-kernel (GPU) | ``liger_kernel.transformers.functional``
  ``.liger_fused_linear_cross_entropy`` |
| ``cce`` | cut-cross-entropy (GPU) | ``cut_cross_entropy.linear_cross_entropy`` |

How they are imported. The trainers' package ``__init__`` files import their whole stack (Ray,
tensordict, DeepSpeed, vLLM, accelerate, ...), none of which the measured functions call. A plain
import is tried first. When it fails, the module is imported again with the package's parents
registered as bare namespace packages (their ``__init__`` not run), and GPU-only roots that a module
imports but the function never calls (``deepspeed``, ``flash_attn``, ``vllm``) as placeholder
modules while it is imported (then removed, so that e.g. OpenRLHF's ``log_probs_from_logits`` takes
its pure-PyTorch path). ``how(name)`` says which way a peer was imported; the suite records it.
On the GPU machine the packages come from wheels carried in ``wheels/`` (see ``make wheels``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from unittest import mock

import torch

# name -> (module, attribute, needs a CUDA device)
PEERS = {
    "trl-selective": ("trl.trainer.utils", "selective_log_softmax", False),
    "trl-entropy": ("trl.trainer.utils", "entropy_from_logits", False),
    "trl-chunked": ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction", False),
    "verl-logprobs": ("verl.utils.torch_functional", "logprobs_from_logits", False),
    "verl-entropy": ("verl.utils.torch_functional", "entropy_from_logits", False),
    "verl-fused-linear": ("verl.utils.experimental.torch_functional", "FusedLinearForPPO", False),
    "verl-triton": ("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", True),
    "openrlhf-logprobs": ("openrlhf.models.utils", "log_probs_from_logits", False),
    "liger-grpo": ("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss", False),
    "liger-flce": (
        "liger_kernel.transformers.functional",
        "liger_fused_linear_cross_entropy",
        True,
    ),
    "cce": ("cut_cross_entropy", "linear_cross_entropy", True),
}
GPU_ONLY_ROOTS = ("deepspeed", "flash_attn", "vllm")
_HOW: dict[str, str] = {}


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message is the reason (shown as the benchmark's skip reason)."""


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports any module under ``roots`` as an empty module whose attributes are MagicMocks."""

    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attr(key):
            if key.startswith("__"):
                raise AttributeError(key)
            return mock.MagicMock(name=f"{spec.name}.{key}")

        module.__getattr__ = attr
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def _without_package_inits(module: str):
    """Registers the parents of ``module`` as namespace packages and placeholder GPU-only roots."""
    parts = module.split(".")
    if parts[0] in sys.modules:  # a namespace registered for an earlier peer
        path = list(sys.modules[parts[0]].__path__)
    else:
        root_spec = importlib.util.find_spec(parts[0])  # finds, does not run, the package
        if root_spec is None or not root_spec.submodule_search_locations:
            raise ModuleNotFoundError(f"No module named '{parts[0]}'")
        path = list(root_spec.submodule_search_locations)
    missing = tuple(r for r in GPU_ONLY_ROOTS if importlib.util.find_spec(r) is None)
    finder = _Placeholders(missing)
    sys.meta_path.insert(0, finder)
    try:
        for depth in range(1, len(parts)):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                pkg = types.ModuleType(name)
                pkg.__path__ = path
                sys.modules[name] = pkg
            path = [f"{sys.modules[name].__path__[0]}/{parts[depth]}"]
        yield
    finally:
        sys.meta_path.remove(finder)
        for key in [n for n in sys.modules if n.split(".")[0] in missing]:
            spec = getattr(sys.modules[key], "__spec__", None)
            if spec is not None and isinstance(spec.loader, _Placeholders):
                del sys.modules[key]


@functools.cache
def peer(name: str):
    """The real object of peer ``name``, or ``PeerUnavailable`` with the reason."""
    module, attr, needs_gpu = PEERS[name]
    if needs_gpu and not torch.cuda.is_available():
        # the reason starts with the one skip CI allows on a CPU machine (tests/conftest.py)
        raise PeerUnavailable(f"needs a CUDA GPU: {name} ({module}.{attr} is a Triton GPU kernel)")
    try:
        obj = getattr(importlib.import_module(module), attr)
        _HOW[name] = "import"
        return obj
    except ImportError as first:
        for key in [k for k in sys.modules if k == module or k.startswith(module + ".")]:
            del sys.modules[key]  # a half-imported module from the failed attempt
        try:
            with _without_package_inits(module):
                obj = getattr(importlib.import_module(module), attr)
        except ImportError:
            raise PeerUnavailable(f"{name}: {module}.{attr} not importable: {first}") from first
        _HOW[name] = f"import without the package __init__ ({first})"
        return obj


def how(name: str) -> str:
    """How ``peer(name)`` was imported (recorded in the benchmark's extra_info)."""
    return _HOW.get(name, "")


def skip_unless(name: str):
    """``peer(name)``, or a pytest skip with the reason."""
    import pytest

    try:
        return peer(name)
    except PeerUnavailable as e:
        pytest.skip(str(e))


def provider(name: str, *peers: str):
    """Provider ``name`` as a pytest parameter: skipped at collection, with the reason, when one of
    the ``peers`` it calls cannot run here."""
    import pytest

    for p in peers:
        try:
            peer(p)
        except PeerUnavailable as e:
            return pytest.param(name, marks=pytest.mark.skip(reason=str(e)))
    return name
