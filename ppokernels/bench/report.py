"""``ppokernels bench`` results: records from pytest-benchmark's JSON, the Markdown report, plots.

One record per op x case x provider: median time, peak memory, achieved GB/s or TFLOP/s and the
fraction of the machine's measured limit (copy bandwidth for the memory-bound ops, the dense
matmul rate of the same dtype for ``linear_logprobs``), and the speedup against the group's
baseline (the plain-PyTorch reference, the trainers' eager formula, or the naive path).
"""

from __future__ import annotations

from pathlib import Path

# The baseline of a group: the plain-PyTorch reference, or the trainers' eager formula / naive path.
BASELINES = ("reference", "eager-formula", "naive", "trainer")


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
                "pct_matmul": extra.get("pct_matmul"),
                "peer_import": extra.get("peer_import"),
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


def _bound(r: dict) -> str:
    """Achieved rate and its fraction of the measured limit, e.g. "41.2 GB/s (38.5%)"."""
    if r.get("gbps"):
        return f"{r['gbps']} GB/s ({r['pct_copy_bw']}%)"
    if r.get("tflops"):
        pct = f" ({r['pct_matmul']}%)" if r.get("pct_matmul") is not None else ""
        return f"{r['tflops']} TFLOP/s{pct}"
    return ""


def markdown(machine: dict, rows: list[dict], outcomes: list[dict] = ()) -> str:
    """The report: machine, one table row per record, then the failed and skipped cases."""
    lines = [
        f"# ppokernels benchmark ({machine['preset']})",
        "",
        f"Machine: {machine['description']}. Measured limits: "
        + ", ".join(f"{k} {v}" for k, v in machine["limits"].items())
        + ".",
        "",
        "| op | case | provider | median ms | x baseline | peak MiB | rate (% of the limit) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["group"], r["median_ms"])):
        mem = "" if r["peak_mem_mb"] is None else r["peak_mem_mb"]
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {r['median_ms']:.3f} | "
            f"{r['speedup_vs_reference'] or ''} | {mem} | {_bound(r)} |"
        )
    failed = [o for o in outcomes if o["outcome"] == "failed"]
    skipped = [o for o in outcomes if o["outcome"] == "skipped"]
    if failed:
        lines += ["", f"## Failed ({len(failed)})", ""]
        lines += [f"- `{o['nodeid']}` ({o['when']}): {o['reason']}" for o in failed]
    if skipped:
        # one line per distinct reason: a missing peer skips every shape and mode alike
        reasons: dict[str, list[str]] = {}
        for o in skipped:
            reasons.setdefault(o["reason"], []).append(o["nodeid"])
        lines += ["", f"## Skipped ({len(skipped)})", ""]
        lines += [f"- {len(ids)} x {reason} (e.g. `{ids[0]}`)" for reason, ids in reasons.items()]
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
