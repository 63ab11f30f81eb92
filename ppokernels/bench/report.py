"""``ppokernels bench`` results: records from pytest-benchmark's JSON, the Markdown report, plots.

One record per op x case x provider: median time, peak memory, achieved GB/s or TFLOP/s and the
fraction of the machine's measured limit (copy bandwidth for the memory-bound ops, the dense
matmul rate of the same dtype for ``linear_logprobs``), and the speedup against the group's
baseline (the plain-PyTorch reference, the trainers' eager formula, or the naive path).
"""

from __future__ import annotations

import re
import zlib
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


# One colour per provider in every plot: ours blue, the plain-PyTorch baselines greys, each
# trainer its own hue; a provider not listed gets a colour from its name (stable across runs).
PROVIDER_COLOURS = {
    "ppokernels-cpp": "#1f5fbf",
    "ppokernels-triton": "#3d8fe0",
    "ppokernels-cuda": "#5aa9f0",
    "linear_logprobs": "#8ab8e6",
    "reference": "#7f7f7f",
    "eager-formula": "#7f7f7f",
    "naive": "#7f7f7f",
    "trainer": "#7f7f7f",
    "reference-compiled": "#b5b5b5",
    "reference-compiled-step": "#b5b5b5",
    "liger-grpo": "#e67e22",
    "liger-flce": "#f5a962",
    "trl-chunked": "#8e44ad",
    "verl-fused-linear": "#c0392b",
    "verl-triton": "#e57373",
    "cce": "#27ae60",
}
_SHAPE_RE = re.compile(r"\((?:\d+, )*\d+\)")
_WORDS = (("forward+backward", "fwd+bwd"), ("forward", "fwd"), ("logprobs-only", "log-probs"))
_DTYPES = ("float32", "bfloat16", "float16")


def colour(provider: str) -> str:
    if provider in PROVIDER_COLOURS:
        return PROVIDER_COLOURS[provider]
    if provider.startswith("ppokernels-"):  # chunk sweeps and other variants of ours: light blue
        return "#9ec5ee"
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    return matplotlib.colors.to_hex(palette[zlib.crc32(provider.encode()) % len(palette)])


def short_cases(groups: list[str]) -> tuple[dict[str, str], list[str]]:
    """Short labels for benchmark groups ("<op> forward+backward (1024, 512, 151936) float32" ->
    "fwd+bwd, A") and the caption lines that give each letter's full shape."""
    letters: dict[str, str] = {}
    labels = {}
    several_ops = len({g.partition(" ")[0] for g in groups}) > 1
    for g in groups:
        op, _, case = g.partition(" ")
        case = f"{op} {case}" if several_ops else case
        for shape in _SHAPE_RE.findall(case):
            letters.setdefault(shape, chr(ord("A") + len(letters)))
            case = case.replace(shape, letters[shape])
        for long, short in _WORDS:
            case = case.replace(long, short)
        for dtype in _DTYPES:
            case = case.replace(f" {dtype}", "")
        labels[g] = case.strip()
    dtypes = sorted({d for g in groups for d in _DTYPES if g.endswith(" " + d)})
    caption = [f"{letter} = {shape}" for shape, letter in letters.items()]
    return labels, caption + ([", ".join(dtypes)] if dtypes else [])


def _fmt(key: str, v: float) -> str:
    if key == "peak_mem_mb":
        return f"{v:.0f} MiB" if v >= 10 else f"{v:.2g} MiB"
    return f"{v / 1e3:.3g} s" if v >= 1e3 else f"{v:.3g} ms"


def _layout(rows: list[dict], groups: list[str], providers: list[str]):
    """Bar positions: [(group, [(provider, y), ...], tick y)], one bar per present provider, the
    groups stacked with a gap of one bar between them."""
    out, y = [], 0.0
    for g in groups:
        present = [
            p for p in providers if any(r["group"] == g and r["provider"] == p for r in rows)
        ]
        bars = [(p, y + i) for i, p in enumerate(present)]
        out.append((g, bars, y + (len(present) - 1) / 2))
        y += len(present) + 1
    return out


def _ratio(x: float) -> str:
    return f"{x:.2g}x" if x < 10 else f"{x:.0f}x"


def _panel(ax, rows: list[dict], layout, labels, key: str) -> float:
    """Horizontal bars, each annotated with its value and its ratio to the group's baseline (time:
    the baseline's over this one, i.e. the speed-up; memory: this one over the baseline's)."""
    top = 0.0
    for g, bars, _ in layout:
        mine = {r["provider"]: r for r in rows if r["group"] == g}
        base = next((mine[p] for p in BASELINES if p in mine), None)
        for prov, y in bars:
            v = mine[prov].get(key)
            if v is None:
                continue
            ax.barh(y, max(v, 1e-3), height=0.85, color=colour(prov))
            text = _fmt(key, v)
            b = base and base.get(key)
            if b and prov != base["provider"]:
                text += "  " + _ratio(b / v if key == "median_ms" else v / b)
            ax.annotate(
                text,
                (max(v, 1e-3), y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
            top = max(top, v)
    ax.set_yticks([t for _, _, t in layout], [labels[g] for g, _, _ in layout], fontsize=8)
    ax.set_ylim(layout[-1][1][-1][1] + 0.8, -0.8)  # first group on top
    ax.spines[["top", "right"]].set_visible(False)
    return top


def figure(rows: list[dict], title: str, path: Path) -> None:
    """Time and peak memory side by side for ``rows`` (one op, or the headline cases), with one
    shared legend, short case names and their full shapes underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    groups = list(dict.fromkeys(r["group"] for r in sorted(rows, key=lambda r: r["group"])))
    order = {p: i for i, p in enumerate(PROVIDER_COLOURS)}
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (order.get(p, 99), p))
    labels, caption = short_cases(groups)
    layout = _layout(rows, groups, providers)
    nbars = sum(len(bars) + 1 for _, bars, _ in layout)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.4 + 0.22 * nbars), layout="constrained")
    has_mem = any(r.get("peak_mem_mb") is not None for r in rows)
    for ax, key, xlabel in (
        (axes[0], "median_ms", "median time (log scale); x = speed-up over the baseline"),
        (axes[1], "peak_mem_mb", "peak memory above the inputs (MiB); x = of the baseline's"),
    ):
        if key == "peak_mem_mb" and not has_mem:
            ax.set_axis_off()
            continue
        top = _panel(ax, rows, layout, labels, key)
        if key == "median_ms":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
            ax.xaxis.set_minor_formatter(NullFormatter())
            lo = min(r[key] for r in rows if r.get(key))
            ax.set_xlim(lo / 2, top * 30)  # room for the labels right of the longest bar
        else:
            ax.set_xlim(0, top * 1.6 if top > 0 else 1)
            if key == "peak_mem_mb":
                axes[1].set_yticklabels([])
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour(p)) for p in providers]
    baselines = sorted({r["reference_provider"] for r in rows if r.get("reference_provider")})
    fig.legend(handles, providers, loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11, fontweight="bold")
    notes = "; ".join(caption)
    if baselines:
        notes += ("; " if notes else "") + "baseline: " + ", ".join(baselines)
    fig.supxlabel(notes, fontsize=7, color="#444444")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(rows: list[dict], out: Path, summary: bool = False) -> list[str]:
    """One PNG per op (``OUT/<op>.png``); with ``summary``, also ``OUT/summary.png``: every row of
    the run in one figure (the demo preset's headline table)."""
    written = []
    for op in sorted({r["op"] for r in rows}):
        path = out / f"{op}.png"
        figure([r for r in rows if r["op"] == op], op, path)
        written.append(path.name)
    if summary and rows:
        figure(rows, "ppokernels: the headline cases", out / "summary.png")
        written.append("summary.png")
    return written
