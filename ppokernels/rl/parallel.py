"""How the loop spreads its models over processes and what precision the decoders compute in.

``strategy`` (``RLConfig.strategy``):

* ``none``: one process, plain modules.
* ``ddp``: every process holds a full copy of policy, reference, critic and optimizer state;
  ``DistributedDataParallel`` averages the gradients (``auto`` under torchrun).
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` shards each decoder layer, then the rest of
  each model (embeddings, final norm, lm_head, critic head) as one root group, for the policy,
  the frozen reference and the critic. The fused head stays fused: the root group is the
  :class:`~ppokernels.rl.models.PolicyScorer` itself, so inside its forward the lm_head weight
  is the gathered plain tensor that ``linear_logprobs`` needs, and its gradient is
  reduce-scattered back into the sharded parameter by FSDP's post-backward hook.

``precision="bf16"``: the decoders run in bfloat16 (autocast for none/ddp; FSDP2's
``MixedPrecisionPolicy`` with fp32 master weights, fp32 gradient reduction and fp32 optimizer
state). Log-probs, entropy, losses and the advantage scans stay fp32: the ops accumulate and
return fp32 for bf16 inputs. ``gradient_checkpointing``: Hugging Face's switch on the policy and
critic decoders (non-reentrant), so each layer's activations are recomputed in the backward.

Generation (``model.generate``) under FSDP2 runs inside :meth:`Parallel.gathered`: every
sharded group is all-gathered once and kept whole until generation ends, so sampling needs no
collective per token and rank 0 can evaluate alone. That costs one full copy of the policy per
process for the duration of the rollout (docs/rl.md says when to move to a serving engine).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ppokernels.rl.config import ConfigError


def decoder_layers(body: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face backbone (``layers`` for Llama/Qwen2, ``h`` for
    GPT-2): the first ``ModuleList`` among its children."""
    for child in body.children():
        if isinstance(child, nn.ModuleList):
            return child
    raise ValueError(f"{type(body).__name__}: cannot find the decoder layers to shard")


def enable_checkpointing(lm) -> None:
    """Hugging Face's activation checkpointing, non-reentrant (the form that composes with
    FSDP2). transformers >= 5.2x names it ``activation_checkpointing_enable``; older releases
    only have ``gradient_checkpointing_enable`` (now its deprecated alias)."""
    kw = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


class Parallel:
    """The resolved strategy and precision of one run (see the module docstring)."""

    def __init__(self, cfg, world: int, device: torch.device):
        strategy = cfg.strategy
        if strategy == "auto" or (strategy == "ddp" and world == 1):
            strategy = "ddp" if world > 1 else "none"  # DDP over one process is the identity
        if strategy == "fsdp2" and world == 1:
            raise ConfigError("strategy=fsdp2 needs several processes: start it with torchrun")
        if strategy == "none" and world > 1:
            raise ConfigError(f"strategy=none with {world} processes: use ddp or fsdp2")
        self.strategy, self.world, self.device = strategy, world, device
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.checkpointing = cfg.gradient_checkpointing

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp2"

    @property
    def build_device(self) -> torch.device:
        """Where the models are built before :meth:`prepare`: host memory under FSDP2
        (``fully_shard`` moves each process's shards to its GPU), else the run's device."""
        return torch.device("cpu") if self.fsdp else self.device

    # ------------------------------------------------------------------------------ models
    def prepare(self, root: nn.Module, body: nn.Module, lm=None) -> nn.Module:
        """Set up one model in place before its optimizer exists: ``root`` is the module whose
        forward the loop calls (a PolicyScorer or the Critic), ``body`` its decoder backbone,
        ``lm`` the PreTrainedModel that owns gradient checkpointing (None: no checkpointing,
        as for the frozen reference)."""
        if self.checkpointing and lm is not None:
            enable_checkpointing(lm)
            root.checkpointing = True
        if self.bf16 and not self.fsdp:
            root.autocast_dtype = torch.bfloat16
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if self.bf16 else None, reduce_dtype=torch.float32
            )
            for layer in decoder_layers(body):
                fully_shard(layer, mp_policy=mp)
            fully_shard(root, mp_policy=mp)
        return root

    def train_module(self, module: nn.Module | None):
        """The module the training forward goes through: a DDP wrapper, or ``module`` itself
        (FSDP2 changes the module in place)."""
        if module is None or self.strategy != "ddp":
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = self.device
        return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)

    def no_sync(self, modules: list, skip: bool):
        """No gradient synchronisation inside the block (micro-batches before the last)."""
        modules = [m for m in modules if m is not None]
        stack = contextlib.ExitStack()
        if not skip or self.strategy == "none":
            return stack
        if self.strategy == "ddp":
            for m in modules:
                stack.enter_context(m.no_sync())
            return stack
        for m in modules:
            m.set_requires_gradient_sync(False)
            stack.callback(m.set_requires_gradient_sync, True)
        return stack

    @staticmethod
    def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
        """``clip_grad_norm_`` over every parameter; the norm is global (sharded or not)."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the partial sums
            norm = norm.full_tensor()
        return float(norm)

    @contextlib.contextmanager
    def gathered(self, *roots: nn.Module):
        """Inside the block, every FSDP2 group of ``roots`` is unsharded (all processes must
        enter); outside FSDP2 it does nothing. ``model.generate`` then runs locally."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        groups = [m for r in roots for m in r.modules() if isinstance(m, FSDPModule)]
        inner = [m for m in groups if not any(m is r for r in roots)]
        for r in roots:
            # FSDP2 decides which module is the root at the first forward; generation would
            # run a layer's forward first and make it a root of its own. Initialise from the
            # real root now (FSDP2 has no public call for this; a no-op once initialised).
            r._get_fsdp_state()._lazy_init()
        for m in groups:
            m.unshard()
        for m in inner:  # layers would reshard after each forward, i.e. once per token
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in inner:
                m.set_reshard_after_forward(True, recurse=False)
            for m in groups:
                m.reshard()

    def full_state_dict(self, root: nn.Module) -> dict | None:
        """Under FSDP2, the full (unsharded) state dict of ``root`` on CPU, on rank 0 (empty
        elsewhere; every process must call it); None otherwise (``root`` is whole already)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(root, options=opts)


# ---------------------------------------------------------------------- sharded checkpoints
def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def local_state(module: nn.Module) -> dict:
    """This process's shard of every tensor of ``module.state_dict()`` (plain tensors), one
    entry per distinct tensor (tied weights appear once, under their first name)."""
    return {key: local.detach().contiguous() for key, local in _distinct_locals(module)}


def _distinct_locals(module: nn.Module):
    """(key, local tensor) for each distinct tensor of ``module.state_dict()``: tied weights
    (the same storage under two names) are yielded once, under their first name."""
    DTensor, seen = _dtensor(), set()
    for key, value in module.state_dict().items():
        local = value.to_local() if isinstance(value, DTensor) else value
        where = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if where not in seen:
            seen.add(where)
            yield key, local


def load_local_state(module: nn.Module, tensors: dict, name: str) -> None:
    """Copy a :func:`local_state` of the same model and world size back into ``module``;
    ``ValueError`` naming ``name`` (the file) when a tensor is missing or has another shape."""
    with torch.no_grad():
        for key, local in _distinct_locals(module):
            t = tensors.get(key)
            if t is None or t.shape != local.shape:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise ValueError(f"{name}: {key} is {got}, expected {tuple(local.shape)}")
            local.copy_(t)


def optimizer_to_local(state: dict) -> dict:
    """An optimizer ``state_dict()`` with every DTensor replaced by its local shard."""
    DTensor = _dtensor()

    def conv(x):
        if isinstance(x, DTensor):
            return x.to_local().detach().clone()
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return {"state": conv(state["state"]), "param_groups": state["param_groups"]}


def optimizer_from_local(state: dict, opt: torch.optim.Optimizer) -> dict:
    """The inverse of :func:`optimizer_to_local` for ``opt``: per-parameter tensors shaped like
    the parameter's shard become DTensors with the parameter's mesh and placements."""
    DTensor = _dtensor()
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for idx, per_param in state["state"].items():
        p = params[int(idx)]
        conv = {}
        for k, v in per_param.items():
            shard = isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0
            if shard and v.shape == p.to_local().shape:
                v = DTensor.from_local(
                    v,
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
            conv[k] = v
        out[idx] = conv
    return {"state": out, "param_groups": state["param_groups"]}
