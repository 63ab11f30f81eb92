"""Metrics: one JSON object per step in ``metrics.jsonl``, TensorBoard when installed, PNG plots at
the end (matplotlib, Agg backend), and the peak memory of the process."""

from __future__ import annotations

import json
import math
import os

import torch

MAIN_CURVES = (
    "reward_mean",
    "eval_reward",
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
        # A resumed run drops the rows written after its checkpoint, so the file stays one run.
        with open(self.path, "w") as f:
            for row in rows:
                if row.get("step", 0) <= (resume_step or 0):
                    f.write(json.dumps(row) + "\n")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out, "tb"))
            except Exception:  # tensorboard not installed: the JSONL log is enough
                self.tb = None

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
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(out: str) -> list:
    """``reward.png`` (train and eval reward) and ``curves.png`` (a grid of the main curves)."""
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if key == "eval_reward" and "eval_reward_initial" in rows[0]:
            pts.insert(0, (0, rows[0]["eval_reward_initial"]))  # before RL
        return [p[0] for p in pts], [p[1] for p in pts]

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*series("reward_mean"), label="train reward (mean)")
    xs, ys = series("eval_reward")
    if xs:
        ax.plot(xs, ys, "o-", label="eval reward (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out, "reward.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    keys = [k for k in MAIN_CURVES if series(k)[0]]
    cols = 3
    fig, axes = plt.subplots(
        (len(keys) + cols - 1) // cols, cols, figsize=(12, 3 * ((len(keys) + 2) // 3))
    )
    for ax, key in zip(list(getattr(axes, "flat", [axes])), keys, strict=False):
        ax.plot(*series(key), "-" if key != "eval_reward" else "o-")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    for ax in list(getattr(axes, "flat", [axes]))[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    paths.append(os.path.join(out, "curves.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
