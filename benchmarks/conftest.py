"""Benchmark presets and parametrisation.

Each ``bench_<stem>.py`` defines ``SHAPES = {"tiny": [...], "cpu": [...], "llm": [...]}`` and a
``providers(device)`` function; tests take ``shape`` and ``provider`` arguments. The preset is
"tiny" under ``--benchmark-disable`` (CI runs every benchmark once so none rots), else
``PPK_BENCH_PRESET``, else "llm" on a GPU and "cpu" on the CPU. "cpu" holds the shapes of the
CPU targets; "quick" (``ppokernels bench --preset quick``) is a module's ``SHAPES["quick"]`` when
it has one, else the first "cpu" shape.
"""

import os

import torch


def preset(config) -> str:
    if config.getoption("benchmark_disable", False):
        return "tiny"
    return os.environ.get("PPK_BENCH_PRESET") or ("llm" if torch.cuda.is_available() else "cpu")


def preset_shapes(table: dict, config) -> list:
    """The shapes of ``table`` (a SHAPES-like dict) for the run's preset."""
    name = preset(config)
    if name == "quick" and "quick" not in table:
        return table["cpu"][:1]
    return table[name]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    module = metafunc.module
    if "shape" in metafunc.fixturenames and hasattr(module, "SHAPES"):
        shapes = preset_shapes(module.SHAPES, metafunc.config)
        metafunc.parametrize("shape", shapes, ids=[str(s) for s in shapes])
    if "provider" in metafunc.fixturenames and hasattr(module, "providers"):
        metafunc.parametrize("provider", module.providers(device()))
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [device()])
