"""``ppokernels bench``: every op against the reference and the competition, with plots.

Measures the machine's limits (copy bandwidth, matmul rate), runs the pytest-benchmark cases of
``ppokernels/bench/suite/`` (installed with the package, so this works from a wheel outside any
checkout) with a preset, one pytest process per file, then writes ``OUT/results.json`` (machine,
one record per op x case x provider, and every failed or skipped case with its reason),
``OUT/report.md``, a PNG per op and ``OUT/logs/`` (each file's pytest output). A failing or
crashing benchmark file is recorded and the others still run and are reported; the exit status is
1 when anything failed.

pytest runs with its rootdir and ini file in ``OUT/`` (an empty ``pytest.ini``), so a checkout's
``pyproject.toml`` is never read, and without bytecode or cache writes, so nothing is written into
the installed package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent / "suite"
# pytest-benchmark options per preset: quick bounds each measurement (the whole suite, about 15
# minutes on 2 CPU cores); demo runs only the headline cases (DEMO_CASES) at small shapes, about a
# minute; smoke (the tiny shapes, one round each) checks that every case runs, in seconds
PRESET_ARGS = {
    "smoke": ["--benchmark-max-time=0", "--benchmark-min-rounds=1", "--benchmark-warmup=off"],
    "demo": ["--benchmark-max-time=0.1", "--benchmark-min-rounds=3", "--benchmark-warmup=off"],
    "quick": ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3", "--benchmark-warmup=off"],
    "cpu": ["--benchmark-max-time=1.0", "--benchmark-min-rounds=5"],
    "llm": ["--benchmark-max-time=0.5", "--benchmark-min-rounds=10"],
}
# The demo preset's cases, the README's headline table: benchmark file -> pytest -k expression.
# The fused policy-loss head against the naive full-logits path and the trainers' heads (Liger's
# GRPO loss; TRL's and veRL's chunked log-prob functions followed by the same loss), one policy
# loss against veRL's eager formula, and GAE against the trainers' Python loop.
DEMO_CASES = {
    "bench_linear_ppo_policy_loss": "not cpp-chunk and not linear_logprobs",
    "bench_ppo_policy_loss": "test_ppo_policy_loss and forward+backward",
    "bench_gae": "test_gae_forward and not backward",
}
# `benchmark.group = f"<op> ..."`, or `group=f"<op> ..."` passed to _common.run_mode
GROUP_RE = re.compile(r'(?:benchmark\.group\s*=\s*\(?|\bgroup=)\s*f"([a-z_]+) ')
# what `ppokernels bench` needs beyond the core install: the [bench] extra
BENCH_EXTRA = {
    "pytest": "pytest",
    "pytest_benchmark": "pytest-benchmark",
    "matplotlib": "matplotlib",
}


class MissingExtra(ImportError):
    """A package of an extra is missing; the message names the extra to install."""


def require_bench_extra() -> None:
    missing = [pkg for mod, pkg in BENCH_EXTRA.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise MissingExtra(
            f"ppokernels bench needs {', '.join(missing)}: pip install 'ppokernels[bench]'"
        )


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite and write JSON, Markdown and plots")
    p.add_argument(
        "--preset",
        choices=sorted(PRESET_ARGS),
        default=None,
        help="demo (the headline cases only, about a minute), smoke (tiny shapes, one round), "
        "quick (every op, about 15 min on 2 CPU cores), cpu (the CPU targets' shapes) or llm "
        "(GPU shapes); default: llm on a GPU, quick on the CPU",
    )
    p.add_argument("--ops", nargs="+", default=None, help="public op names to run (default all)")
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument(
        "--file-timeout",
        type=float,
        default=None,
        help="seconds one benchmark file may run before it is stopped and recorded as failed",
    )
    p.set_defaults(fn=main)


def bench_files() -> dict[str, list[Path]]:
    """op name -> benchmark files that measure it (from their ``benchmark.group`` prefixes)."""
    ops: dict[str, list[Path]] = {}
    for path in sorted(SUITE_DIR.glob("bench_*.py")):
        for op in set(GROUP_RE.findall(path.read_text())):
            ops.setdefault(op, []).append(path)
    return ops


def machine_limits(device: str) -> dict:
    import torch

    from ppokernels.bench._common import copy_bandwidth_gbs, matmul_tflops

    limits = {
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(device), 2),
        "matmul_fp32_tflops": round(matmul_tflops(device, torch.float32), 3),
    }
    if device == "cuda":
        limits["matmul_bf16_tflops"] = round(matmul_tflops(device, torch.bfloat16), 2)
    return limits


def describe_machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(
                ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln
            )
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name", cpu)
        if "cpu family" in fields:  # a VM's model name may be as short as "AMD EPYC"
            cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    except OSError:
        pass
    from ppokernels import _backend

    isa = f", CPU kernels at {_backend.cpu_isa()}" if _backend.cpu_isa() else ""
    return f"{cpu}, {os.cpu_count()} cores{isa}, torch {torch.__version__} (CPU)"


def _read_json(path: Path, default):
    # pytest-benchmark creates its JSON file when it starts: a crashed run leaves it empty
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _stop(proc: subprocess.Popen, grace: float, signal_first: bool = True) -> None:
    if signal_first:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _child_env(env: dict) -> dict:
    """``env`` with this process's ppokernels first on PYTHONPATH: the pytest child imports the
    same package as the suite files it runs (an editable checkout, a source tree on the path or an
    installed wheel), never another copy (pytest's "import file mismatch")."""
    import ppokernels

    home = str(Path(ppokernels.__file__).resolve().parent.parent)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != home]
    return dict(env, PYTHONPATH=os.pathsep.join([home, *rest]))


class _Progress:
    """Prints the lines the plugin appends to the progress file (PPK_BENCH_PROGRESS): one per
    case, numbered, as the child runs them."""

    def __init__(self, path: Path, stem: str):
        self.path, self.stem, self.pos, self.total, self.done = path, stem, 0, "?", 0
        path.write_text("")

    def poll(self) -> None:
        with open(self.path) as f:
            f.seek(self.pos)
            chunk = f.read()
        end = chunk.rfind("\n") + 1  # a line still being written waits for the next poll
        self.pos += end
        for line in chunk[:end].splitlines():
            event = json.loads(line)
            if "collected" in event:
                self.total = event["collected"]
                continue
            self.done += 1
            mark = "" if event["outcome"] == "passed" else f" {event['outcome']}"
            print(
                f"    {self.stem} [{self.done}/{self.total}] {event['case']} "
                f"{event['seconds']} s{mark}",
                flush=True,
            )


def _run_file(path: Path, out: Path, preset: str, env: dict, timeout: float | None):
    """Runs one benchmark file in its own pytest process, printing a line per case as it ends;
    returns (raw JSON, outcomes, rc)."""
    stem = path.stem
    raw_path, outcomes_path = out / "raw" / f"{stem}.json", out / "raw" / f"{stem}.outcomes.json"
    select = ["-k", DEMO_CASES[stem]] if preset == "demo" and stem in DEMO_CASES else []
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(path),
        "-c",
        str(out / "pytest.ini"),
        "--rootdir",
        str(out),
        "-p",
        "no:cacheprovider",
        "-p",
        "ppokernels.bench.plugin",
        "-o",
        "python_files=bench_*.py",
        "-o",
        "console_output_style=count",
        "-q",
        "-rfE",
        f"--benchmark-json={raw_path}",
        "--benchmark-disable-gc",
        "--benchmark-quiet",
        *PRESET_ARGS[preset],
        *select,
    ]
    progress = _Progress(out / "raw" / f"{stem}.progress.jsonl", stem)
    env = dict(env, PPK_BENCH_OUTCOMES=str(outcomes_path), PPK_BENCH_PROGRESS=str(progress.path))
    log = out / "logs" / f"{stem}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = None if timeout is None else time.time() + timeout
        try:
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        progress.poll()
                        if deadline is not None and time.time() > deadline:
                            raise
            except subprocess.TimeoutExpired:
                rc = "timeout"
                _stop(proc, grace=15)  # SIGINT first: pytest still writes what it measured
        except KeyboardInterrupt:  # our own time limit (gpu_check.sh): seconds are left
            rc = "interrupted"  # the child got the same SIGINT (one process group)
            _stop(proc, grace=2, signal_first=False)
    progress.poll()
    raw, outcomes = _read_json(raw_path, {}), _read_json(outcomes_path, [])
    for o in outcomes:  # ids are relative to the rootdir (OUT), which does not hold the file
        o["nodeid"] = path.name + (
            "::" + o["nodeid"].split("::", 1)[1] if "::" in o["nodeid"] else ""
        )
    if rc not in (0, 1, 5) or (rc == 1 and not any(o["outcome"] == "failed" for o in outcomes)):
        # a crash, a timeout or an internal error: the cases it did not reach are lost, say so
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        outcomes.append(
            {
                "nodeid": path.name,
                "when": "process",
                "outcome": "failed",
                "reason": f"pytest exit {rc}: {tail[0][:300]} (see logs/{log.name})",
            }
        )
    return raw, outcomes, rc


def main(args: argparse.Namespace) -> int:
    from ppokernels.bench.report import plots, records_from

    require_bench_extra()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("llm" if device == "cuda" else "quick")
    out = Path(args.out).resolve()  # before anything changes the working directory
    for sub in ("raw", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "pytest.ini").write_text("[pytest]\n")  # rootdir and ini here, not a checkout's
    by_op = bench_files()
    ops = args.ops or sorted(by_op)
    unknown = [op for op in ops if op not in by_op]
    if unknown:
        print(
            f"ppokernels bench: no benchmark for --ops {unknown}; known: {sorted(by_op)}",
            file=sys.stderr,
        )
        return 2
    files = list(dict.fromkeys(f for op in ops for f in by_op[op]))  # in the order of --ops
    if preset == "demo":
        files = [f for f in files if f.stem in DEMO_CASES]
    print(
        f"ppokernels bench: preset {preset} on {device}, {len(files)} benchmark files; "
        "measuring the machine's limits ...",
        flush=True,
    )
    machine = {"description": describe_machine(device), "device": device, "preset": preset}
    start = time.time()
    try:
        machine["limits"] = machine_limits(device)
    except KeyboardInterrupt:
        machine["limits"] = {}
        not_run = [_not_run(p, "interrupted before it started") for p in files]
        _write(out, machine, [], not_run, {}, start)
        return 1
    if device == "cuda":
        torch.cuda.empty_cache()  # the benchmark processes get the whole device
    print("  " + ", ".join(f"{k} = {v}" for k, v in machine["limits"].items()), flush=True)
    env = dict(
        _child_env(os.environ),
        PPK_BENCH_PRESET=preset,
        PYTHONDONTWRITEBYTECODE="1",
        PPK_BENCH_LIMITS=json.dumps(machine["limits"]),
    )
    env.pop("TRITON_INTERPRET", None)
    rows, outcomes, exits = [], [], {}
    for i, path in enumerate(files):
        t0 = time.time()
        raw, outs, rc = _run_file(path, out, preset, env, args.file_timeout)
        rows += [r for r in records_from(raw) if r["op"] in ops]
        outcomes += outs
        exits[path.stem] = rc
        nfail = sum(o["outcome"] == "failed" for o in outs)
        print(
            f"  {path.stem}: exit {rc}, {len(raw.get('benchmarks', []))} timed, {nfail} failed, "
            f"{sum(o['outcome'] == 'skipped' for o in outs)} skipped, "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )
        if rc == "interrupted":
            outcomes += [_not_run(p, "interrupted before it started") for p in files[i + 1 :]]
        # written after every file: a run stopped from outside keeps what it measured
        report = _write(out, machine, rows, outcomes, exits, start)
        if rc == "interrupted":
            return 1
    try:
        images = plots(rows, out, summary=preset == "demo")
    except Exception as e:  # a plot must not lose the results above
        images = []
        print(f"ppokernels bench: plots failed: {e!r}", file=sys.stderr)
    print(report)
    failed = [o for o in outcomes if o["outcome"] == "failed"]
    print(
        f"wrote {out}/results.json, {out}/report.md and {len(images)} plots "
        f"({', '.join(images)}) in {machine['wall_s']} s; {len(failed)} failed"
    )
    if preset == "demo":
        print(
            "This was the headline only. Every op against the reference and the trainers' code: "
            "ppokernels bench --preset quick (about 15 minutes on 2 CPU cores; --ops to choose)"
        )
    return 1 if failed else 0


def _not_run(path: Path, why: str) -> dict:
    return {"nodeid": path.name, "when": "process", "outcome": "failed", "reason": why}


def _write(out: Path, machine: dict, rows: list, outcomes: list, exits: dict, start: float) -> str:
    """Writes OUT/results.json and OUT/report.md; returns the report."""
    from ppokernels.bench.report import markdown

    machine["wall_s"] = round(time.time() - start, 1)
    machine["exit_status"] = exits
    result = {
        "machine": machine,
        "results": rows,
        "failures": [o for o in outcomes if o["outcome"] == "failed"],
        "skips": [o for o in outcomes if o["outcome"] == "skipped"],
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    report = markdown(machine, rows, outcomes)
    (out / "report.md").write_text(report)
    return report
