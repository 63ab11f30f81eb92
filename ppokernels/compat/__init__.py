"""Drop-in replacements for the loss, advantage and log-prob functions of three RL trainers.

Each submodule keeps one trainer's names, signatures and semantics (value, gradient, dtype,
errors) and computes with ppokernels ops; ``patch()`` installs the replacements where that trainer
looks them up, ``unpatch()`` restores the originals.

============================  ==========  ====================================================
module                        targets     what ``patch()`` replaces
============================  ==========  ====================================================
:mod:`ppokernels.compat.verl`      verl 0.9.1  ``core_algos`` functions and registries,
                                          ``verl.utils.torch_functional`` helpers, the fused
                                          linear log-prob (``linear_cross_entropy``,
                                          ``FusedLinearForPPO``)
:mod:`ppokernels.compat.openrlhf`  0.11.2      ``PolicyLoss``, ``ValueLoss``, ``compute_approx_kl``,
                                          ``compute_reward``, log-prob/entropy helpers, the
                                          experience maker's GAE and returns
:mod:`ppokernels.compat.trl`       1.16.0      ``selective_log_softmax``, ``entropy_from_logits``,
                                          the fused LM head GRPO scores with; Liger-Kernel
                                          0.8.5's ``LigerFusedLinearGRPOLoss``
                                          (:mod:`ppokernels.compat.trl_liger`)
============================  ==========  ====================================================

ppokernels never imports a trainer at import time: each ``patch()`` imports the trainer's modules
it patches. Trainers that run losses in Ray workers (veRL, OpenRLHF) need ``patch()`` in every
worker process; see ``docs/compat.md``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["Patcher"]


class Patcher:
    """Records attribute replacements so that they can be undone in reverse order.

    ``set(obj, name, value)`` replaces one attribute (or dict entry when ``obj`` is a dict);
    ``everywhere(prefix, name, value)`` also replaces every module under ``prefix`` (already
    imported) that bound the original object by name (``from x import name``).
    """

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any, bool]] = []

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def set(self, obj: Any, name: str, value: Any) -> None:
        if isinstance(obj, dict):
            had, old = name in obj, obj.get(name)
            obj[name] = value
        else:
            had, old = hasattr(obj, name), getattr(obj, name, None)
            setattr(obj, name, value)
        self._undo.append((obj, name, old, had))

    def everywhere(self, prefix: str | tuple[str, ...], module: str, name: str, value: Any) -> None:
        """Replace ``module.name`` and every alias of the original under modules ``prefix*`` (a
        tuple: any of them)."""
        mod = importlib.import_module(module)
        original = getattr(mod, name)
        self.set(mod, name, value)
        for other_name, other in list(sys.modules.items()):
            if other is None or other is mod or not other_name.startswith(prefix):
                continue
            for attr, obj in list(vars(other).items()):
                if obj is original:
                    self.set(other, attr, value)

    def restore(self) -> None:
        while self._undo:
            obj, name, old, had = self._undo.pop()
            if isinstance(obj, dict):
                if had:
                    obj[name] = old
                else:
                    obj.pop(name, None)
            elif had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def float_dtype(*tensors) -> Any:
    """The floating dtype torch's type promotion gives ``tensors`` (the trainers' output dtype)."""
    import torch

    dtype = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype if dtype is not None else torch.get_default_dtype()
