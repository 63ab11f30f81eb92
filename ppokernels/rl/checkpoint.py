"""Checkpoints: models as safetensors (shared/tied tensors handled by ``save_model``), and per
process the optimizer, scheduler, controller and every RNG state, so that a resumed run follows
the same trajectory as an uninterrupted one; and the exported model (``OUT/model``).

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
import random
import shutil

import torch

from ppokernels.rl import parallel

CKPT = "checkpoint"
MODEL = "model"


class CheckpointError(RuntimeError):
    """A missing, unreadable or inconsistent checkpoint (the message names the file)."""


def rng_state(prompt_rng: random.Random, shuffle_gen: torch.Generator) -> dict:
    """Every RNG state as tensors: torch's byte tensors as they are, Python's Mersenne Twister
    state (version, 625 words, gauss_next) as an int64 tensor."""
    state = {
        "torch": torch.get_rng_state(),
        "python": _py_state(random.getstate()),
        "prompt": _py_state(prompt_rng.getstate()),
        "shuffle": shuffle_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, prompt_rng: random.Random, shuffle_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_from_py_state(state["python"]))
    prompt_rng.setstate(_from_py_state(state["prompt"]))
    shuffle_gen.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state(s: tuple) -> dict:
    version, words, gauss = s
    return {
        "version": int(version),
        "words": torch.tensor(words, dtype=torch.int64),
        "gauss": None if gauss is None else float(gauss),
    }


def _from_py_state(d: dict) -> tuple:
    return d["version"], tuple(int(w) for w in d["words"].tolist()), d["gauss"]


def save(
    out: str, *, rank: int, world: int, models: dict, state: dict, barrier=None, sharded=False
) -> str:
    """Write ``out/checkpoint`` atomically (a temp dir renamed into place by rank 0). ``models``
    maps names to modules (saved by rank 0, or their shards by every rank when ``sharded``),
    ``state`` is this process's state (saved per rank)."""
    from safetensors.torch import save_file, save_model

    final = os.path.join(out, CKPT)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if barrier:
        barrier()
    for name, module in models.items():
        if module is not None and sharded:
            save_file(parallel.local_state(module), os.path.join(tmp, _file(name, rank, True)))
        elif module is not None and rank == 0:
            save_model(module, os.path.join(tmp, _file(name, rank, False)))
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


def load(out: str, *, rank: int, models: dict, device, sharded: bool = False) -> dict:
    """Load the models into the given modules and return this rank's state dict."""
    from safetensors.torch import load_file, load_model

    path = os.path.join(out, CKPT)
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
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors/types is refused, not run
        raise CheckpointError(
            f"{f}: not a loadable ppokernels state file ({_first_line(e)})"
        ) from None


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


def trainer_state(tr) -> dict:
    """This process's part of a :class:`~ppokernels.rl.trainer.Trainer`'s state: counters,
    KL coefficient, optimizers, schedulers and RNGs (tensors and plain values only)."""
    return {
        "step": tr.step,
        "elapsed": tr.elapsed,
        "kl_coef": tr.kl_ctl.value,
        "opt": parallel.optimizer_to_local(tr.opt.state_dict()),
        "sched": tr.sched.state_dict(),
        "vopt": parallel.optimizer_to_local(tr.vopt.state_dict()) if tr.vopt else None,
        "vsched": tr.vsched.state_dict() if tr.vsched else None,
        "rng": rng_state(tr.prompt_rng, tr.shuffle_gen),
        "world": tr.world,
        "strategy": tr.par.strategy,
    }


def restore_trainer(tr, state: dict) -> None:
    """The inverse of :func:`trainer_state` (the models are loaded by :func:`load`)."""
    if state.get("world", 1) != tr.world:
        raise CheckpointError(
            f"checkpoint was written by {state.get('world')} processes, resuming with {tr.world}"
        )
    if state.get("strategy", tr.par.strategy) != tr.par.strategy:
        raise CheckpointError(
            f"checkpoint was written with strategy={state['strategy']}, resuming with "
            f"strategy={tr.par.strategy}"
        )
    tr.step, tr.elapsed = state["step"], state["elapsed"]
    tr.kl_ctl.value = state["kl_coef"]
    tr.opt.load_state_dict(parallel.optimizer_from_local(state["opt"], tr.opt))
    tr.sched.load_state_dict(state["sched"])
    if tr.vopt is not None:
        tr.vopt.load_state_dict(parallel.optimizer_from_local(state["vopt"], tr.vopt))
        tr.vsched.load_state_dict(state["vsched"])
    set_rng_state(state["rng"], tr.prompt_rng, tr.shuffle_gen)
