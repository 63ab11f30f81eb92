"""gae and discounted_returns: advantage and return scans over the time axis."""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, op, register_autograd, register_fake_cpp, variants

if _backend.HAS_TRITON:
    import ppokernels.triton.gae  # noqa: F401  (registers the ppokernels::*_triton ops)

MODES = ("skip", "zero")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    mode: str = "skip",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over the last dimension.

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``, computed
    as a scan (parallel on GPUs; on CPUs one row per SIMD lane, groups of rows in parallel).

    Args:
        rewards: (..., T) per-token rewards (the score typically on the last valid token).
        values: (..., T) value predictions, same shape and dtype as rewards.
        mask: (..., T) response mask, bool or {0, 1} numbers; mask holes (multi-turn observation
            tokens) and padding are both masked tokens.
        gamma, lam: discount and GAE lambda in [0, 1].
        mode: how masked tokens enter the recursion.
            "skip" (veRL, multi-turn aware): their reward and value are ignored, the recursion
            jumps over them without extra decay (V_next is the value of the next *valid* token),
            and they carry the advantage of the next valid token; ``returns = advantages + values``.
            "zero" (OpenRLHF, TRL): rewards and values are zeroed there and the recursion runs
            through them; ``returns = advantages + mask * values``. The two agree for right-padded
            single-turn responses.
        backend: "auto", "cpp", "triton" or "reference".

    Returns:
        ``(advantages, returns)``, (..., T) float32 (float64 for float64 inputs), differentiable
        with respect to rewards and values (the backward is the transposed scan, forward in time).
        NaN at valid positions propagates; rewards at masked positions are never read.

    See also: :func:`ppokernels.reference.gae`; the trainers' formulas in ``docs/semantics.md``.
    """
    name = "gae"
    _check(name, rewards, mask, gamma, lam, mode)
    _checks.tensor(name, "values", values)
    _checks.same_shape(name, "values", values, "rewards", rewards)
    _checks.same_device(name, "values", values, rewards)
    _checks.same_dtype(name, "values", values, "rewards", rewards)
    gamma, lam = float(gamma), float(lam)
    _checks.not_meta(name, "rewards", rewards)
    b = _backend.choose(name, rewards.device, backend)
    if b == "reference":
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam, mode=mode)
    return kernel(name, b)(rewards, values, mask, gamma, lam, mode)


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    mode: str = "skip",
    backend: str = "auto",
) -> torch.Tensor:
    """Discounted return-to-go ``G_t = r_t + gamma * G_{t+1}`` over the last dimension.

    Args:
        rewards: (..., T) per-token rewards.
        mask: (..., T) bool or {0, 1} numbers.
        gamma: discount in [0, 1].
        mode: "skip": masked tokens are skipped, G passes through unchanged (their output is the
            carried G; multiply by the mask to zero them, as veRL's REINFORCE++ does);
            "zero" (OpenRLHF ``get_cumulative_returns``): ``G_t = m_t r_t + gamma * G_{t+1}``.
        backend: "auto", "cpp", "triton" or "reference".

    Returns:
        (..., T) float32 returns (float64 for float64 inputs), differentiable w.r.t. rewards.

    See also: :func:`ppokernels.reference.discounted_returns`.
    """
    name = "discounted_returns"
    _check(name, rewards, mask, gamma, 1.0, mode)
    gamma = float(gamma)
    _checks.not_meta(name, "rewards", rewards)
    b = _backend.choose(name, rewards.device, backend)
    if b == "reference":
        return reference.discounted_returns(rewards, mask, gamma=gamma, mode=mode)
    return kernel(name, b)(rewards, mask, gamma, mode)


def _check(name, rewards, mask, gamma, lam, mode):
    _checks.tensor(name, "rewards", rewards)
    if rewards.dim() == 0:
        raise ValueError(f"{name}: rewards must have a time dimension, got a 0-d tensor")
    _checks.mask(name, "mask", mask, rewards)
    _checks.unit_interval(name, "gamma", gamma)
    _checks.unit_interval(name, "lam", lam)
    _checks.choice(name, "mode", mode, MODES)


# ------------------------------------------------------------------ fake kernels (C++ ops)
def _fake_gae(rewards, values, mask, gamma, lam, mode):
    adv = rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards))
    return adv, torch.empty_like(adv)


def _fake_gae_backward(grad_advantages, grad_returns, mask, gamma, lam, mode, dtype):
    g = grad_returns.new_empty(grad_returns.shape, dtype=dtype)
    return g, torch.empty_like(g)


def _fake_returns(rewards, mask, gamma, mode):
    return rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards))


def _fake_returns_backward(grad_returns, mask, gamma, mode, dtype):
    return grad_returns.new_empty(grad_returns.shape, dtype=dtype)


register_fake_cpp("gae", _fake_gae)
register_fake_cpp("gae_backward", _fake_gae_backward)
register_fake_cpp("discounted_returns", _fake_returns)
register_fake_cpp("discounted_returns_backward", _fake_returns_backward)


# ------------------------------------------------------------------------------- autograd
# Both scans are linear in (rewards, values): the backward needs only the mask (and the input
# dtype for its outputs), never the inputs themselves.
def _setup_gae(ctx, inputs, output):
    rewards, _, mask, ctx.gamma, ctx.lam, ctx.mode = inputs
    ctx.dtype = rewards.dtype
    ctx.save_for_backward(mask)


def _gae_backward(backward_op):
    def backward(ctx, grad_advantages, grad_returns):
        (mask,) = ctx.saved_tensors
        if grad_advantages is None and grad_returns is None:
            return None, None, None, None, None, None
        like = grad_advantages if grad_advantages is not None else grad_returns
        ga = grad_advantages if grad_advantages is not None else torch.zeros_like(like)
        gr = grad_returns if grad_returns is not None else torch.zeros_like(like)
        dr, dv = backward_op(ga, gr, mask, ctx.gamma, ctx.lam, ctx.mode, ctx.dtype)
        return (
            dr if ctx.needs_input_grad[0] else None,
            dv if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )

    return backward


def _setup_returns(ctx, inputs, output):
    rewards, mask, ctx.gamma, ctx.mode = inputs
    ctx.dtype = rewards.dtype
    ctx.save_for_backward(mask)


def _returns_backward(backward_op):
    def backward(ctx, grad_returns):
        (mask,) = ctx.saved_tensors
        return backward_op(grad_returns, mask, ctx.gamma, ctx.mode, ctx.dtype), None, None, None

    return backward


for _fwd, _bwd in variants("gae", "gae_backward"):
    register_autograd(_fwd, _gae_backward(op(_bwd)), setup_context=_setup_gae)
for _fwd, _bwd in variants("discounted_returns", "discounted_returns_backward"):
    register_autograd(_fwd, _returns_backward(op(_bwd)), setup_context=_setup_returns)
