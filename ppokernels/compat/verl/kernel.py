"""veRL 0.9.1 fused linear log-probs: ``verl.utils.kernel.linear_cross_entropy`` and
``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (see the package doc)."""

from __future__ import annotations

import importlib.util

import torch

import ppokernels as ppk


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
):
    """``(logprobs, entropy)`` of ``hidden @ weight.T / temperature`` without the [N, V] logits:
    both float32 and flattened to (N,); ``reduction`` "sum"/"mean" applies to the log-probs."""
    assert isinstance(temperature, float), (
        f"temperature must be a float, but got {type(temperature)}"
    )
    assert isinstance(reduction, str), f"reduction must be a str, but got {type(reduction)}"
    reduction = reduction.lower()
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction}")
    lp, ent = ppk.linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        temperature=temperature,
        with_entropy=True,
        process_group=dist_process_group,
    )
    if reduction == "sum":
        lp = lp.sum()
    elif reduction == "mean":
        lp = lp.sum() / lp.numel()
    return lp, ent


class FusedLinearForPPO(torch.nn.Module):
    """``FusedLinearForPPO(chunk_size=512)(hidden_states, vocab_weights, input_ids, temperature)``
    -> ``(log_probs float32, entropy in the hidden dtype)``, shaped like ``input_ids``."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(
                f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'."
            )
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend
        # veRL takes its Liger path for impl_backend="liger" when Liger is installed; looked up
        # once here, not on every forward (find_spec walks sys.path)
        self._liger_path = (
            impl_backend == "liger" and importlib.util.find_spec("liger_kernel") is not None
        )

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        # veRL's refusals: its Liger path raises ValueError, its torch path asserts
        if self._liger_path:
            if hidden_states.ndim not in (2, 3):
                raise ValueError(
                    f"hidden_states must be 2D or 3D, got shape {tuple(hidden_states.shape)}"
                )
            if input_ids.shape != hidden_states.shape[:-1]:
                raise ValueError(
                    f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                    f"{tuple(hidden_states.shape[:-1])}"
                )
        assert hidden_states.ndim in (2, 3), (
            f"Invalid hidden_states shape, received {hidden_states.shape}"
        )
        if hidden_states.ndim == 3:
            assert input_ids.ndim == 2, (
                f"input_ids shape doesn't match, {hidden_states.shape} {input_ids.shape}"
            )
        shape = input_ids.shape
        lp, ent = ppk.linear_logprobs(
            hidden_states.reshape(-1, hidden_states.shape[-1]),
            vocab_weights,
            input_ids.reshape(-1).long(),
            temperature=float(temperature),
            with_entropy=True,
        )
        return lp.view(shape), ent.to(hidden_states.dtype).view(shape)
