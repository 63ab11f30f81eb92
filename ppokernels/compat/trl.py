"""Drop-in replacements for TRL's log-prob helpers and GRPO loss, targeting **trl 1.16.0** (PyPI).

- ``selective_log_softmax``, ``entropy_from_logits``, ``selective_log_softmax_and_entropy``
  (``trl.trainer.utils``): same signatures (temperature, ``row_mask``, ``(..., K)`` indices),
  values and gradients; outputs are float32 like TRL's own Triton path on CUDA (its CPU
  fallback returns the logits' dtype).
- ``ChunkedLogProbFunction``: the fused LM head GRPO scores completions with in 1.16.0
  (``model(..., fused_lm_head=True)`` calls ``trl.trainer.utils._ChunkedLogProbFunction``), on
  :func:`ppokernels.linear_logprobs`. Calls it cannot serve (Gemma soft-capping, the extra
  ``log_sum_sq_probs`` / ``mean_logits`` / ``is_top1`` outputs) go to TRL's own function.
- ``grpo_loss``: the scalar ``GRPOTrainer._compute_loss`` returns for the clipped loss types
  (grpo, bnpo, dr_grpo, dapo, luspo), token or sequence (GSPO) importance sampling, two-sided
  ``delta`` clipping, the k3 KL term (optionally IS-corrected), from per-token log-probs.

Switch on (one process per GPU, no Ray)::

    import ppokernels.compat.trl as ppk_trl
    ppk_trl.patch()           # before building the GRPOTrainer

- ``vllm_importance_sampling_ratio``: the ratio ``GRPOTrainer._generate_and_score_completions``
  computes between the recomputed and the vLLM log-probs for each ``vllm_importance_sampling_mode``
  (token_truncate, token_mask, sequence_truncate, sequence_mask) and the ``sampling/*`` metrics
  it logs, from one :func:`ppokernels.rollout_correction` call; pass the ratio to ``grpo_loss``.
- ``LigerFusedLinearGRPOLoss`` (:mod:`ppokernels.compat.trl_liger`): Liger-Kernel 0.8.5's fused
  lm_head + GRPO loss, same interface, on :func:`ppokernels.linear_ppo_policy_loss`.

TRL 1.16.0 no longer ships a PPO trainer (``trl.experimental.ppo`` is gone) and its GRPO trainer
no longer calls Liger's ``LigerFusedLinearGRPOLoss`` (``use_liger_kernel`` only swaps layer
kernels); its fused-LM-head slot is ``_ChunkedLogProbFunction``, which :func:`patch` replaces.
:func:`patch` still installs the Liger drop-in in ``liger_kernel.chunked_loss`` (and every trl
module that bound the name), for code that builds that loss itself.
"""

from __future__ import annotations

import torch

import ppokernels as ppk
from ppokernels.compat import Patcher
from ppokernels.compat.trl_liger import (
    LigerFusedLinearGRPOFunction,
    LigerFusedLinearGRPOLoss,
    liger_fused_linear_grpo,
)
from ppokernels.losses import CISPO, SAPO, Clip, Vespo
from ppokernels.reference.rollout_correction import ROW_STATS

__all__ = [
    "ChunkedLogProbFunction",
    "LigerFusedLinearGRPOFunction",
    "LigerFusedLinearGRPOLoss",
    "entropy_from_logits",
    "grpo_loss",
    "liger_fused_linear_grpo",
    "patch",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
    "vllm_importance_sampling_ratio",
]

TARGET_VERSION = "1.16.0"


def selective_log_softmax(logits, index, temperature: float = 1.0, row_mask=None):
    """``log_softmax(logits / temperature)`` gathered at ``index`` ((...) or (..., K)); rows where
    ``row_mask`` is 0 give 0. float32 output (float64 for float64 logits)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if index.ndim == logits.ndim - 1:
        labels = index if row_mask is None else index.masked_fill(row_mask == 0, -100)
        return ppk.token_logprobs(logits, labels, temperature=temperature)[0]
    # (..., K): one pass gives log p_0 = z_0 / t - lse; the K log-probs are z_k / t - lse. Written
    # this way the gradient is also exact: d/dz of (z_k - z_0) / t + log p_0 is (1[k] - p) / t.
    first = torch.zeros(index.shape[:-1], dtype=torch.long, device=index.device)
    lp0 = ppk.token_logprobs(logits, first, temperature=temperature)[0]
    z = logits.to(lp0.dtype) / temperature
    out = z.gather(-1, index.long()) - z[..., :1] + lp0.unsqueeze(-1)
    return out if row_mask is None else out.masked_fill(row_mask == 0, 0.0)


def entropy_from_logits(logits, chunk_size: int = 128):
    """Entropy of ``softmax(logits)`` per row, ``logits.shape[:-1]``, float32 (one pass per row:
    no chunking needed)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return ppk.token_logprobs(logits, labels, with_entropy=True)[1]


def selective_log_softmax_and_entropy(
    logits, index, entropy_requires_grad: bool = True, temperature: float = 1.0, row_mask=None
):
    """Both from one pass over the logits; masked rows give 0 for both."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    labels = index if row_mask is None else index.masked_fill(row_mask == 0, -100)
    lp, ent = ppk.token_logprobs(logits, labels, temperature=temperature, with_entropy=True)
    return lp, ent if entropy_requires_grad else ent.detach()


class ChunkedLogProbFunction:
    """Same ``apply(hidden [N, H], weight [V, H], bias, targets [N], temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=...)`` as TRL's, returning
    ``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` with None for what was not
    requested; logits are ``(hidden @ weight.T + bias) * logit_scale / temperature``."""

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
    ):
        if (
            final_logit_softcapping is not None
            or logit_scale <= 0
            or set(outputs) - {"log_probs", "entropy"}
        ):
            from trl.kernels import chunked_logprob  # TRL's own, never patched

            return chunked_logprob.ChunkedLogProbFunction.apply(
                hidden,
                weight,
                bias,
                targets,
                temperature,
                chunk_size,
                final_logit_softcapping,
                logit_scale,
                outputs,
            )
        with_entropy = "entropy" in outputs
        compute_dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        if _ROUND_LOGITS[0] and compute_dtype in (torch.bfloat16, torch.float16):
            lp, ent = _rounded_head(
                hidden, weight, bias, targets, temperature, logit_scale, with_entropy, compute_dtype
            )
            return lp, ent, None, None, None
        # scale / temperature folds into one temperature (no soft-capping in between)
        lp, ent = ppk.linear_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=float(temperature) / float(logit_scale),
            with_entropy=with_entropy,
        )
        return lp, ent, None, None, None


# patch(round_logits=True): reproduce TRL's rounding of bf16/fp16 logits (a list: mutable here)
_ROUND_LOGITS = [False]
_ROUND_ROWS = 1024  # rows per chunk of the rounded head (TRL's TOKEN_CHUNK_SIZE is of this order)


def _rounded_chunk(h, weight, bias, y, temperature, with_entropy, dtype):
    logits = torch.mm(h.to(dtype), weight.to(dtype).t())  # rounded to dtype, as TRL's tiles
    if bias is not None:
        logits = logits + bias.to(dtype)  # a second rounding, as TRL's tile.add_(bias)
    return ppk.token_logprobs(logits, y, temperature=temperature, with_entropy=with_entropy)


def _rounded_head(hidden, weight, bias, targets, temperature, logit_scale, with_entropy, dtype):
    """TRL's arithmetic on low-precision weights: logits rounded to ``dtype`` before the fp32
    log-softmax. Chunks of rows, each recomputed in the backward (checkpointed), so no more than
    ``_ROUND_ROWS x V`` logits exist at a time."""
    from torch.utils.checkpoint import checkpoint

    t = float(temperature) / float(logit_scale)
    lps, ents = [], []
    for s in range(0, hidden.shape[0], _ROUND_ROWS):
        h, y = hidden[s : s + _ROUND_ROWS], targets[s : s + _ROUND_ROWS]
        lp, ent = checkpoint(
            _rounded_chunk, h, weight, bias, y, t, with_entropy, dtype, use_reentrant=False
        )
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps) if lps else hidden.new_zeros(0, dtype=torch.float32)
    return lp, (torch.cat(ents) if with_entropy and ents else None)


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


def _agg_extra(x, mask, loss_type):
    """An extra per-token term aggregated like ``ppo_policy_loss``'s ``agg`` for ``loss_type``
    (the same normalisers then apply to both)."""
    x = x * mask
    if loss_type in ("grpo", "sapo"):
        return (x.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return x.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "luspo":
        return x.sum(-1).mean()
    return x.sum()


def grpo_loss(
    per_token_logps,
    old_per_token_logps,
    advantages,
    mask,
    *,
    loss_type="dapo",
    epsilon_low=0.2,
    epsilon_high=0.2,
    importance_sampling_level="token",
    delta=None,
    beta=0.0,
    ref_per_token_logps=None,
    use_bias_correction_kl=False,
    max_completion_length=None,
    num_items_in_batch=None,
    num_processes=1,
    gradient_accumulation_steps=1,
    steps_per_generation=1,
    training=True,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    importance_sampling_ratio=None,
):
    """The loss ``GRPOTrainer._compute_loss`` returns (trl 1.16.0) for every ``loss_type``
    (off-policy and entropy masks and the entropy bonus off). grpo / bnpo / dr_grpo / dapo /
    luspo: per token ``-min(w A, clip(w, 1 - eps_low, 1 + eps_high) A)`` with ``w``
    = exp(lp - old) (token) or exp(masked mean of lp - old) (sequence, GSPO), ``w = min(w,
    delta)`` in the unclipped term; cispo: ``-sg(min(w, eps_high)) A lp`` (token level);
    sapo: ``-sigmoid(tau (w - 1)) 4 / tau A`` (``tau = sapo_temperature_pos`` if A > 0 else
    ``_neg``); vespo: ``-phi A lp`` with TRL's gamma weight ``phi`` of the summed, clamped
    log-ratio (``get_gamma_weights``; ``importance_sampling_ratio`` enters its log-weight).
    Every other type multiplies the token loss by ``importance_sampling_ratio`` (vLLM IS,
    [B, T]) when given. Then ``+ beta k3(lp, ref)``; aggregated as TRL: grpo / sapo = mean of
    row means / G, bnpo = token mean / G, dr_grpo = sum / (B L) / G, dapo / cispo / vespo =
    sum / (num_items / num_processes * G / steps_per_generation), luspo = mean of row sums / G,
    with G = gradient_accumulation_steps in training (1 in eval)."""
    # TRL's own refusals, in its order: the level, then the loss type
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"Unknown importance sampling level: {importance_sampling_level}. Possible values are "
            "'token' and 'sequence'."
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type}")
    if loss_type == "cispo" and importance_sampling_level != "token":
        raise NotImplementedError("grpo_loss: cispo at importance_sampling_level='sequence'")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.expand_as(per_token_logps)
    if importance_sampling_level == "token":
        lp, old = per_token_logps, old_per_token_logps
    else:  # sequence: every token carries the sequence log-ratio (full gradient of the mean)
        n = mask.sum(-1, keepdim=True).clamp(min=1.0)
        lp = ((per_token_logps * mask).sum(-1, keepdim=True) / n).expand_as(per_token_logps)
        old = ((old_per_token_logps * mask).sum(-1, keepdim=True) / n).expand_as(lp)
    clipped = loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    if clipped and delta is not None and delta < 1 + epsilon_high:
        raise NotImplementedError("grpo_loss: delta below 1 + epsilon_high")
    # delta >= 1 + eps_high caps only A < 0 tokens at -delta A: exactly the dual clip
    agg = {
        "grpo": "seq-mean-token-mean",
        "sapo": "seq-mean-token-mean",
        "bnpo": "token-mean",
        "luspo": "seq-mean-token-sum",
    }
    # the KL term uses the per-token log-probs even at sequence level: fused only when the
    # ratio is per token and not IS-weighted
    kl_in_loss = beta != 0.0 and not use_bias_correction_kl and importance_sampling_level == "token"
    spec, logratio_clamp = Clip(epsilon_low, epsilon_high, dual_clip=delta), None
    if loss_type == "cispo":
        spec = CISPO(epsilon_low, ratio_cap=epsilon_high)
    elif loss_type == "sapo":
        spec = SAPO(sapo_temperature_pos, sapo_temperature_neg)
    elif loss_type == "vespo":  # phi reads the per-token log-ratios at either level
        spec = Vespo(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        logratio_clamp = 20.0
    token = loss_type in ("cispo", "vespo")
    out = ppk.ppo_policy_loss(
        per_token_logps if token else lp,
        (old_per_token_logps if token else old).detach(),
        advantages,
        mask,
        loss=spec,
        logratio_clamp=logratio_clamp,
        agg=agg.get(loss_type, "token-sum"),
        ref_logprobs=ref_per_token_logps if kl_in_loss else None,
        kl_coef=beta if kl_in_loss else 0.0,
        kl_estimator="k3",
        is_weights=importance_sampling_ratio,
    )
    loss = out.loss
    if beta != 0.0 and not kl_in_loss:
        kl = ppk.kl_penalty(per_token_logps, ref_per_token_logps, estimator="k3")
        if use_bias_correction_kl:
            kl = kl * torch.exp(lp - old.detach())
        loss = loss + beta * _agg_extra(kl, mask, loss_type)
    G = gradient_accumulation_steps if training else 1.0
    if loss_type == "dr_grpo":
        return loss / (per_token_logps.size(0) * max_completion_length) / G
    if loss_type in ("dapo", "cispo", "vespo"):
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        return loss / normalizer
    return loss / G


VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def vllm_importance_sampling_ratio(
    old_per_token_logps,
    sampling_per_token_logps,
    mask,
    *,
    mode="sequence_mask",
    clip_min=None,
    clip_max=3.0,
):
    """``(ratio, metrics)`` as TRL 1.16 ``GRPOTrainer._generate_and_score_completions`` computes
    them with ``vllm_importance_sampling_correction`` (``mask`` = completion mask times tool mask).

    ``x = (old - sampling) * mask`` with NaN set to 0 (a token vLLM could not score weighs 1);
    token modes ``exp(x)`` [B, T] (1 before the bounds on masked tokens), sequence modes
    ``exp(sum_t x)`` [B, 1]: TRL's sequence ratio is the *product* of the token ratios (ppokernels
    level "sequence_sum"), no log-ratio clamp. ``*_truncate`` clamps to [clip_min, clip_max],
    ``*_mask`` sets ratios outside to 0 (None: no bound on that side). ``metrics`` holds the
    process-local values TRL logs: ``sampling/sampling_logp_difference/{mean,max}`` (|old -
    sampling| over valid, non-NaN tokens) and ``sampling/importance_sampling_ratio/{min,mean,
    max}`` (over valid tokens, or over rows), as 0-d tensors (0 when empty)."""
    # TRL's refusals, in its order: GRPOConfig's checks of the bounds, then the mode at run time
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(
            f"vllm_importance_sampling_clip_min ({clip_min}) must be less than "
            f"vllm_importance_sampling_clip_max ({clip_max})."
        )
    if mode in ("token_truncate", "sequence_truncate") and clip_min is None and clip_max is None:
        raise ValueError(
            "At least one of `vllm_importance_sampling_clip_min` or "
            "`vllm_importance_sampling_clip_max` must be set when `vllm_importance_sampling_mode` "
            "is a `*_truncate` mode."
        )
    if mode not in VLLM_IS_MODES:
        raise ValueError(
            f"Unknown vLLM importance sampling level: {mode}. Possible values are "
            "'token_truncate', 'token_mask', 'sequence_truncate', and 'sequence_mask'."
        )
    old, sampling = old_per_token_logps, sampling_per_token_logps
    valid = mask.bool()
    nan = bool(torch.isnan(old.sum() + sampling.sum()))  # one reduction, no [B, T] temporary
    if nan:  # TRL zeroes a NaN difference (ratio 1) and leaves it out of the |delta| metrics
        bad = torch.isnan(old - sampling)
        delta = (old - sampling).abs()[valid & ~bad]
        old, sampling = old.masked_fill(bad, 0.0), sampling.masked_fill(bad, 0.0)
    token = mode.startswith("token")
    out = ppk.rollout_correction(
        old,
        sampling,
        mask,
        level="token" if token else "sequence_sum",
        mode="truncate" if mode.endswith("truncate") else "mask",
        bounds=(clip_min, clip_max),
        logratio_clamp=None,
    )
    m = out.metrics
    dtype = torch.promote_types(old.dtype, sampling.dtype)
    if token:  # masked tokens carry exp(0) = 1, bounded
        one = 1.0
        if mode.endswith("truncate"):  # torch.clamp(1, clip_min, clip_max)
            one = one if clip_min is None else max(one, clip_min)
            one = one if clip_max is None else min(one, clip_max)
        else:
            inside = (clip_min is None or clip_min <= 1.0) and (clip_max is None or 1.0 <= clip_max)
            one = 1.0 if inside else 0.0
        ratio = torch.where(valid, out.weights, one).to(dtype)
        stats = ("weights_min", "weights_mean", "weights_max")
    else:
        ratio = out.row_stats[:, ROW_STATS.index("seq_weight")].unsqueeze(-1).to(dtype)
        stats = ("seq_weight_min", "seq_weight_mean", "seq_weight_max")
    f32 = torch.float32
    if nan:
        empty = delta.numel() == 0
        zero = torch.zeros((), device=old.device)
        diff = (zero if empty else delta.mean(), zero if empty else delta.max())
    else:
        diff = (m["logratio_abs_mean"], m["logratio_abs_max"])
    metrics = {
        "sampling/sampling_logp_difference/mean": diff[0].to(f32),
        "sampling/sampling_logp_difference/max": diff[1].to(f32),
    }
    for key, name in zip(("min", "mean", "max"), stats, strict=True):
        metrics[f"sampling/importance_sampling_ratio/{key}"] = m[name].to(f32)
    return ratio, metrics


_PATCHER = Patcher()


def patch(*, round_logits: bool = False) -> None:
    """Install the replacements in ``trl.trainer.utils`` (and every trl module that imported
    them by name): the three log-prob/entropy helpers and the fused LM head's
    ``_ChunkedLogProbFunction``; and, when liger-kernel is installed, ``LigerFusedLinearGRPOLoss``
    and ``LigerFusedLinearGRPOFunction`` (``liger_kernel.chunked_loss.grpo_loss``) and the
    functional ``liger_fused_linear_grpo`` (``.functional``), in their modules and every
    liger_kernel / trl module that bound them by name (TRL 1.16's trainers look them up nowhere;
    earlier ones imported the class from there).

    ``round_logits=True``: on bf16/fp16 weights the fused head rounds the logits to that dtype
    before the fp32 log-softmax, as TRL's own ``ChunkedLogProbFunction`` does, so a patched run
    agrees with an unpatched one (docs/compat.md gives the size of the difference). The default
    keeps the logits in fp32, which is closer to the exact (fp64) values."""
    if not isinstance(round_logits, bool):
        raise TypeError(f"patch: round_logits must be a bool, got {type(round_logits).__name__}")
    _ROUND_LOGITS[0] = round_logits
    if _PATCHER.active:
        return
    g = globals()
    for name in (
        "selective_log_softmax",
        "entropy_from_logits",
        "selective_log_softmax_and_entropy",
    ):
        _PATCHER.everywhere("trl", "trl.trainer.utils", name, g[name])
    import trl.trainer.utils as utils

    # only the trainer's slot: trl.kernels keeps its class (our fallback calls it)
    _PATCHER.set(utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    try:
        import liger_kernel.chunked_loss  # noqa: F401  (binds the class in its namespace)
    except ImportError:  # liger-kernel is optional: nothing to replace
        return
    import liger_kernel.chunked_loss.functional  # noqa: F401  (binds liger_fused_linear_grpo)

    grpo_loss, functional = (
        "liger_kernel.chunked_loss.grpo_loss",
        "liger_kernel.chunked_loss.functional",
    )
    for module, name, ours in (
        (grpo_loss, "LigerFusedLinearGRPOLoss", LigerFusedLinearGRPOLoss),
        (grpo_loss, "LigerFusedLinearGRPOFunction", LigerFusedLinearGRPOFunction),
        (functional, "liger_fused_linear_grpo", liger_fused_linear_grpo),
    ):
        _PATCHER.everywhere(("trl", "liger_kernel"), module, name, ours)


def unpatch() -> None:
    """Restore everything :func:`patch` replaced."""
    _ROUND_LOGITS[0] = False
    _PATCHER.restore()
