"""ppo_policy_loss: the trainers' policy losses (a loss spec of ppokernels.losses), fused.

The forward op returns (loss, metrics, row_stats): row_stats holds what the fused backward needs
per row (the aggregation weight, and the sequence log-ratio of GSPO), so the backward is one
elementwise pass without a second reduction. Gradients flow to logprobs, ref_logprobs and
entropy; old_logprobs, advantages and is_weights are constants, as in veRL's and OpenRLHF's
losses (they are rollout data).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype, bool_mask, promote
from ppokernels.losses import Clip, LossSpec, loss_spec
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, op, register_autograd, register_fake_cpp, variants
from ppokernels.reference import PolicyLossOutput

if _backend.HAS_TRITON:
    import ppokernels.triton.ppo_policy_loss  # noqa: F401  (registers the ppokernels::*_triton ops)

__all__ = ["PolicyLossOutput", "ppo_policy_loss"]


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss: LossSpec | str = Clip(),
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    logratio_clamp: float | None = 20.0,
    is_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    backend: str = "auto",
) -> PolicyLossOutput:
    """The policy loss of any loss spec with its metrics, in one fused forward and backward.

    Per valid token ``lr = clamp(lp - old, +-logratio_clamp)``, ``r = exp(lr)``, the surrogate
    ``L`` of ``loss`` (:mod:`ppokernels.losses`: ``Clip`` is PPO's clipped surrogate, veRL
    ``compute_policy_loss_vanilla`` / OpenRLHF ``PolicyLoss``; ``GSPO``, ``SAPO``, ``CISPO``,
    ``GPG``, ``GeoMean``, ``DPPOTV``, ``DPPOKL``, ``DRO``, ``Vespo`` the other veRL 0.9.1 and
    TRL 1.16 losses, each with its formula), then
    ``+ kl_coef * kl_penalty(lp, ref_logprobs, kl_estimator, kl_clamp) - entropy_coef * entropy``,
    all aggregated with ``agg`` (one of ``ppokernels.losses.AGG_MODES``, veRL's ``agg_loss``):
    token-mean: sum / (num_tokens or the number of valid tokens); token-sum: sum;
    seq-mean-token-mean: sum over rows of the row's masked mean / (num_seqs or B);
    seq-mean-token-sum: sum of row sums / (num_seqs or B); seq-mean-token-sum-norm: that / T.
    Global ``num_tokens`` / ``num_seqs`` make the sum of per-rank losses the global-batch loss.

    Args:
        logprobs: [B, T] log-probs under the current policy (float dtype; differentiable).
        old_logprobs: [B, T] behaviour log-probs (a constant). Mixed float dtypes among
            logprobs, old_logprobs, ref_logprobs and entropy run in their promoted dtype.
        advantages: [B, T] per token or [B] per sequence, any float dtype (a constant).
        mask: [B, T] bool/int/float; 0 marks padding (no work, zero gradient, NaN-safe).
        loss: a loss spec (default ``Clip(0.2)``), or a mode name for its defaults.
        logratio_clamp: clamp of lp - old before exp (veRL/OpenRLHF: 20), None for none.
        is_weights: [B, T] or [B] importance weights (e.g. ``rollout_correction``'s truncated
            IS weights), a constant; every spec but Vespo (which reads them into its row weight)
            and GeoMean (their per-row geometric mean) multiplies its token loss by them.
        ref_logprobs, kl_coef, kl_estimator, kl_clamp: the KL-in-loss term (GRPO), see
            :func:`ppokernels.kl_penalty`; ``kl_coef != 0`` needs ``ref_logprobs``.
        entropy, entropy_coef: [B, T] entropy of the policy and the bonus coefficient.

    Returns:
        PolicyLossOutput: ``loss`` (0-d float32, float64 for float64 inputs); detached 0-d
        ``approx_kl`` (masked mean of -logratio), ``kl`` / ``entropy`` (aggregated like the
        loss) when their inputs are given, and ``clipfrac`` / ``dual_clipfrac``, masked means of
        the two per-token flags the spec defines (PPO: clipped, dual clip active). No valid
        token: all 0.
    """
    name = "ppo_policy_loss"
    _checks.data2d(name, "logprobs", logprobs)
    _checks.data2d(name, "old_logprobs", old_logprobs, "logprobs", logprobs)
    if ref_logprobs is not None:
        _checks.data2d(name, "ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if entropy is not None:
        _checks.data2d(name, "entropy", entropy, "logprobs", logprobs)
    _checks.row_or_token(name, "advantages", advantages, logprobs)
    mask = bool_mask(_checks.mask(name, "mask", mask, logprobs))
    if is_weights is not None:
        _checks.row_or_token(name, "is_weights", is_weights, logprobs)
    spec, options = policy_options(
        name,
        loss=loss,
        agg=agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        logratio_clamp=logratio_clamp,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=kl_clamp,
        entropy_coef=entropy_coef,
        has_ref=ref_logprobs is not None,
        has_entropy=entropy is not None,
    )
    # The fused kernels give rollout data no gradient: checked before the backend choice, so that
    # every backend but an explicit "reference" (which differentiates it) refuses it alike, and
    # "auto" does whether or not the binary is installed.
    if _backend.requested(backend) != "reference":
        _checks.constant(name, "old_logprobs", old_logprobs)
        _checks.constant(name, "advantages", advantages)
        _checks.constant(name, "is_weights", is_weights)
    b = _backend.choose(name, logprobs.device, backend)
    if b == "reference":
        return reference.ppo_policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            is_weights=is_weights,
            ref_logprobs=ref_logprobs,
            entropy=entropy,
            **options.reference_kwargs(spec),
        )
    logprobs, old_logprobs, ref_logprobs, entropy = promote(
        logprobs, old_logprobs, ref_logprobs, entropy
    )
    loss_, metrics, _ = kernel(name, b)(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, *options
    )
    metrics = metrics.detach()
    return PolicyLossOutput(
        loss_,
        metrics[0],
        metrics[1],
        metrics[2],
        metrics[3] if ref_logprobs is not None else None,
        metrics[4] if entropy is not None else None,
    )


class PolicyOptions(NamedTuple):
    """The scalar arguments of the ``ppo_policy_loss`` op, checked, in its schema's order
    (csrc/ops.cpp): the loss spec as ``loss_mode`` / ``loss_params``, then the named options."""

    loss_mode: str
    loss_params: list[float]
    logratio_clamp: float | None
    agg: str
    num_tokens: float | None
    num_seqs: float | None
    kl_coef: float
    kl_estimator: str
    kl_clamp: float | None
    entropy_coef: float

    def reference_kwargs(self, spec: LossSpec) -> dict:
        """The keywords of ``reference.ppo_policy_loss``."""
        return dict(
            loss=spec,
            agg=self.agg,
            num_tokens=self.num_tokens,
            num_seqs=self.num_seqs,
            logratio_clamp=self.logratio_clamp,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            kl_clamp=self.kl_clamp,
            entropy_coef=self.entropy_coef,
        )


def policy_options(
    name: str,
    *,
    loss,
    agg,
    num_tokens,
    num_seqs,
    logratio_clamp,
    kl_coef,
    kl_estimator,
    kl_clamp,
    entropy_coef,
    has_ref: bool,
    has_entropy: bool,
) -> tuple[LossSpec, PolicyOptions]:
    """Checks the options of ppo_policy_loss (and linear_ppo_policy_loss, which shares them);
    returns the loss spec and the op's scalar arguments."""
    if not isinstance(loss, (LossSpec, str)):
        raise TypeError(
            f"{name}: loss must be a loss spec of ppokernels.losses (e.g. Clip(0.2, 0.28)) or a "
            f"mode name, got {type(loss).__name__}"
        )
    try:
        spec = loss_spec(loss)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    num_tokens, num_seqs = _checks.agg(name, agg, num_tokens, num_seqs)
    kl_coef = _checks.number(name, "kl_coef", kl_coef)
    entropy_coef = _checks.number(name, "entropy_coef", entropy_coef)
    _checks.kl_estimator(name, "kl_estimator", kl_estimator)
    if kl_coef != 0.0 and not has_ref:
        raise ValueError(f"{name}: kl_coef = {kl_coef} needs ref_logprobs")
    if entropy_coef != 0.0 and not has_entropy:
        raise ValueError(f"{name}: entropy_coef = {entropy_coef} needs entropy")
    return spec, PolicyOptions(
        spec.mode,
        list(spec.params()),
        _checks.positive(name, "logratio_clamp", logratio_clamp, allow_none=True),
        agg,
        num_tokens,
        num_seqs,
        kl_coef,
        kl_estimator,
        _checks.positive(name, "kl_clamp", kl_clamp, allow_none=True),
        entropy_coef,
    )


# ------------------------------------------------------------------ fake kernels (C++ ops)
def _policy_fake(lp, old, adv, mask, ref, ent, w, *args):
    acc = acc_dtype(lp)
    return (
        lp.new_empty((), dtype=acc),
        lp.new_empty((5,), dtype=acc),
        lp.new_empty((lp.shape[0], 4), dtype=acc),
    )


def _policy_backward_fake(grad, lp, old, adv, mask, ref, ent, *args):
    empty = lp.new_empty((0,))
    return (
        torch.empty_like(lp),
        torch.empty_like(ref) if ref is not None else empty,
        torch.empty_like(ent) if ent is not None else empty,
    )


register_fake_cpp("ppo_policy_loss", _policy_fake)
register_fake_cpp("ppo_policy_loss_backward", _policy_backward_fake)


# ------------------------------------------------------------------------------- autograd
class PolicyInputs(NamedTuple):
    """The ``ppo_policy_loss`` op's arguments by name (tests/ops/test_ppo_policy_loss.py checks
    them against the C++ and Triton schemas)."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    is_weights: torch.Tensor | None
    loss_mode: str
    loss_params: list[float]
    logratio_clamp: float | None
    agg: str
    num_tokens: float | None
    num_seqs: float | None
    kl_coef: float
    kl_estimator: str
    kl_clamp: float | None
    entropy_coef: float


_POLICY_NO_GRADS = (None,) * len(PolicyInputs._fields)
_POLICY_DIFFERENTIABLE = tuple(
    PolicyInputs._fields.index(k) for k in ("logprobs", "ref_logprobs", "entropy")
)


# ppo_policy_loss differentiates logprobs, ref_logprobs and entropy; each gradient is one
# elementwise pass over every saved tensor, so they are saved when any of the three is needed.
# The backward takes the forward's scalars but agg / num_tokens / num_seqs (row_stats holds their
# effect).
def _policy_setup(ctx, inputs, output):
    a = PolicyInputs._make(inputs)
    ctx.scalars = (
        a.loss_mode,
        a.loss_params,
        a.logratio_clamp,
        a.kl_coef,
        a.kl_estimator,
        a.kl_clamp,
        a.entropy_coef,
    )
    need = ctx.needs_input_grad
    ctx.need = tuple(need[i] for i in _POLICY_DIFFERENTIABLE)
    if any(ctx.need):
        ctx.save_for_backward(
            a.logprobs,
            a.old_logprobs,
            a.advantages,
            a.mask,
            a.ref_logprobs,
            a.entropy,
            a.is_weights,
            output[2],  # row_stats
        )


def _make_policy_backward(backward_op):
    def backward(ctx, grad_loss, _grad_metrics, _grad_row_stats):
        if not any(ctx.need):  # only a constant input asked for a gradient
            return _POLICY_NO_GRADS
        lp, old, adv, mask, ref, ent, w, row_stats = ctx.saved_tensors
        g_lp, g_ref, g_ent = backward_op(
            grad_loss, lp, old, adv, mask, ref, ent, w, row_stats, *ctx.scalars
        )
        need_lp, need_ref, need_ent = ctx.need
        return (
            g_lp if need_lp else None,
            None,
            None,
            None,
            g_ref if ref is not None and need_ref else None,
            g_ent if ent is not None and need_ent else None,
            *_POLICY_NO_GRADS[6:],
        )

    return backward


for _fwd, _bwd in variants("ppo_policy_loss", "ppo_policy_loss_backward"):
    register_autograd(_fwd, _make_policy_backward(op(_bwd)), setup_context=_policy_setup)
