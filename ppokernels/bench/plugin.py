"""pytest plugin of the benchmark suite: presets, parametrisation and a record of every outcome.

Loaded by ``benchmarks/conftest.py`` (the checkout) and by ``ppokernels bench`` (``-p
ppokernels.bench.plugin``, the installed package). Each ``ppokernels/bench/suite/bench_<stem>.py``
defines ``SHAPES = {"tiny": [...], "cpu": [...], "llm": [...]}`` and a ``providers(device)``
function; tests take ``shape``, ``provider`` and ``device`` arguments.

Presets: "tiny" under ``--benchmark-disable`` (CI runs every case once so none rots) and for
``PPK_BENCH_PRESET=smoke``; else ``PPK_BENCH_PRESET``, else "llm" on a GPU and "cpu" on the CPU.
"cpu" holds the shapes of the CPU targets; "quick" and "demo" are a module's ``SHAPES["quick"]`` /
``SHAPES["demo"]`` when it has one, else the first "cpu" shape.

``PPK_BENCH_OUTCOMES=path``: at the end of the session the plugin writes there a JSON list of
every failed, errored or skipped case (node id, phase, outcome, the reason in one line), so that
``ppokernels bench`` can report failures and skips beside the timings.

``PPK_BENCH_PROGRESS=path``: one JSON line per event, appended as it happens (``{"collected": n}``,
then ``{"case": nodeid, "outcome": ..., "seconds": ...}`` per case), which ``ppokernels bench``
prints while the file runs, so a long file never looks hung.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

_OUTCOMES: list[dict] = []


def preset(config) -> str:
    if config.getoption("benchmark_disable", False):
        return "tiny"
    name = os.environ.get("PPK_BENCH_PRESET") or ("llm" if torch.cuda.is_available() else "cpu")
    return "tiny" if name == "smoke" else name


def preset_shapes(table: dict, config) -> list:
    """The shapes of ``table`` (a SHAPES-like dict) for the run's preset."""
    name = preset(config)
    if name in ("quick", "demo") and name not in table:
        return table["cpu"][:1]
    return table[name]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _defining_module(metafunc):
    # benchmarks/bench_<stem>.py re-exports the cases of ppokernels.bench.suite.bench_<stem>: the
    # tables live in the module that defines the test function
    return sys.modules.get(metafunc.function.__module__, metafunc.module)


def pytest_generate_tests(metafunc):
    module = _defining_module(metafunc)
    if "shape" in metafunc.fixturenames and hasattr(module, "SHAPES"):
        shapes = preset_shapes(module.SHAPES, metafunc.config)
        metafunc.parametrize("shape", shapes, ids=[str(s) for s in shapes])
    if "provider" in metafunc.fixturenames and hasattr(module, "providers"):
        metafunc.parametrize("provider", module.providers(device()))
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [device()])


def _reason(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = str(report.longrepr or "")
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()[-1:]
    return " | ".join(ln[1:].strip() for ln in lines[:3])[:500]


def _progress(event: dict) -> None:
    path = os.environ.get("PPK_BENCH_PROGRESS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


def pytest_collection_finish(session):
    _progress({"collected": len(session.items)})


_STARTED: dict[str, float] = {}
_CASE_OUTCOME: dict[str, str] = {}  # nodeid -> "passed", "skipped" or "failed" (worst phase)


def pytest_runtest_logstart(nodeid, location):
    _STARTED[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid, location):
    seconds = round(time.time() - _STARTED.pop(nodeid, time.time()), 1)
    outcome = _CASE_OUTCOME.pop(nodeid, "passed")
    _progress({"case": nodeid.split("::", 1)[-1], "outcome": outcome, "seconds": seconds})


def pytest_runtest_logreport(report):
    if report.failed or (report.skipped and _CASE_OUTCOME.get(report.nodeid) != "failed"):
        _CASE_OUTCOME[report.nodeid] = report.outcome
    if report.failed or (report.skipped and report.when in ("setup", "call")):
        _OUTCOMES.append(
            {
                "nodeid": report.nodeid,
                "when": report.when,
                "outcome": "failed" if report.failed else "skipped",
                "reason": _reason(report),
            }
        )


def pytest_collectreport(report):
    if report.failed:
        _OUTCOMES.append(
            {
                "nodeid": report.nodeid,
                "when": "collect",
                "outcome": "failed",
                "reason": str(report.longrepr).strip().splitlines()[-1][:500],
            }
        )


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PPK_BENCH_OUTCOMES")
    if path:
        with open(path, "w") as f:
            json.dump(_OUTCOMES, f, indent=1)
