"""ppo_loss family: argument checks, fake kernels and autograd of the registered ops.

The forward ops return (loss, metrics, row_stats): row_stats holds what the fused backward needs per
row (the aggregation weight, and for ppo_policy_loss the sequence log-ratio of GSPO), so the
backward is one elementwise pass without a second reduction. Gradients flow to logprobs,
ref_logprobs and entropy (policy) and to values (value loss); old_logprobs, advantages, is_weights,
old_values and returns are constants, as in the trainers (they are rollout data).
"""

from __future__ import annotations

import torch

from ppokernels import _backend
from ppokernels.ops import _checks
from ppokernels.ops._register import op, register_fake_cpp, variants
from ppokernels.reference import AGG_MODES

if _backend.HAS_TRITON:
    import ppokernels.triton.ppo_loss  # noqa: F401  (registers the ppokernels::*_triton ops)
    import ppokernels.triton.ppo_loss_value  # noqa: F401

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
RATIO_LEVELS = ("token", "sequence")


def check_data(name: str, x, *, like: torch.Tensor | None = None, arg: str) -> torch.Tensor:
    """A float [B, T] tensor (shape and device of ``like`` when given), not on meta."""
    _checks.tensor(name, arg, x, ndim=2)
    if x.device.type == "meta":
        raise ValueError(f"{name}: {arg} is on the meta device; pass real (cpu/cuda) tensors")
    if like is not None:
        _checks.same_shape(name, arg, x, "logprobs" if name != "value_loss" else "values", like)
        _checks.same_device(name, arg, x, like)
    return x


def promote(*xs):
    """The tensors in their common float dtype (e.g. bf16 log-probs with fp32 old log-probs run
    in fp32; the cast is outside the op, so gradients reach the bf16 tensor in bf16)."""
    dtype = None
    for x in xs:
        if x is not None:
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    return [x if x is None or x.dtype == dtype else x.to(dtype) for x in xs]


def check_row_or_token(name: str, arg: str, x, like: torch.Tensor) -> torch.Tensor:
    """A float tensor of shape [B, T] or [B] on ``like``'s device (any float dtype)."""
    _checks.tensor(name, arg, x, ndim=(1, 2))
    if tuple(x.shape) not in (tuple(like.shape), tuple(like.shape[:1])):
        raise ValueError(
            f"{name}: {arg} must have shape [B, T] = {tuple(like.shape)} or [B] = "
            f"({like.shape[0]},), got {tuple(x.shape)}"
        )
    _checks.same_device(name, arg, x, like)
    return x


def check_mask(name: str, mask, like: torch.Tensor) -> torch.Tensor:
    mask = _checks.mask(name, "mask", mask, like)
    return mask if mask.dtype == torch.bool else mask != 0


def check_agg(name: str, agg, num_tokens, num_seqs):
    _checks.choice(name, "agg", agg, AGG_MODES)
    num_tokens = _checks.positive(name, "num_tokens", num_tokens, allow_none=True)
    num_seqs = _checks.positive(name, "num_seqs", num_seqs, allow_none=True)
    return num_tokens, num_seqs


def check_constant(name: str, arg: str, x) -> None:
    if x is not None and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name}: {arg} requires grad, but the fused kernels treat it as a constant "
            f"(rollout data); pass {arg}.detach() or use backend='reference'"
        )


def check_policy_scalars(name: str, *, has_ref: bool, has_ent: bool, **kw) -> dict:
    """Checks and normalises the scalar options of ppo_policy_loss; returns them in the op's
    argument order (clip_low ... entropy_coef)."""
    clip_low = _checks.number(name, "clip_low", kw["clip_low"])
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"{name}: clip_low must be in [0, 1), got {clip_low}")
    clip_high = kw["clip_high"]
    clip_high = clip_low if clip_high is None else _checks.number(name, "clip_high", clip_high)
    if clip_high < 0.0:
        raise ValueError(f"{name}: clip_high must be >= 0, got {clip_high}")
    dual = kw["dual_clip"]
    if dual is not None and not _checks.number(name, "dual_clip", dual) > 1.0:
        raise ValueError(f"{name}: dual_clip must be > 1, got {dual}")
    _checks.choice(name, "ratio_level", kw["ratio_level"], RATIO_LEVELS)
    num_tokens, num_seqs = check_agg(name, kw["agg"], kw["num_tokens"], kw["num_seqs"])
    kl_coef = _checks.number(name, "kl_coef", kw["kl_coef"])
    entropy_coef = _checks.number(name, "entropy_coef", kw["entropy_coef"])
    est = kw["kl_estimator"]
    if not isinstance(est, str) or est.rstrip("+") not in KL_ESTIMATORS:
        raise ValueError(
            f"{name}: kl_estimator must be one of {KL_ESTIMATORS} (optionally with '+'), "
            f"got {est!r}"
        )
    if kl_coef != 0.0 and not has_ref:
        raise ValueError(f"{name}: kl_coef = {kl_coef} needs ref_logprobs")
    if entropy_coef != 0.0 and not has_ent:
        raise ValueError(f"{name}: entropy_coef = {entropy_coef} needs entropy")
    return dict(
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=None if dual is None else float(dual),
        logratio_clamp=_checks.positive(
            name, "logratio_clamp", kw["logratio_clamp"], allow_none=True
        ),
        ratio_level=kw["ratio_level"],
        agg=kw["agg"],
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        kl_coef=kl_coef,
        kl_estimator=est,
        kl_clamp=_checks.positive(name, "kl_clamp", kw["kl_clamp"], allow_none=True),
        entropy_coef=entropy_coef,
    )


# ------------------------------------------------------------------------ ppo_policy_loss
def _policy_fake(lp, old, adv, mask, ref, ent, w, *args):
    acc = torch.float64 if lp.dtype == torch.float64 else torch.float32
    return (
        lp.new_empty((), dtype=acc),
        lp.new_empty((5,), dtype=acc),
        lp.new_empty((lp.shape[0], 2), dtype=acc),
    )


def _policy_backward_fake(grad, lp, old, adv, mask, ref, ent, *args):
    empty = lp.new_empty((0,))
    return (
        torch.empty_like(lp),
        torch.empty_like(ref) if ref is not None else empty,
        torch.empty_like(ent) if ent is not None else empty,
    )


# Scalar arguments shared by the forward and the backward (forward positions 7.., minus agg,
# num_tokens, num_seqs which only the forward needs).
def _policy_setup(ctx, inputs, output):
    lp, old, adv, mask, ref, ent, w = inputs[:7]
    (clip_low, clip_high, dual, lr_clamp, level, _agg, _nt, _ns, kl_coef, est, kl_clamp,
     ent_coef) = inputs[7:]  # fmt: skip
    ctx.scalars = (clip_low, clip_high, dual, lr_clamp, level, kl_coef, est, kl_clamp, ent_coef)
    ctx.has_ref, ctx.has_ent, ctx.has_w = ref is not None, ent is not None, w is not None
    ctx.save_for_backward(lp, old, adv, mask, ref, ent, w, output[2])


def _make_policy_backward(backward_op):
    def backward(ctx, grad_loss, _grad_metrics, _grad_row_stats):
        lp, old, adv, mask, ref, ent, w, row_stats = ctx.saved_tensors
        g_lp, g_ref, g_ent = backward_op(
            grad_loss, lp, old, adv, mask, ref, ent, w, row_stats, *ctx.scalars
        )
        need = ctx.needs_input_grad
        return (
            g_lp if need[0] else None,
            None,
            None,
            None,
            g_ref if ctx.has_ref and need[4] else None,
            g_ent if ctx.has_ent and need[5] else None,
            *([None] * 13),
        )

    return backward


# ------------------------------------------------------------------------------ value_loss
def _value_fake(values, old_values, returns, mask, *args):
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    return (
        values.new_empty((), dtype=acc),
        values.new_empty((), dtype=acc),
        values.new_empty((values.shape[0],), dtype=acc),
    )


def _value_backward_fake(grad, values, *args):
    return torch.empty_like(values)


def _value_setup(ctx, inputs, output):
    values, old_values, returns, mask, clip = inputs[:5]
    ctx.clip = clip
    ctx.save_for_backward(values, old_values, returns, mask, output[2])


def _make_value_backward(backward_op):
    def backward(ctx, grad_loss, _grad_clipfrac, _grad_row_scale):
        values, old_values, returns, mask, row_scale = ctx.saved_tensors
        g = backward_op(grad_loss, values, old_values, returns, mask, row_scale, ctx.clip)
        return (g if ctx.needs_input_grad[0] else None, *([None] * 7))

    return backward


register_fake_cpp("ppo_policy_loss", _policy_fake)
register_fake_cpp("ppo_policy_loss_backward", _policy_backward_fake)
register_fake_cpp("value_loss", _value_fake)
register_fake_cpp("value_loss_backward", _value_backward_fake)
for _fwd, _bwd in variants("ppo_policy_loss", "ppo_policy_loss_backward"):
    torch.library.register_autograd(
        _fwd, _make_policy_backward(op(_bwd)), setup_context=_policy_setup
    )
for _fwd, _bwd in variants("value_loss", "value_loss_backward"):
    torch.library.register_autograd(
        _fwd, _make_value_backward(op(_bwd)), setup_context=_value_setup
    )
