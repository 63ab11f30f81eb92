"""Checkpoints of a :class:`~ppokernels.rl.state.TrainState`: its models as safetensors
(shared/tied tensors handled by ``save_model``) and, per process, its ``state_dict()`` (counters,
KL coefficient, optimizers, schedules, every RNG), so that a resumed run follows the same
trajectory as an uninterrupted one; and the exported model (``OUT/model``).

FSDP2 runs (``sharded``) write each process's shard instead: ``<model>_rank<r>.safetensors``
with the local tensors of every sharded parameter, and the optimizer state's local shards in
``state_rank<r>.pt``; they resume on the same number of processes. (Not torch's
``dcp.save``/``dcp.load`` files: their ``.metadata`` is a pickle that ``dcp.load`` unpickles,
i.e. a shared checkpoint could run code.)

The per-process state holds only tensors and plain types (RNG states as tensors), and is read
with ``torch.load(weights_only=True)``: a shared checkpoint folder can never run code on
``--resume``. Problems are :class:`CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
import shutil

import torch

from ppokernels.rl import parallel
from ppokernels.rl.state import TrainState

CKPT = "checkpoint"
MODEL = "model"


class CheckpointError(RuntimeError):
    """A missing, unreadable or inconsistent checkpoint (the message names the file)."""


def save(
    out: str, st: TrainState, *, rank: int, world: int, strategy: str, barrier=None, sharded=False
) -> str:
    """Write ``out/checkpoint`` atomically (a temp dir renamed into place by rank 0): the
    models of ``st`` (by rank 0, or their shards by every rank when ``sharded``) and this
    process's :meth:`TrainState.state_dict` with the run's ``world`` size and ``strategy``."""
    from safetensors.torch import save_file, save_model

    final = os.path.join(out, CKPT)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if barrier:
        barrier()
    for name, module in st.models().items():
        if module is not None and sharded:
            save_file(parallel.local_state(module), os.path.join(tmp, _file(name, rank, True)))
        elif module is not None and rank == 0:
            save_model(module, os.path.join(tmp, _file(name, rank, False)))
    state = dict(st.state_dict(), world=world, strategy=strategy)
    torch.save(state, os.path.join(tmp, f"state_rank{rank}.pt"))
    if barrier:
        barrier()
    if rank == 0:
        _replace_dir(tmp, final)
    if barrier:
        barrier()
    return final


def _replace_dir(tmp: str, final: str) -> None:
    """Move ``tmp`` to ``final``; at every instant one complete copy exists on disk."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _file(name: str, rank: int, sharded: bool) -> str:
    return f"{name}_rank{rank}.safetensors" if sharded else f"{name}.safetensors"


def require(out: str, *, rank: int, names: list, sharded: bool = False) -> None:
    """Raise :class:`CheckpointError` naming every file ``--resume`` needs and cannot find."""
    path = os.path.join(out, CKPT)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume: no checkpoint folder {path} (nothing to resume)")
    files = [_file(n, rank, sharded) for n in names] + [f"state_rank{rank}.pt"]
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"--resume: {path} lacks {', '.join(missing)}")


def load(out: str, st: TrainState, *, rank: int, world: int, strategy: str, device, sharded=False):
    """Load ``out/checkpoint`` into ``st``: its models, then its state (which must come from a
    run with the same number of processes and the same strategy)."""
    from safetensors.torch import load_file, load_model

    path = os.path.join(out, CKPT)
    models = st.models()
    names = [n for n, m in models.items() if m is not None]
    require(out, rank=rank, names=names, sharded=sharded)
    for name in names:
        f = os.path.join(path, _file(name, rank, sharded))
        try:
            if sharded:
                parallel.load_local_state(models[name], load_file(f, device=str(device)), f)
            else:
                load_model(models[name], f, device=str(device))
        except Exception as e:  # truncated file, wrong shapes, not safetensors at all
            raise CheckpointError(f"{f}: cannot load ({_first_line(e)})") from None
    f = os.path.join(path, f"state_rank{rank}.pt")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors/types is refused, not run
        raise CheckpointError(
            f"{f}: not a loadable ppokernels state file ({_first_line(e)})"
        ) from None
    if state.get("world", 1) != world:
        raise CheckpointError(
            f"checkpoint was written by {state.get('world')} processes, resuming with {world}"
        )
    if state.get("strategy", strategy) != strategy:
        raise CheckpointError(
            f"checkpoint was written with strategy={state['strategy']}, resuming with "
            f"strategy={strategy}"
        )
    st.load_state_dict(state)


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def export_model(out: str, model, tokenizer, full_state: dict | None = None) -> str:
    """``out/model``: ``save_pretrained`` of the policy and its tokenizer, so that plain
    transformers (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``) loads it.
    Written to a temp folder and renamed, so an interrupted export leaves the previous one.
    ``full_state``: the gathered weights of a sharded (FSDP2) ``model``, saved through a plain
    copy of its architecture (the sharded module's own class is FSDP's subclass)."""
    final = os.path.join(out, MODEL)
    tmp = final + ".tmp"
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    if full_state is not None:
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(full_state)
        plain.generation_config = model.generation_config
        model = plain
    shutil.rmtree(tmp, ignore_errors=True)
    logging.disable_progress_bar()  # "Writing model shards" bars would clutter the run's output
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, final)
    return final


# ---------------------------------------------------------------------------- the loop's state
def check_out_dir(
    out: str, *, rank: int, resume: bool, overwrite: bool, names: list, sharded: bool = False
) -> None:
    """Before anything is written: ``--resume`` needs a complete checkpoint; a fresh run must
    not silently replace another run's metrics."""
    if resume:
        require(out, rank=rank, names=names, sharded=sharded)
    elif not overwrite and os.path.exists(os.path.join(out, "metrics.jsonl")):
        raise CheckpointError(
            f"{out} already holds a run (metrics.jsonl); resume it with --resume "
            "or replace it with --overwrite"
        )
