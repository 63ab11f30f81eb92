"""Process-group setup and teardown for data-parallel runs (torchrun), and the few collectives
the loop needs: a sum, a mean of scalar metrics, and an "any process says stop" vote.

With one process every function is the identity, so the loop is written once."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading

import torch
import torch.distributed as dist


def init(device: str) -> tuple:
    """Join the process group when torchrun started several processes (``WORLD_SIZE > 1``):
    gloo on CPU, nccl on CUDA. ``device`` is the config's ``auto | cpu | cuda``.
    Returns ``(rank, world, torch.device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not cuda:
        return rank, world, torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return rank, world, torch.device("cuda", local)


def shutdown() -> None:
    """Leave the process group once every process got here, and free it.

    Why: gloo runs a transport thread and worker threads per process group. Anything that still
    references the group keeps them alive past ``destroy_process_group`` (which only drops the
    registry's references); a process that then reaches interpreter exit with those threads
    running can abort in teardown (SIGABRT, "terminate called without an active exception").
    The caller drops its DDP wrappers first (their reducers hold the group); the collection
    here frees the reference cycles DDP leaves behind, so the group's destructor joins its
    threads now. The barrier makes sure no peer still talks to this process.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    """Sum of ``x`` over processes (a copy; ``x`` itself is untouched)."""
    if world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def mean_metrics(stats: dict, world: int, device: torch.device) -> dict:
    """Average every scalar metric over processes (same keys on every process)."""
    if world == 1:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world).tolist(), strict=True))


def any_true(flag: bool, world: int, device: torch.device) -> bool:
    """True on every process when it is True on any (all stop together after a Ctrl-C)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(world: int):
    """A barrier callable for multi-process runs, None for one process."""
    return dist.barrier if world > 1 else None


class StopFlag:
    """Ctrl-C as a request: the first SIGINT sets :attr:`requested`, which the loop checks at
    safe points (every process votes with :func:`any_true`); a second one raises
    ``KeyboardInterrupt`` at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum=None, frame=None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        """SIGINT handled by this flag inside the block (only the main thread can do so)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = signal.signal(signal.SIGINT, self)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
