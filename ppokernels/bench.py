"""``ppokernels bench``: every op against the reference and the competition, with plots.

Measures the machine's limits first (copy bandwidth; matmul rate), runs the pytest-benchmark
suite in ``benchmarks/`` with a preset, then writes ``DIR/results.json`` (machine + one record per
op x provider x shape), ``DIR/report.md`` and a PNG per op (time and memory per provider).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
# pytest-benchmark options per preset: quick bounds each measurement so the suite fits 5 minutes
PRESET_ARGS = {
    "quick": ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3", "--benchmark-warmup=off"],
    "cpu": ["--benchmark-max-time=1.0", "--benchmark-min-rounds=5"],
    "llm": ["--benchmark-max-time=0.5", "--benchmark-min-rounds=10"],
}
# The baseline of a group: the plain-PyTorch reference, or the trainers' eager formula / naive path.
BASELINES = ("reference", "eager-formula", "naive", "trainer")
GROUP_RE = re.compile(r'benchmark\.group\s*=\s*f"([a-z_]+) ')


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite and write JSON, Markdown and plots")
    p.add_argument(
        "--preset",
        choices=sorted(PRESET_ARGS),
        default=None,
        help="quick (CPU, < 5 min), cpu (the CPU targets' shapes) or llm (GPU shapes); "
        "default: llm on a GPU, quick on the CPU",
    )
    p.add_argument("--ops", nargs="+", default=None, help="public op names to run (default all)")
    p.add_argument("--out", default="bench-results", help="output folder")
    p.set_defaults(fn=main)


def _bench_files() -> dict[str, list[Path]]:
    """op name -> benchmark files that measure it (from their ``benchmark.group`` prefixes)."""
    ops: dict[str, list[Path]] = {}
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        for op in set(GROUP_RE.findall(path.read_text())):
            ops.setdefault(op, []).append(path)
    return ops


def machine_limits(device: str) -> dict:
    sys.path.insert(0, str(BENCH_DIR))
    import torch
    from _common import copy_bandwidth_gbs, matmul_tflops

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
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"


def records_from(raw: dict) -> list[dict]:
    """One record per benchmark, with the speedup against the group's reference provider."""
    rows = []
    for b in raw.get("benchmarks", []):
        group = b.get("group") or b["name"]
        op, _, rest = group.partition(" ")
        extra = b.get("extra_info", {})
        rows.append(
            {
                "op": op,
                "case": rest,
                "shape": (b.get("params") or {}).get("shape"),
                "provider": extra.get("provider", (b.get("params") or {}).get("provider")),
                "median_ms": b["stats"]["median"] * 1e3,
                "peak_mem_mb": extra.get("peak_mem_mb"),
                "gbps": extra.get("gbps"),
                "pct_copy_bw": extra.get("pct_copy_bw"),
                "tflops": extra.get("tflops"),
                "group": group,
            }
        )
    for row in rows:
        group = {r["provider"]: r for r in rows if r["group"] == row["group"]}
        base = next((group[p] for p in BASELINES if p in group), None)
        row["reference_provider"] = base and base["provider"]
        row["speedup_vs_reference"] = (
            round(base["median_ms"] / row["median_ms"], 2) if base else None
        )
    return rows


def markdown(machine: dict, rows: list[dict]) -> str:
    lines = [
        f"# ppokernels benchmark ({machine['preset']})",
        "",
        f"Machine: {machine['description']}. Measured limits: "
        + ", ".join(f"{k} {v}" for k, v in machine["limits"].items())
        + ".",
        "",
        "| op | case | provider | median ms | x reference | peak MiB | GB/s (% copy) | TFLOP/s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["group"], r["median_ms"])):
        bw = f"{r['gbps']} ({r['pct_copy_bw']}%)" if r.get("gbps") else ""
        mem = "" if r["peak_mem_mb"] is None else r["peak_mem_mb"]
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {r['median_ms']:.3f} | "
            f"{r['speedup_vs_reference'] or ''} | {mem} | {bw} | {r['tflops'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op in sorted({r["op"] for r in rows}):
        mine = [r for r in rows if r["op"] == op]
        groups = sorted({r["group"] for r in mine})
        providers = sorted({r["provider"] for r in mine})
        fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(groups) * len(providers)))
        for ax, key, label in (
            (axes[0], "median_ms", "median time (ms, log)"),
            (axes[1], "peak_mem_mb", "peak memory (MiB)"),
        ):
            for i, prov in enumerate(providers):
                ys, xs = [], []
                for j, g in enumerate(groups):
                    hit = [r for r in mine if r["group"] == g and r["provider"] == prov]
                    if hit and hit[0][key] is not None:
                        ys.append(j + i / (len(providers) + 1))
                        xs.append(max(hit[0][key], 1e-3))
                ax.barh(ys, xs, height=1 / (len(providers) + 1), label=prov)
            ax.set_yticks(
                [j + 0.3 for j in range(len(groups))],
                [g.partition(" ")[2] for g in groups],
                fontsize=7,
            )
            ax.set_xlabel(label)
            if key == "median_ms":
                ax.set_xscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(op)
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    return written


def main(args) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("llm" if device == "cuda" else "quick")
    out = Path(args.out).resolve()  # the suite runs with cwd=benchmarks/
    out.mkdir(parents=True, exist_ok=True)
    by_op = _bench_files()
    ops = args.ops or sorted(by_op)
    unknown = [op for op in ops if op not in by_op]
    if unknown:
        print(
            f"ppokernels bench: no benchmark for {unknown}; known: {sorted(by_op)}", file=sys.stderr
        )
        return 2
    files = sorted({str(f) for op in ops for f in by_op[op]})
    print(f"ppokernels bench: preset {preset} on {device}; measuring the machine's limits ...")
    machine = {
        "description": describe_machine(device),
        "device": device,
        "preset": preset,
        "limits": machine_limits(device),
    }
    print("  " + ", ".join(f"{k} = {v}" for k, v in machine["limits"].items()))
    raw_path = out / "raw-pytest-benchmark.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={raw_path}",
        "--benchmark-disable-gc",
        "--benchmark-quiet",
        "-o",
        "console_output_style=count",
        *PRESET_ARGS[preset],
    ]
    env = dict(os.environ, PPK_BENCH_PRESET=preset)
    env.pop("TRITON_INTERPRET", None)
    start = time.time()
    proc = subprocess.run(cmd, cwd=BENCH_DIR, env=env)
    if proc.returncode not in (0, 5) or not raw_path.exists():
        print(
            f"ppokernels bench: the benchmark run failed (exit {proc.returncode})", file=sys.stderr
        )
        return 1
    rows = [r for r in records_from(json.loads(raw_path.read_text())) if r["op"] in ops]
    machine["wall_s"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps({"machine": machine, "results": rows}, indent=1))
    report = markdown(machine, rows)
    (out / "report.md").write_text(report)
    images = plots(rows, out)
    print(report)
    print(
        f"wrote {out}/results.json, {out}/report.md and {len(images)} plots "
        f"({', '.join(images)}) in {machine['wall_s']} s"
    )
    return 0
