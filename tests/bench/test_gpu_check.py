"""benchmarks/gpu_check.sh fits the GPU machine: its time boxes add up to at most 540 s, and
benchmarks/check_gpu_out.py (which CI runs on the rehearsal's OUT, .ci/run) accepts the promised
layout and rejects every way of breaking the machine's return limits."""

import importlib.util
import json
import re
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
_spec = importlib.util.spec_from_file_location(
    "check_gpu_out", ROOT / "benchmarks" / "check_gpu_out.py"
)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def _budgets(text: str) -> list[tuple[int, dict[str, int]]]:
    """(TOTAL, {step: limit}) of the rehearsal and the real branch, in the script's order."""
    totals = [int(t) for t in re.findall(r"^\s*TOTAL=(\d+)", text, re.M)]
    limits = [
        {k: (v if v == "rest" else int(v)) for k, v in re.findall(r"(\w+)=(\d+|rest)", body)}
        for body in re.findall(r"^\s*LIMITS=\(([^)]*)\)", text, re.M)
    ]
    return list(zip(totals, limits, strict=True))


def test_time_boxes_fit_one_command():
    text = SCRIPT.read_text()
    (reh_total, reh), (total, real) = _budgets(text)
    kill_after = int(re.search(r"--kill-after=(\d+)", text).group(1))
    # every step is capped by what is left of TOTAL, so all end by TOTAL + one grace period
    assert total + kill_after <= 530  # 10 s left to pack: the command stays under 540 s
    assert reh_total + kill_after <= 290  # the rehearsal: 5 minutes with start-up and packing
    # the benchmarks come last and get the rest: at least 200 s on the device
    assert real.pop("bench") == reh.pop("bench") == "rest"
    assert total - sum(real.values()) >= 200
    assert reh_total - sum(reh.values()) >= 90
    assert set(real) == set(reh) == {"machine", "wheels", "build", "info", "tests"}
    assert "TORCH_CUDA_ARCH_LIST=9.0" in text and "PPOKERNELS_CUDA_ARCHS=9.0" in text


def _layout(out: Path) -> Path:
    out.mkdir()
    (out / "summary.txt").write_text("ppokernels GPU check, GPU, 500 s of 525 s\nbuild rc=0\n")
    (out / "results.json").write_text(json.dumps({"machine": {}, "results": [], "failures": []}))
    (out / "report.md").write_text("# report\n")
    logs = out.parent / "logs"
    logs.mkdir()
    (logs / "build.log").write_text("built\n")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    return out


def test_the_promised_layout_passes(tmp_path):
    assert check.problems(_layout(tmp_path / "out")) == []


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (lambda o: [(o / f"extra{i}.txt").write_text("x") for i in range(5)], "more than 8"),
        (lambda o: (o / "big.bin").write_bytes(b"0" * (16 * 2**20)), "not under 16 MiB"),
        (
            lambda o: ((o / "a" / "b" / "c").mkdir(parents=True), (o / "a/b/c/f").write_text("x")),
            "folders deep",
        ),
        (lambda o: (o / "bad name.txt").write_text("x"), "a name outside"),
        (lambda o: (o / "summary.txt").write_text("build rc=0\n"), "does not start with"),
        (lambda o: (o / "results.json").write_text("{"), "not JSON"),
        (lambda o: (o / "report.md").unlink(), "report.md missing"),
        (lambda o: (o / "logs.tar.gz").write_bytes(b"not a tar"), "not a readable archive"),
    ],
)
def test_each_breakage_is_reported(tmp_path, breakage, problem):
    out = _layout(tmp_path / "out")
    breakage(out)
    found = check.problems(out)
    assert any(problem in p for p in found), found
    assert check.main([str(out)]) == 1
