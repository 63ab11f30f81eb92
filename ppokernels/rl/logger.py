"""Metrics: one JSON object per step in ``metrics.jsonl``, TensorBoard when installed, PNG plots at
the end (matplotlib, Agg backend), and the peak memory of the process."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

MAIN_CURVES = (
    "reward_mean",
    "eval_reward",
    "test_reward",
    "kl",
    "entropy",
    "policy_loss",
    "value_loss",
    "clipfrac",
    "response_len",
    "kl_coef",
)


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA caching allocator's peak, or the process's peak resident set
    (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """Appends rows to ``out/metrics.jsonl``; mirrors scalars to TensorBoard if available."""

    def __init__(self, out: str, *, resume_step: int | None, tensorboard: bool):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "metrics.jsonl")
        rows = read_metrics(self.path) if resume_step is not None else []
        keep = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        if resume_step is None or len(keep) < len(rows):
            # A resumed run drops the rows written after its checkpoint, so the file stays one
            # run; written aside and renamed, so an interruption cannot lose the kept rows.
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in keep)
            os.replace(self.path + ".tmp", self.path)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # say so: a silently missing TensorBoard log misleads
                print(
                    f"ppokernels train: TensorBoard logging off ({e}); "
                    "pip install 'ppokernels[rl]' or --set tensorboard=false",
                    file=sys.stderr,
                )
            else:
                self.tb = SummaryWriter(os.path.join(out, "tb"))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not JSON ({e.msg})") from None
    return rows


CURVE_LABELS = {  # y-axis label of each curve
    "reward_mean": "train reward (mean)",
    "eval_reward": "validation reward",
    "test_reward": "test reward",
    "kl": "KL(policy || ref) per token",
    "entropy": "entropy per token (nats)",
    "policy_loss": "policy loss",
    "value_loss": "value loss",
    "clipfrac": "clipped fraction",
    "response_len": "response length (tokens)",
    "kl_coef": "KL coefficient",
}


def _series(rows: list, key: str) -> tuple:
    """(steps, values) of ``key``; held-out rewards start at step 0 with the value before RL."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if rows and f"{key}_initial" in rows[0]:
        pts.insert(0, (0, rows[0][f"{key}_initial"]))
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(out: str) -> list:
    """``reward.png`` (train, validation and test reward) and ``curves.png`` (a grid of the
    main curves); every axis labelled."""
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_series(rows, "reward_mean"), label="train reward (mean of the rollout)")
    for key, style, label in (
        ("eval_reward", "o-", "validation reward (held-out)"),
        ("test_reward", "s--", "test reward (held-out, before and after)"),
    ):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    paths = [_save(fig, plt, os.path.join(out, "reward.png"))]

    keys = [k for k in MAIN_CURVES if _series(rows, k)[0]]
    cols = 3
    nrows = max(1, (len(keys) + cols - 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        ax.plot(*_series(rows, key), "o-" if key in ("eval_reward", "test_reward") else "-")
        ax.set_title(key)
        ax.set_xlabel("RL step")
        ax.set_ylabel(CURVE_LABELS.get(key, key))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    paths.append(_save(fig, plt, os.path.join(out, "curves.png")))
    return paths


def _save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
