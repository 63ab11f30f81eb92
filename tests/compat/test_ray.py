"""The README's Ray instructions, run as written: a local Ray instance whose workers run a
``patch()`` as ``worker_process_setup_hook`` (docs/compat.md), checked inside a remote task:
every attribute and registry entry that patch() replaces resolves to ppokernels there, while the
driver process (never patched) still sees the trainer's own functions.

veRL's hook is the string the README gives. OpenRLHF imports GPU-only packages (deepspeed,
flash_attn, vllm) at import time, which this CPU machine lacks, so its hook is a function that
stubs them as tests/compat/test_openrlhf.py does and then calls the same
``ppokernels.compat.openrlhf.patch`` (on a GPU machine the stubs stand aside)."""

from __future__ import annotations

import sys

import pytest

ray = pytest.importorskip("ray")

from . import _compat_data, test_openrlhf  # noqa: E402
from .test_openrlhf import _stub_gpu_packages  # noqa: E402

# The workers cannot import the test modules: ship their functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(test_openrlhf)
ray.cloudpickle.register_pickle_by_value(_compat_data)


def _openrlhf_hook() -> None:
    with _stub_gpu_packages():
        import ppokernels.compat.openrlhf as co

        co.patch()


def _resolved(module: str) -> list:
    """In a worker: (where, name, module of the object found there) for every replacement
    that ``<module>.patch()`` recorded, plus the patcher's own count."""
    import importlib

    compat = importlib.import_module(module)
    out = []
    for obj, name, _old, _had in compat._PATCHER._undo:
        value = obj[name] if isinstance(obj, dict) else getattr(obj, name)
        where = "registry" if isinstance(obj, dict) else getattr(obj, "__name__", repr(obj))
        out.append((where, name, getattr(value, "__module__", "")))
    return out


def _worker_view(hook: str, module: str, probes: str) -> tuple:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": hook},
        log_to_driver=False,
    )
    try:

        @ray.remote
        def inspect():
            import importlib

            found = _resolved(module)
            lookups = {}
            for probe in probes.split(";"):
                mod, _, expr = probe.partition(":")
                lookups[probe] = eval(expr, vars(importlib.import_module(mod))).__module__
            return found, lookups

        return ray.get(inspect.remote(), timeout=240)
    finally:
        ray.shutdown()


VERL_PROBES = ";".join(
    (
        "verl.trainer.ppo.core_algos:compute_gae_advantage_return",
        "verl.trainer.ppo.core_algos:compute_policy_loss_vanilla",
        "verl.trainer.ppo.core_algos:get_adv_estimator_fn('grpo')",
        "verl.trainer.ppo.core_algos:get_policy_loss_fn('vanilla')",
        "verl.utils.torch_functional:logprobs_from_logits",
    )
)
OPENRLHF_PROBES = ";".join(
    ("openrlhf.models:PolicyLoss", "openrlhf.models.loss:ValueLoss", "openrlhf.models:ValueLoss")
)


@pytest.mark.parametrize(
    "module,probes,trainer_prefix",
    [
        ("ppokernels.compat.verl", VERL_PROBES, "verl."),
        ("ppokernels.compat.openrlhf", OPENRLHF_PROBES, "openrlhf."),
    ],
)
def test_ray_worker_setup_hook_patches(module, probes, trainer_prefix):
    import importlib

    hook = f"{module}.patch" if "verl" in module else _openrlhf_hook
    found, lookups = _worker_view(hook, module, probes)
    assert len(found) >= 5, found
    wrong = [f for f in found if not f[2].startswith("ppokernels.")]
    assert not wrong, wrong
    assert all(m.startswith("ppokernels.") for m in lookups.values()), lookups
    # the driver never ran the hook: there the same lookups give the trainer's own code
    for probe in probes.split(";"):
        mod, _, expr = probe.partition(":")
        owner = eval(expr, vars(importlib.import_module(mod))).__module__
        assert owner.startswith(trainer_prefix), (probe, owner)
