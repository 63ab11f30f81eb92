"""Drop-in replacements for OpenRLHF's PPO arithmetic, targeting **openrlhf 0.11.2** (PyPI).

Same names, signatures, values, gradients and dtypes as ``openrlhf.models.loss``
(``PolicyLoss``, ``ValueLoss``, ``aggregate_loss``), ``openrlhf.models.utils``
(``compute_approx_kl``, ``compute_reward``, ``log_probs_from_logits``, ``compute_entropy``,
``masked_mean``) and the advantage scans of
``openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker``
(``get_advantages_and_returns``, ``get_cumulative_returns``), computed with ppokernels ops.
Masks (``action_mask``) are 0/1.

Switch on in every process (driver and Ray actors)::

    import ppokernels.compat.openrlhf as ppk_orl
    ppk_orl.patch()

OpenRLHF's ``train_ppo_ray`` only calls ``ray.init`` when Ray is not initialised yet, so a
launcher that calls ``ray.init(runtime_env={"worker_process_setup_hook":
"ppokernels.compat.openrlhf.patch"})`` and ``patch()`` before OpenRLHF's ``main`` covers every
actor (docs/compat.md). Log-probs and entropies are computed in fp32 by one online-softmax pass
per row (no chunked logsumexp loop, no flash-attn needed) and returned in OpenRLHF's dtype.
"""

from __future__ import annotations

import math

import torch

import ppokernels as ppk
from ppokernels.compat import Patcher, float_dtype
from ppokernels.losses import Clip
from ppokernels.reference.rollout_correction import CRITERION_STATS, ROW_STATS

TARGET_VERSION = "0.11.2"


def masked_mean(tensor, mask, dim=None):
    """``sum(x * m) / sum(m)`` over ``dim`` (NaN for an empty mask), or the plain mean."""
    if mask is None:
        return tensor.mean(dim=dim)
    if dim is not None:
        return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)
    return ppk.masked_mean(tensor, mask).to(float_dtype(tensor, mask))


def aggregate_loss(
    loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None
):
    """Token level: ``sum(m L) / batch_num_tokens * dp`` (masked mean without global count);
    sequence level: mean over non-empty rows of each row's masked mean (``/ global_batch_size
    * dp`` with a global count)."""
    x = loss * loss_mask
    if token_level_loss:
        if batch_num_tokens is None:
            return x.sum() / loss_mask.sum()
        return x.sum() / batch_num_tokens * dp_size
    counts = loss_mask.sum(dim=-1)
    rows = x.sum(dim=-1) / (counts + 1e-8) * (counts > 0)
    if global_batch_size is None:
        return rows.sum() / (counts > 0).sum()
    return rows.sum() / global_batch_size * dp_size


def _agg(token_level, mask, dp_size, batch_num_tokens, global_batch_size):
    """``(kwargs, scale)``: the ppokernels loss with ``**kwargs`` (agg, num_tokens, num_seqs),
    times ``scale``, equals OpenRLHF's aggregate_loss."""
    agg = "token-mean" if token_level else "seq-mean-token-mean"
    kw = dict(agg=agg, num_tokens=None, num_seqs=None)
    if token_level:
        if batch_num_tokens is None or isinstance(batch_num_tokens, torch.Tensor):
            scale = 1.0 if batch_num_tokens is None else mask.sum() / batch_num_tokens * dp_size
            return kw, scale
        return {**kw, "num_tokens": float(batch_num_tokens)}, float(dp_size)
    if global_batch_size is None:  # masked mean over the rows that have a valid token
        return kw, mask.shape[0] / (mask.sum(-1) > 0).sum()
    if isinstance(global_batch_size, torch.Tensor):
        return kw, mask.shape[0] / global_batch_size * dp_size
    return {**kw, "num_seqs": float(global_batch_size)}, float(dp_size)


def _seq_mean(x, mask):
    """Per-row masked mean broadcast back over the row (differentiable): GSPO's log-ratio."""
    return ((x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(x)


class PolicyLoss(torch.nn.Module):
    """PPO / GSPO policy loss; ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl,
    is_filter_ratio)`` (the last two None without train/rollout IS correction)."""

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list = (0.5, 5.0),
    ) -> None:
        super().__init__()
        if dual_clip is not None:
            assert dual_clip > 1.0, f"dual_clip must be > 1.0, got {dual_clip}"
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(
                f"is_correction_level must be off/token/seq, got {is_correction_level}"
            )
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(
                f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}"
            )
        if is_correction_mode == "clip" and (
            is_correction_level == "seq" or is_correction_gating != "ratio"
        ):
            raise ValueError(
                "is_correction_mode=clip requires is_correction_level=token and "
                "is_correction_gating=ratio"
            )
        if (
            is_correction_gating != "ratio"
            and is_correction_level != "off"
            and is_correction_threshold[0] > 0
        ):
            raise ValueError(
                f"is_correction_gating={is_correction_gating} takes an upper bound "
                "only (a single delta)"
            )
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = (
            clip_eps_low,
            clip_eps_high,
            dual_clip,
        )
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"
        self.policy_loss_type = policy_loss_type
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def _is_weights(self, old, rollout, mask):
        """Train/rollout importance weights (detached), their filter fraction and vllm_kl, from
        one :func:`ppokernels.rollout_correction` call: the gate is the op's bounds (ratio at
        token level) or a rejection criterion (the row's geometric mean ratio, as ``seq_mean_k1``
        of ``-log ratio``; binary_kl / tv, per token or row mean); survivors keep their token
        ratio ``exp(old - rollout)`` (no log-ratio clamp, as OpenRLHF)."""
        low, high = self.is_correction_threshold
        seq = self.is_correction_level == "seq"
        gating = self.is_correction_gating
        kw = dict(level="token", logratio_clamp=None)
        if gating == "ratio" and not seq:
            kw.update(mode="truncate" if self.is_correction_mode == "clip" else "mask")
            kw.update(bounds=(low, high))
        elif gating == "ratio":  # gate on exp(mean x) in [low, high]: -mean x in [-log h, -log l]
            lo = -math.log(high) if high > 0 else math.inf
            hi = -math.log(low) if low > 0 else math.inf
            kw.update(mode="mask", bounds=(None, None), criteria={"seq_mean_k1": (lo, hi)})
        else:
            agg = "seq_mean" if seq else "token"
            kw.update(mode="mask", bounds=(None, None), criteria={f"{agg}_{gating}": (low, high)})
        out = ppk.rollout_correction(old.detach(), rollout.detach(), mask, **kw)
        dtype = float_dtype(old, rollout)
        weights = out.weights
        if "criteria" in kw:
            weights = weights * out.mask.to(weights.dtype)
        if not seq:
            frac = out.metrics["fraction_bounded" if "criteria" not in kw else "rejected_fraction"]
        else:  # over all rows; a row without a valid token has a NaN statistic there: filtered
            rs = out.row_stats
            filtered = (rs[:, len(ROW_STATS) + CRITERION_STATS.index("count_rejected")] > 0) | (
                rs[:, 0] == 0
            )
            frac = filtered.to(dtype).mean()
        return weights.to(dtype), frac.to(dtype), out.metrics["kl"].to(dtype)

    def forward(
        self,
        log_probs,
        old_log_probs,
        advantages,
        action_mask=None,
        rollout_log_probs=None,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    ):
        mask = torch.ones_like(log_probs) if action_mask is None else action_mask
        weights = frac = vllm_kl = None
        if self.policy_loss_type == "ppo":
            lp, old, clamp = log_probs, old_log_probs, 20.0
            if self.is_correction_level != "off":
                weights, frac, vllm_kl = self._is_weights(old_log_probs, rollout_log_probs, mask)
        elif self.policy_loss_type == "gspo":
            # sequence ratio exp(mean_t(lp - base)) with the full gradient of the mean (no clamp):
            # the row means as per-token "log-probs" give exactly that ratio on every token
            base = rollout_log_probs if self.is_correction_level != "off" else old_log_probs
            lp, old, clamp = _seq_mean(log_probs, mask), _seq_mean(base, mask).detach(), None
        else:
            raise ValueError(f"Invalid policy loss type: {self.policy_loss_type}")
        agg_kw, scale = _agg(
            self.token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size
        )
        out = ppk.ppo_policy_loss(
            lp,
            old,
            advantages,
            mask,
            loss=Clip(self.clip_eps_low, self.clip_eps_high, dual_clip=self.dual_clip),
            logratio_clamp=clamp,
            is_weights=weights,
            **agg_kw,
        )
        dtype = float_dtype(log_probs, old_log_probs, advantages)
        ppo_kl = masked_mean(-(log_probs - old_log_probs).detach(), mask)
        return ((out.loss * scale).to(dtype), out.clipfrac.to(dtype), ppo_kl, vllm_kl, frac)


class ValueLoss(torch.nn.Module):
    """``0.5 aggregate(max((v_old + clip(v - v_old, +-eps) - R)^2, (v - R)^2))``."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values,
        old_values,
        returns,
        action_mask=None,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    ):
        mask = torch.ones_like(values) if action_mask is None else action_mask
        agg_kw, scale = _agg(
            self.token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size
        )
        out = ppk.value_loss(values, old_values, returns, mask, clip=self.clip_eps, **agg_kw)
        return (out.loss * scale).to(float_dtype(values, old_values, returns))


def compute_approx_kl(
    log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False
):
    """k1 / k2 / k3 of ``x = lp - lp_base`` in fp32, clamped to [-10, 10]; with
    ``unbiased_gradient`` the value is kept and the gradient is ``w * x`` (w = clamped detached
    ``exp(lp - lp_old)``, 1 without ``log_probs_old``)."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    lp, base = log_probs.float(), log_probs_base.float()
    # OpenRLHF clamps k3's log-ratio at -10 before exp; beyond it k3 > 10 is clamped anyway, so
    # the clamp only removes the gradient there, as ppokernels' output clamp does.
    value = ppk.kl_penalty(lp, base, estimator=kl_estimator, clamp=10.0)
    if not unbiased_gradient:
        return value
    w = 1.0
    if log_probs_old is not None:
        w = (lp - log_probs_old.float()).exp().clamp(max=10.0).detach()
    surrogate = w * ppk.kl_penalty(lp, base, estimator="k2")
    return value.detach() + surrogate - surrogate.detach()


def compute_reward(r, kl_coef, kl, action_mask=None, reward_clip_range=None):
    """``-kl_coef * kl`` per token plus the (clipped) score on each row's last action token."""
    kl_coef = max(kl_coef, 0.0)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    T = action_mask.size(1)
    last = T - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    score = torch.zeros_like(kl).scatter_(1, last, r.unsqueeze(1).to(kl.dtype))
    return score - kl_coef * kl


def log_probs_from_logits(logits, labels, temperature=1.0):
    """``log_softmax(logits / temperature)[labels]`` in float32 (the input dtype for
    bf16/fp16 logits, as OpenRLHF), with no [N, V] temporary. Like OpenRLHF, a temperature other
    than 1 divides the caller's logits in place (callers reuse them for the entropy)."""
    if temperature != 1.0:
        logits.div_(temperature)
    lp = ppk.token_logprobs(logits, labels)[0]
    return lp if logits.dtype in (torch.float32, torch.float64) else lp.to(logits.dtype)


def compute_entropy(logits):
    """Entropy of ``softmax(logits)`` per row, (...), in the logits' dtype."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return ppk.token_logprobs(logits, labels, with_entropy=True)[1].to(logits.dtype)


@torch.no_grad()
def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
    """GAE with values and rewards zeroed on masked tokens, the recursion running through them:
    ``(advantages, advantages + m * values)`` (a method of ``RemoteExperienceMaker``)."""
    mask = torch.ones_like(rewards) if action_mask is None else action_mask
    adv, ret = ppk.gae(rewards, values, mask, gamma=float(gamma), lam=float(lambd), mode="zero")
    dtype = float_dtype(values, rewards, mask)
    return adv.to(dtype), ret.to(dtype)


@torch.no_grad()
def get_cumulative_returns(self, rewards, action_mask, gamma):
    """``G_t = m_t r_t + gamma G_{t+1}`` (a method of ``RemoteExperienceMaker``)."""
    mask = torch.ones_like(rewards) if action_mask is None else action_mask
    return ppk.discounted_returns(rewards, mask, gamma=float(gamma), mode="zero").to(rewards.dtype)


_PATCHER = Patcher()
_UTILS = (
    "compute_approx_kl",
    "compute_reward",
    "log_probs_from_logits",
    "compute_entropy",
    "masked_mean",
)


def patch() -> None:
    """Install the replacements in OpenRLHF (idempotent); modules that imported a replaced name
    (``from openrlhf.models import PolicyLoss``) are updated too."""
    if _PATCHER.active:
        return
    g = globals()
    for name in ("PolicyLoss", "ValueLoss", "aggregate_loss"):
        _PATCHER.everywhere("openrlhf", "openrlhf.models.loss", name, g[name])
    for name in _UTILS:
        _PATCHER.everywhere("openrlhf", "openrlhf.models.utils", name, g[name])
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    _PATCHER.set(RemoteExperienceMaker, "get_advantages_and_returns", get_advantages_and_returns)
    _PATCHER.set(RemoteExperienceMaker, "get_cumulative_returns", get_cumulative_returns)


def unpatch() -> None:
    """Restore everything :func:`patch` replaced."""
    _PATCHER.restore()
