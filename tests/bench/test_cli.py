"""``ppokernels bench`` (ppokernels/bench/cli.py): results.json from the installed suite, failures
and crashes recorded without losing the other results, a relative --out, nothing written next to
the benchmark files, and a missing [bench] extra named in the error."""

import json
import textwrap

import pytest

from ppokernels import cli
from ppokernels.bench import cli as bench_cli


def _bench(*args) -> int:
    return cli.main(["bench", *args])


def test_bench_smoke_writes_results_for_the_suite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out is relative: resolved before the suite runs elsewhere
    assert _bench("--preset", "smoke", "--ops", "kl_penalty", "--out", "rel") == 0
    out = tmp_path / "rel"
    res = json.loads((out / "results.json").read_text())
    assert (
        res["machine"]["preset"] == "smoke" and res["machine"]["limits"]["copy_bandwidth_gbs"] > 0
    )
    # the suite's parametrisation, written out independently: modes x providers at the tiny shape
    from ppokernels.testing import available_backends

    providers = {"reference", "reference-compiled"}
    if "cpp" in available_backends("cpu"):
        providers.add("ppokernels-cpp")
    want = {(f"{m} (4, 64)", p) for m in ("forward", "forward+backward") for p in providers}
    got = {(r["case"], r["provider"]) for r in res["results"]}
    assert got == want
    for r in res["results"]:
        assert r["op"] == "kl_penalty" and r["median_ms"] > 0
        base = next(
            b for b in res["results"] if b["case"] == r["case"] and b["provider"] == "reference"
        )
        assert r["speedup_vs_reference"] == round(base["median_ms"] / r["median_ms"], 2)
    assert res["failures"] == []
    report = (out / "report.md").read_text()
    assert "| kl_penalty | forward (4, 64) | reference |" in report
    assert (out / "kl_penalty.png").stat().st_size > 0
    assert (out / "logs" / "bench_kl_penalty.log").exists()


FAKE = """
import os
from ppokernels.bench._common import run

def test_ok(benchmark):
    benchmark.group = f"fake ok"
    run(benchmark, lambda: sum(range(100)), device="cpu", provider="reference")

def test_fails(benchmark):
    benchmark.group = f"fake fails"
    raise RuntimeError("boom in the benchmark")

def test_skips(benchmark):
    import pytest
    benchmark.group = f"fake skips"
    pytest.skip("peer not importable: no module named x")
"""
CRASH = """
import os

def test_crash(benchmark):
    benchmark.group = f"crash now"
    os._exit(7)  # a segfault or an abort as the device might give
"""


def test_bench_records_failures_and_crashes_and_keeps_results(tmp_path, monkeypatch):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "bench_fake.py").write_text(textwrap.dedent(FAKE))
    (suite / "bench_crash.py").write_text(textwrap.dedent(CRASH))
    monkeypatch.setattr(bench_cli, "SUITE_DIR", suite)
    out = tmp_path / "out"
    rc = _bench("--preset", "smoke", "--ops", "fake", "crash", "--out", str(out))
    assert rc == 1
    res = json.loads((out / "results.json").read_text())
    assert [(r["op"], r["case"], r["provider"]) for r in res["results"]] == [
        ("fake", "ok", "reference")
    ]
    failures = {f["nodeid"]: f for f in res["failures"]}
    assert "boom in the benchmark" in failures["bench_fake.py::test_fails"]["reason"]
    assert "pytest exit 7" in failures["bench_crash.py"]["reason"]
    assert [s["reason"] for s in res["skips"]] == ["peer not importable: no module named x"]
    report = (out / "report.md").read_text()
    assert "## Failed (2)" in report and "## Skipped (1)" in report
    # nothing written beside the benchmark files (in an installed package: site-packages)
    assert sorted(p.name for p in suite.iterdir()) == ["bench_crash.py", "bench_fake.py"]


def test_bench_unknown_op_is_an_error(tmp_path, capsys):
    assert _bench("--ops", "no_such_op", "--out", str(tmp_path)) == 2
    assert "no_such_op" in capsys.readouterr().err


def test_bench_missing_extra_names_it(tmp_path, monkeypatch):
    real = bench_cli.importlib.util.find_spec
    monkeypatch.setattr(
        bench_cli.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pytest_benchmark" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"pytest-benchmark.*ppokernels\[bench\]"):
        _bench("--out", str(tmp_path))


def test_every_suite_file_measures_an_op():
    files = {p for paths in bench_cli.bench_files().values() for p in paths}
    assert files == set(bench_cli.SUITE_DIR.glob("bench_*.py"))
    assert "linear_logprobs" in bench_cli.bench_files()
