"""ppo_policy_loss and value_loss: PPO's clipped policy and value losses, fused.

The forward ops return (loss, metrics, row_stats): row_stats holds what the fused backward needs per
row (the aggregation weight, and for ppo_policy_loss the sequence log-ratio of GSPO), so the
backward is one elementwise pass without a second reduction. Gradients flow to logprobs,
ref_logprobs and entropy (policy) and to values (value loss); old_logprobs, advantages, is_weights,
old_values and returns are constants, as in veRL's and OpenRLHF's losses (they are rollout data).
"""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype, bool_mask, promote
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, op, register_fake_cpp, variants
from ppokernels.ops.ppo_loss_modes import LOSS_MODES, mode_spec
from ppokernels.reference import AGG_MODES, PolicyLossOutput, ValueLossOutput

if _backend.HAS_TRITON:
    import ppokernels.triton.ppo_loss  # noqa: F401  (registers the ppokernels::*_triton ops)
    import ppokernels.triton.ppo_loss_value  # noqa: F401

__all__ = ["LOSS_MODES", "PolicyLossOutput", "ValueLossOutput", "ppo_policy_loss", "value_loss"]

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
RATIO_LEVELS = ("token", "sequence")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_mode: str = "vanilla",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    logratio_clamp: float | None = 20.0,
    ratio_level: str = "token",
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    ratio_cap: float | None = None,
    seq_logratio_max: float | None = None,
    dro_beta: float | None = None,
    vespo_k: tuple[float, float] = (2.0, 3.0),
    vespo_lambda: tuple[float, float] = (3.0, 2.0),
    backend: str = "auto",
) -> PolicyLossOutput:
    """PPO clipped surrogate loss with its metrics, in one fused forward and one fused backward.

    Per valid token (veRL ``compute_policy_loss_vanilla``, OpenRLHF ``PolicyLoss``):
    ``logratio = clamp(lp - old, +-logratio_clamp)``, ``r = exp(logratio)``,
    ``L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; with ``dual_clip = c > 1``
    tokens with ``A < 0`` take ``min(L, -A c)``; ``L *= is_weights``; then
    ``+ kl_coef * kl_penalty(lp, ref_logprobs, kl_estimator, kl_clamp) - entropy_coef * entropy``,
    all aggregated with ``agg``:

    - "token-mean": sum / (num_tokens or number of valid tokens); "token-sum": sum;
    - "seq-mean-token-mean": sum over rows of the row's masked mean / (num_seqs or B);
    - "seq-mean-token-sum": sum of row sums / (num_seqs or B); "seq-mean-token-sum-norm": / T too.

    Global ``num_tokens`` / ``num_seqs`` make the sum of per-rank losses the global-batch loss.

    ``loss_mode`` picks the surrogate (veRL 0.9.1 ``POLICY_LOSS_REGISTRY``, TRL 1.16
    ``GRPOTrainer`` loss types; ``r = exp(logratio)``, sg = stop-gradient):

    - "vanilla": the clipped surrogate above.
    - "gspo": the same of the sequence ratio, value ``exp(min(s, seq_logratio_max))`` with
      ``s`` the row's masked mean log-ratio, per-token gradient of ``exp(lp - sg(lp) + sg(s))``.
      (``ratio_level="sequence"`` is the former spelling.)
    - "sapo": ``-sigmoid(tau (r - 1)) 4 / tau A``, ``tau = tau_pos`` if ``A > 0`` else ``tau_neg``.
    - "cispo": ``-sg(clip(r)) A lp``, clipped to ``[1 - clip_low, 1 + clip_high]`` (veRL), or to
      ``[-inf, ratio_cap]`` when ``ratio_cap`` is given (TRL's ``epsilon_high``).
    - "gpg": ``-A lp``.
    - "geo_mean" (GMPO): per row ``-Abar exp(sum_t m dt / (n + 1e-8))``, ``dt`` the log-ratio
      clipped to ``clip_high`` where ``A > 0`` and to ``-clip_low`` where ``A < 0`` (0 where
      ``A = 0``), ``Abar`` the masked mean advantage; is_weights enter as their per-row geometric
      mean. Averaged over ``num_seqs`` or B rows whatever ``agg`` (``agg`` still aggregates the
      KL and entropy terms).
    - "dppo_tv" / "dppo_kl": ``-A sg(min(r, ratio_cap)) lp valid`` (ratio_cap default 20),
      ``valid`` the trust region: ``p - p_old <= clip_high`` (A > 0) / ``>= -clip_low``, or the
      binary KL ``<= clip_high`` or ``p <= p_old`` (A > 0) / ``<= clip_low`` or ``p >= p_old``.
    - "dro": ``-(lp A - dro_beta logratio^2 / 2)``.
    - "vespo" (TRL): ``-phi A lp``, ``phi = exp(lam + k log_w - lam exp(log_w))`` detached,
      ``log_w`` = the row's summed log-ratio plus the summed ``clamp(log is_weights, log 1e-8,
      20)``, clamped to ``[log 1e-8, 20]``; ``(k, lam) = (vespo_k[0], vespo_lambda[0])`` if
      ``A >= 0`` else ``[1]``. is_weights enter log_w only, they do not scale the loss.

    Every other mode multiplies its token loss by ``is_weights``.

    Args:
        logprobs: [B, T] log-probs under the current policy (float dtype; differentiable).
        old_logprobs: [B, T] behaviour log-probs (a constant). Mixed float dtypes among
            logprobs, old_logprobs, ref_logprobs and entropy run in their promoted dtype.
        advantages: [B, T] per token or [B] per sequence, any float dtype (a constant).
        mask: [B, T] bool/int/float; 0 marks padding (no work, zero gradient, NaN-safe).
        clip_low, clip_high: clip range [1 - clip_low, 1 + clip_high]; clip_high None = clip_low
            (clip_low = 1: no lower clip). geo_mean / dppo: the log-ratio clip / trust region.
        dual_clip: c > 1 (Ye et al. 2019), or None.
        logratio_clamp: clamp of lp - old before exp (veRL/OpenRLHF: 20), None for none.
        ref_logprobs, kl_coef, kl_estimator, kl_clamp: KL-in-loss term (GRPO), see kl_penalty.
        entropy, entropy_coef: [B, T] entropy of the policy and the bonus coefficient.
        is_weights: [B, T] or [B] importance weights (e.g. truncated IS), a constant.

        tau_pos, tau_neg: SAPO's gate temperatures (veRL's defaults).
        ratio_cap: CISPO's upper bound (TRL form) / DPPO's truncation of the ratio weight.
        seq_logratio_max: GSPO's clamp of the sequence log-ratio (veRL: 10), None for none.
        dro_beta: DRO's penalty coefficient (> 0, required for "dro").
        vespo_k, vespo_lambda: VESPO's (positive, negative advantage) k and lambda (TRL's
            defaults).

    Returns:
        PolicyLossOutput: ``loss`` (0-d float32, float64 for float64 inputs); detached 0-d
        ``approx_kl`` (masked mean of -logratio), ``kl`` / ``entropy`` (aggregated like the
        loss) when their inputs are given, and two masked means of per-token flags:
        ``clipfrac`` / ``dual_clipfrac`` are, for vanilla and gspo, clipped > unclipped / dual
        clip active with A < 0; cispo: r != clip(r) / r > upper bound with A > 0; geo_mean:
        log-ratio outside the clip range with A > 0 / with A < 0; dppo: outside the trust
        region / r > ratio_cap inside it; vespo: phi / 0; sapo, gpg, dro: 0 / 0 (veRL's
        pg_clipfrac / pg_clipfrac_lower where veRL reports them). No valid token: all 0.
    """
    name = "ppo_policy_loss"
    _data(name, "logprobs", logprobs)
    for arg, x in (
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("entropy", entropy),
    ):
        if x is not None or arg == "old_logprobs":
            _data(name, arg, x, "logprobs", logprobs)
    _checks.row_or_token(name, "advantages", advantages, logprobs)
    mask = bool_mask(_checks.mask(name, "mask", mask, logprobs))
    if is_weights is not None:
        _checks.row_or_token(name, "is_weights", is_weights, logprobs)
    mode_opts = dict(
        tau_pos=tau_pos,
        tau_neg=tau_neg,
        ratio_cap=ratio_cap,
        seq_logratio_max=seq_logratio_max,
        dro_beta=dro_beta,
        vespo_k=vespo_k,
        vespo_lambda=vespo_lambda,
    )
    _checks.choice(name, "ratio_level", ratio_level, RATIO_LEVELS)
    if ratio_level == "sequence":  # the former spelling of loss_mode="gspo"
        if loss_mode not in ("vanilla", "gspo"):
            raise ValueError(f"{name}: ratio_level='sequence' is loss_mode='gspo'")
        loss_mode = "gspo"
    scalars = _policy_scalars(
        name,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        logratio_clamp=logratio_clamp,
        loss_mode=loss_mode,
        mode_opts=mode_opts,
        agg=agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=kl_clamp,
        entropy_coef=entropy_coef,
        has_ref=ref_logprobs is not None,
        has_ent=entropy is not None,
    )
    # The fused kernels give rollout data no gradient: checked before the backend choice, so that
    # every backend but an explicit "reference" (which differentiates it) refuses it alike, and
    # "auto" does whether or not the binary is installed.
    if _backend.requested(backend) != "reference":
        rollout = {"old_logprobs": old_logprobs, "advantages": advantages, "is_weights": is_weights}
        for arg, x in rollout.items():
            _checks.constant(name, arg, x)
    b = _backend.choose(name, logprobs.device, backend)
    opt = dict(ref_logprobs=ref_logprobs, entropy=entropy, is_weights=is_weights)
    if b == "reference":
        ref_kw = {k: v for k, v in scalars.items() if k != "ratio_level"}
        return reference.ppo_policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            loss_mode=loss_mode,
            **opt,
            **ref_kw,
            **mode_opts,
        )
    logprobs, old_logprobs, opt["ref_logprobs"], opt["entropy"] = promote(
        logprobs, old_logprobs, ref_logprobs, entropy
    )
    loss, metrics, _ = kernel(name, b)(
        logprobs, old_logprobs, advantages, mask, *opt.values(), *scalars.values()
    )
    metrics = metrics.detach()
    return PolicyLossOutput(
        loss,
        metrics[0],
        metrics[1],
        metrics[2],
        metrics[3] if ref_logprobs is not None else None,
        metrics[4] if entropy is not None else None,
    )


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    backend: str = "auto",
) -> ValueLossOutput:
    """Clipped value loss (veRL ``compute_value_loss``, OpenRLHF ``ValueLoss``), fused.

    Per valid token ``vc = clip(v, v_old - clip, v_old + clip)``,
    ``L = 0.5 max((v - R)^2, (vc - R)^2)`` (``0.5 (v - R)^2`` when clip is None), aggregated
    with ``agg`` as in :func:`ppo_policy_loss`.

    Args:
        values: [B, T] value predictions (float dtype; differentiable).
        old_values: [B, T] rollout values (a constant; mixed dtypes run in the promoted one).
        returns: [B, T] returns, any float dtype (a constant).
        mask: [B, T] bool/int/float; 0 marks padding.

    Returns:
        ValueLossOutput: ``loss`` (0-d float32, float64 for float64 inputs) and detached
        ``clipfrac`` (masked mean of clipped > unclipped squared error).
    """
    name = "value_loss"
    _data(name, "values", values)
    _data(name, "old_values", old_values, "values", values)
    _checks.tensor(name, "returns", returns, ndim=2)
    _checks.like(name, "returns", returns, "values", values)
    mask = bool_mask(_checks.mask(name, "mask", mask, values))
    clip = _checks.positive(name, "clip", clip, allow_none=True)
    num_tokens, num_seqs = _agg(name, agg, num_tokens, num_seqs)
    # as in ppo_policy_loss: rollout data refused alike by every backend but explicit "reference"
    if _backend.requested(backend) != "reference":
        _checks.constant(name, "old_values", old_values)
        _checks.constant(name, "returns", returns)
    b = _backend.choose(name, values.device, backend)
    kw = dict(clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    if b == "reference":
        return reference.value_loss(values, old_values, returns, mask, **kw)
    values, old_values = promote(values, old_values)
    loss, clipfrac, _ = kernel(name, b)(
        values, old_values, returns, mask, clip, agg, num_tokens, num_seqs
    )
    return ValueLossOutput(loss, clipfrac.detach())


# --------------------------------------------------------------------------- argument checks
def _data(name: str, arg: str, x, like_name: str | None = None, like=None) -> torch.Tensor:
    """A float [B, T] tensor (shape and device of ``like`` when given), not on meta."""
    _checks.tensor(name, arg, x, ndim=2)
    _checks.not_meta(name, arg, x)
    if like is not None:
        _checks.like(name, arg, x, like_name, like)
    return x


def _agg(name: str, agg, num_tokens, num_seqs):
    _checks.choice(name, "agg", agg, AGG_MODES)
    num_tokens = _checks.positive(name, "num_tokens", num_tokens, allow_none=True)
    num_seqs = _checks.positive(name, "num_seqs", num_seqs, allow_none=True)
    return num_tokens, num_seqs


def _policy_scalars(name: str, *, has_ref: bool, has_ent: bool, **kw) -> dict:
    """Checks and normalises the scalar options of ppo_policy_loss; returns them in the op's
    argument order (clip_low ... entropy_coef)."""
    clip_low = _checks.number(name, "clip_low", kw["clip_low"])
    if not 0.0 <= clip_low:
        raise ValueError(f"{name}: clip_low must be in [0, 1] (any >= 0: dppo), got {clip_low}")
    clip_high = kw["clip_high"]
    clip_high = clip_low if clip_high is None else _checks.number(name, "clip_high", clip_high)
    if clip_high < 0.0:
        raise ValueError(f"{name}: clip_high must be >= 0, got {clip_high}")
    dual = kw["dual_clip"]
    if dual is not None and not _checks.number(name, "dual_clip", dual) > 1.0:
        raise ValueError(f"{name}: dual_clip must be > 1, got {dual}")
    spec = mode_spec(
        name,
        kw["loss_mode"],
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual,
        opts=kw["mode_opts"],
    )
    num_tokens, num_seqs = _agg(name, kw["agg"], kw["num_tokens"], kw["num_seqs"])
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
        ratio_level=spec,
        agg=kw["agg"],
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        kl_coef=kl_coef,
        kl_estimator=est,
        kl_clamp=_checks.positive(name, "kl_clamp", kw["kl_clamp"], allow_none=True),
        entropy_coef=entropy_coef,
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


def _value_fake(values, old_values, returns, mask, *args):
    acc = acc_dtype(values)
    return (
        values.new_empty((), dtype=acc),
        values.new_empty((), dtype=acc),
        values.new_empty((values.shape[0],), dtype=acc),
    )


def _value_backward_fake(grad, values, *args):
    return torch.empty_like(values)


register_fake_cpp("ppo_policy_loss", _policy_fake)
register_fake_cpp("ppo_policy_loss_backward", _policy_backward_fake)
register_fake_cpp("value_loss", _value_fake)
register_fake_cpp("value_loss_backward", _value_backward_fake)


# ------------------------------------------------------------------------------- autograd
# ppo_policy_loss differentiates logprobs (0), ref_logprobs (4) and entropy (5); each gradient is
# one elementwise pass over every saved tensor, so they are saved when any of the three is needed.
# The backward takes the forward's scalars minus agg / num_tokens / num_seqs (row_stats holds
# their effect).
def _policy_setup(ctx, inputs, output):
    (clip_low, clip_high, dual, lr_clamp, level, _, _, _, kl_coef, est, kl_clamp, ent_coef) = (
        inputs[7:]
    )
    ctx.scalars = (clip_low, clip_high, dual, lr_clamp, level, kl_coef, est, kl_clamp, ent_coef)
    if any(ctx.needs_input_grad[i] for i in (0, 4, 5)):
        ctx.save_for_backward(*inputs[:7], output[2])


def _make_policy_backward(backward_op):
    def backward(ctx, grad_loss, _grad_metrics, _grad_row_stats):
        if not ctx.saved_tensors:  # only a constant input asked for a gradient
            return (None,) * 19
        lp, old, adv, mask, ref, ent, w, row_stats = ctx.saved_tensors
        g_lp, g_ref, g_ent = backward_op(
            grad_loss, lp, old, adv, mask, ref, ent, w, row_stats, *ctx.scalars
        )
        need = ctx.needs_input_grad
        grads = [g_lp if need[0] else None, None, None, None]
        grads += [g_ref if ref is not None and need[4] else None]
        grads += [g_ent if ent is not None and need[5] else None]
        return (*grads, *([None] * 13))

    return backward


# value_loss differentiates values (0) only; the backward needs clip, not the aggregation.
def _value_setup(ctx, inputs, output):
    ctx.clip = inputs[4]
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(*inputs[:4], output[2])


def _make_value_backward(backward_op):
    def backward(ctx, grad_loss, _grad_clipfrac, _grad_row_scale):
        if not ctx.saved_tensors:  # only a constant input asked for a gradient
            return (None,) * 8
        values, old_values, returns, mask, row_scale = ctx.saved_tensors
        g = backward_op(grad_loss, values, old_values, returns, mask, row_scale, ctx.clip)
        return (g, *([None] * 7))

    return backward


for _fwd, _bwd in variants("ppo_policy_loss", "ppo_policy_loss_backward"):
    torch.library.register_autograd(
        _fwd, _make_policy_backward(op(_bwd)), setup_context=_policy_setup
    )
for _fwd, _bwd in variants("value_loss", "value_loss_backward"):
    torch.library.register_autograd(
        _fwd, _make_value_backward(op(_bwd)), setup_context=_value_setup
    )
