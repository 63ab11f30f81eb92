import os

import pytest
import torch

# Triton kernels run on CPU tensors only in the interpreter, which must be chosen before triton
# decorates the kernels, i.e. before ppokernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# In CI (.ci/run sets PPOKERNELS_CI=1; most CI systems set CI=true) a skip may only mean "this
# needs hardware the machine lacks" or "this interpreter-only check cannot run on this old
# version": everything `make install` installs must be importable, so any other skip (a missing
# trainer package, an unbuilt extension, no Triton) is reported as a failure with its reason.
IN_CI = os.environ.get("PPOKERNELS_CI") == "1" or os.environ.get("CI", "").lower() == "true"
NEEDS_GPU = "needs a CUDA GPU"
OLD_VERSION = "interpreter-only incompatibility of"  # prefix of version-specific skips
ALLOWED_SKIPS = (NEEDS_GPU, OLD_VERSION)
# The pure-Python wheel's job (.ci/wheels.sh sets PPOKERNELS_PURE=1) has no binary module by
# design: there, and only there, the binary's tests may skip (ppokernels.testing.NO_BINARY).
if os.environ.get("PPOKERNELS_PURE") == "1":
    from ppokernels.testing import NO_BINARY

    ALLOWED_SKIPS = (*ALLOWED_SKIPS, NO_BINARY)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=NEEDS_GPU)
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_disallowed_skip(report) -> None:
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = (
                f"skipped in CI, where every optional dependency is installed: {reason}\n"
                "(only 'needs a CUDA GPU' and version-specific interpreter skips are allowed; "
                "run `make install`)"
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())
