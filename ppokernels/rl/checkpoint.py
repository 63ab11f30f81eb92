"""Checkpoints: models as safetensors (shared/tied tensors handled by ``save_model``), and per
process the optimizer, scheduler, controller and every RNG state, so that a resumed run follows
the same trajectory as an uninterrupted one."""

from __future__ import annotations

import os
import random
import shutil

import torch

CKPT = "checkpoint"


def rng_state(prompt_rng: random.Random, shuffle_gen: torch.Generator) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "prompt": prompt_rng.getstate(),
        "shuffle": shuffle_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, prompt_rng: random.Random, shuffle_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    prompt_rng.setstate(state["prompt"])
    shuffle_gen.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: str, *, rank: int, world: int, models: dict, state: dict, barrier=None) -> str:
    """Write ``out/checkpoint`` atomically (a temp dir renamed into place by rank 0). ``models``
    maps names to modules (saved by rank 0), ``state`` is this process's state (saved per rank)."""
    from safetensors.torch import save_model

    final = os.path.join(out, CKPT)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if barrier:
        barrier()
    if rank == 0:
        for name, module in models.items():
            if module is not None:
                save_model(module, os.path.join(tmp, f"{name}.safetensors"))
    torch.save(state, os.path.join(tmp, f"state_rank{rank}.pt"))
    if barrier:
        barrier()
    if rank == 0:
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def exists(out: str) -> bool:
    return os.path.exists(os.path.join(out, CKPT, "state_rank0.pt"))


def load(out: str, *, rank: int, models: dict, device) -> dict:
    """Load the models into the given modules and return this rank's state dict."""
    from safetensors.torch import load_model

    path = os.path.join(out, CKPT)
    for name, module in models.items():
        if module is not None:
            load_model(module, os.path.join(path, f"{name}.safetensors"), device=str(device))
    f = os.path.join(path, f"state_rank{rank}.pt")
    if not os.path.exists(f):
        raise FileNotFoundError(f"{f}: the checkpoint was written by fewer processes")
    # Our own file (optimizer state, RNG states, python tuples): not untrusted input.
    return torch.load(f, map_location="cpu", weights_only=False)
