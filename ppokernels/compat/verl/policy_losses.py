"""veRL 0.9.1's registered policy losses other than ``vanilla`` (``verl.trainer.ppo.core_algos``
``POLICY_LOSS_REGISTRY``: gspo, sapo, gpg, geo_mean, cispo, dppo_tv, dppo_kl, dro, clip_cov,
kl_cov, bypass_mode) on the fused
``ppokernels.ppo_policy_loss``: veRL's signature ``(old_log_prob, log_prob, advantages,
response_mask, loss_agg_mode, config, rollout_is_weights) -> (pg_loss, metrics)``, the
``ActorConfig`` fields each mode reads, its clamps and aggregation, the same metrics dict.
"""

from __future__ import annotations

import torch

import ppokernels as ppk
from ppokernels.compat import float_dtype
from ppokernels.compat.verl.core_algos import (
    _agg_args,
    _cfg,
    agg_loss,
    compute_policy_loss_vanilla,
)
from ppokernels.losses import CISPO, DPPOKL, DPPOTV, DRO, GPG, GSPO, SAPO, Clip, GeoMean

__all__ = [
    "compute_policy_loss_cispo",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_kl_cov",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_dro",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_gspo",
    "compute_policy_loss_sapo",
    "compute_policy_loss_bypass_mode",
]


def _clips(config):
    clip = config.clip_ratio
    low = clip if config.clip_ratio_low is None else config.clip_ratio_low
    high = clip if config.clip_ratio_high is None else config.clip_ratio_high
    return low, high


def _run(spec, old, lp, adv, mask, agg_mode, config, weights, **kw):
    """(veRL's pg_loss, the ppokernels output) of one loss spec, aggregated as veRL's agg_loss
    with ``config.global_batch_info``."""
    assert config is not None
    info = dict(_cfg(config, "global_batch_info", None) or {})
    agg, num_tokens, num_seqs, scale = _agg_args(agg_mode, mask, **info)
    out = ppk.ppo_policy_loss(
        lp,
        old,
        adv,
        mask,
        loss=spec,
        agg=agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        is_weights=weights,
        **kw,
    )
    return (out.loss * scale).to(float_dtype(old, lp, adv)), out


def _metrics(out, clipfrac=True, lower=True):
    m = {}
    if clipfrac is not None:
        m["actor/pg_clipfrac"] = out.clipfrac.item() if clipfrac else 0.0
    m["actor/ppo_kl"] = out.approx_kl.item()
    if lower is not None:
        m["actor/pg_clipfrac_lower"] = out.dual_clipfrac.item() if lower else 0.0
    return m


def compute_policy_loss_gspo(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="seq-mean-token-mean",
    config=None,
    rollout_is_weights=None,
):
    """GSPO: the clipped surrogate of the sequence ratio ``exp(min(mean_t(lp - old), 10))``
    (no log-ratio clamp) with per-token gradients, aggregated by ``loss_agg_mode``."""
    assert config is not None
    loss, out = _run(
        GSPO(*_clips(config), seq_logratio_max=10.0),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        logratio_clamp=None,
    )
    return loss, _metrics(out, lower=False)


def compute_policy_loss_sapo(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="seq-mean-token-mean",
    config=None,
    rollout_is_weights=None,
):
    """SAPO: ``-sigmoid(tau (r - 1)) 4 / tau A`` with ``config.tau_pos`` / ``tau_neg``, always
    aggregated "seq-mean-token-mean" (veRL ignores ``loss_agg_mode`` here)."""
    assert config is not None
    loss, out = _run(
        SAPO(float(config.tau_pos), float(config.tau_neg)),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        "seq-mean-token-mean",
        config,
        rollout_is_weights,
    )
    return loss, _metrics(out, clipfrac=False, lower=False)


def compute_policy_loss_gpg(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """GPG: ``-lp A``; no metrics (veRL returns an empty dict)."""
    loss, _ = _run(
        GPG(),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )
    return loss, {}


def compute_policy_loss_cispo(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """CISPO: ``-sg(clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) A lp``."""
    assert config is not None
    loss, out = _run(
        CISPO(*_clips(config)),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )
    return loss, _metrics(out, lower=False)


def compute_policy_loss_geo_mean(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """GMPO: mean over rows of ``-Abar exp(mean_t clipped log-ratio)`` (no log-ratio clamp);
    ``loss_agg_mode`` and ``global_batch_info`` are not used, as in veRL."""
    assert config is not None
    low, high = _clips(config)
    out = ppk.ppo_policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        loss=GeoMean(low, high),
        logratio_clamp=None,
        is_weights=rollout_is_weights,
    )
    return out.loss.to(float_dtype(old_log_prob, log_prob, advantages)), _metrics(out)


def _dppo(spec, old, lp, adv, mask, agg_mode, config, weights):
    assert config is not None
    spec = spec(*_clips(config), ratio_cap=float(_cfg(config, "clip_ratio_c", 20.0)))
    loss, out = _run(spec, old, lp, adv, mask, agg_mode, config, weights)
    return loss, _metrics(out)


def compute_policy_loss_dppo_tv(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """DPPO-Binary-TV: ``-A sg(min(r, clip_ratio_c)) lp`` inside the TV trust region
    ``p - p_old <= clip_ratio_high`` (A > 0) / ``>= -clip_ratio_low``."""
    return _dppo(
        DPPOTV,
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )


def compute_policy_loss_dppo_kl(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """DPPO-Binary-KL: as dppo_tv inside the binary-KL trust region."""
    return _dppo(
        DPPOKL,
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )


def compute_policy_loss_dro(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """DRO: ``-(lp A - beta (lp - old)^2 / 2)`` with ``config.policy_loss.dro_beta``."""
    assert config is not None
    assert config.policy_loss is not None
    beta = config.policy_loss.dro_beta
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    loss, out = _run(
        DRO(float(beta)),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        logratio_clamp=None,
    )
    return loss, _metrics(out, clipfrac=None, lower=None)


def _masked_mean(x, mask):
    """veRL's masked_mean, op for op (the covariance selections below must see its bits)."""
    return (torch.where(mask.bool(), x, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def _unclipped(old, lp, adv, mask, agg_mode, config, weights):
    """``agg(-A exp(lp - old) w)``, no log-ratio clamp and no clip (bounds [0, 1e30])."""
    info = dict(_cfg(config, "global_batch_info", None) or {})
    agg, num_tokens, num_seqs, scale = _agg_args(agg_mode, mask, **info)
    out = ppk.ppo_policy_loss(
        lp,
        old,
        adv,
        mask,
        loss=Clip(1.0, 1e30),
        logratio_clamp=None,
        agg=agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        is_weights=weights,
    )
    return (out.loss * scale).to(float_dtype(old, lp, adv))


def compute_policy_loss_clip_cov(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """Clip-Cov: the clipped surrogate (no log-ratio clamp, no dual clip) with the gradient of
    a random subset of not-yet-clipped tokens whose covariance ``(A - mean A)(lp - mean lp)``
    lies in ``(clip_cov_lb, clip_cov_ub)`` cut (``torch.randperm`` on the global generator, as
    veRL: the same generator state picks the same tokens). The selection runs in torch on the
    host side of the op; the loss is one fused ``ppo_policy_loss`` with the cut as weights."""
    assert config is not None
    assert config.policy_loss is not None
    pl = config.policy_loss
    ratio_ = pl.clip_cov_ratio if pl.clip_cov_ratio is not None else 0.0002
    ub = pl.clip_cov_ub if pl.clip_cov_ub is not None else 5.0
    lb = pl.clip_cov_lb if pl.clip_cov_lb is not None else 1.0
    assert ratio_ > 0, "clip_ratio should be larger than 0."
    low, high = _clips(config)
    with torch.no_grad():
        lp = log_prob.detach()
        ratio = torch.exp(lp - old_log_prob)
        l1 = -advantages * ratio
        clipped = (-advantages * torch.clamp(ratio, 1 - low, 1 + high) > l1) & (response_mask > 0)
        cov = (advantages - _masked_mean(advantages, response_mask)) * (
            lp - _masked_mean(lp, response_mask)
        )
        cov[response_mask == 0] = -torch.inf
        cov[clipped] = -torch.inf
        n_clip = max(int(ratio_ * response_mask.sum().item()), 1)
        idx = torch.nonzero((cov < ub) & (cov > lb) & (response_mask > 0))
        if len(idx) > 0:
            idx = idx[torch.randperm(len(idx))[: min(n_clip, len(idx))]]
        corr = torch.ones_like(advantages)
        corr[idx[:, 0], idx[:, 1]] = 0
        w = corr if rollout_is_weights is None else corr * rollout_is_weights
    loss, out = _run(
        Clip(low, high),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        w,
        logratio_clamp=None,
    )
    frac = _masked_mean((corr == 0).float(), response_mask)
    return loss, {"actor/pg_clipfrac": frac.item(), "actor/ppo_kl": out.approx_kl.item()}


def compute_policy_loss_kl_cov(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """KL-Cov: ``-A r`` (no clamp, no clip; fused) plus ``ppo_kl_coef |lp - old|`` on the top
    ``max(1, int(N kl_cov_ratio))`` valid tokens by covariance ``(A - mean A)(lp - mean lp)``
    (``torch.topk`` on the host, as veRL), times the IS weights, aggregated by agg_loss."""
    assert config is not None
    assert config.policy_loss is not None
    pl = config.policy_loss
    ratio_ = pl.kl_cov_ratio if pl.kl_cov_ratio is not None else 0.0002
    coef = pl.ppo_kl_coef if pl.ppo_kl_coef is not None else 1.0
    assert ratio_ > 0, "kl_cov_ratio should be larger than 0."
    loss = _unclipped(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    valid = response_mask > 0
    with torch.no_grad():
        adv = advantages[valid].detach().reshape(-1).cpu()
        lp = log_prob[valid].detach().reshape(-1).cpu()
        if len(adv) > 0:
            cov = (adv - adv.mean()) * (lp - lp.mean())
            top = torch.topk(cov, max(1, int(len(cov) * ratio_)), largest=True).indices
            top = torch.nonzero(valid.reshape(-1), as_tuple=True)[0][top.to(valid.device)]
            sel = torch.zeros(valid.numel(), dtype=log_prob.dtype, device=valid.device)
            sel[top] = 1.0
            sel = sel.view_as(log_prob)
    if len(adv) > 0:  # the KL penalty of the selected tokens (a sparse correction)
        kl = coef * (log_prob - old_log_prob).abs() * sel
        if rollout_is_weights is not None:
            kl = kl * rollout_is_weights
        info = dict(_cfg(config, "global_batch_info", None) or {})
        loss = loss + agg_loss(kl, response_mask, loss_agg_mode, **info).to(loss.dtype)
    ppo_kl = _masked_mean((log_prob - old_log_prob).detach().abs(), response_mask)
    return loss, {"actor/ppo_kl": ppo_kl.item()}


def compute_policy_loss_bypass_mode(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """Bypass mode (``old_log_prob`` is the rollout policy's): rollout correction, then a loss by
    ``config.policy_loss.rollout_correction.loss_type``:

    - "ppo_clip": :func:`compute_policy_loss_vanilla` on the rejection-sampled mask, without IS
      weights (the PPO ratio ``pi / pi_rollout`` is the IS ratio already);
    - "reinforce": ``agg(-A lp w)`` (fused ``ppo_policy_loss`` "gpg" with is_weights ``w``) and
      ``actor/ppo_kl`` = masked mean of ``old - lp`` on the rejection-sampled mask.

    ``w`` (truncated or IcePop IS weights of ``pi / pi_rollout``, per token or per sequence,
    batch-normalised or not) and the rejection mask come from veRL's
    ``rollout_corr_helper.compute_rollout_correction_and_rejection_mask``, called as veRL calls
    it, here the fused drop-in of :mod:`ppokernels.compat.verl.rollout_corr` (one op call, one
    host sync for its ``rollout_corr/*`` diagnostics). The metrics are the loss's updated with
    those; ``rollout_is_weights`` is ignored (recomputed), as in veRL.
    """
    assert config is not None, "config is required for bypass_mode loss"
    policy_loss = _cfg(config, "policy_loss", None)
    rc = None if policy_loss is None else _cfg(policy_loss, "rollout_correction", None)
    if rc is None:
        raise ValueError(
            "rollout_correction config not found in policy_loss. "
            "When using loss_mode='bypass_mode', ensure rollout_correction config is passed."
        )
    loss_type = _cfg(rc, "loss_type", "ppo_clip")
    if loss_type not in ("reinforce", "ppo_clip"):  # veRL raises after the correction; same error
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    from ppokernels.compat.verl.rollout_corr import compute_rollout_correction_and_rejection_mask

    with torch.no_grad():
        weights, mask, rollout_metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob,  # the current policy: IS ratio pi / pi_rollout
            rollout_log_prob=old_log_prob,
            response_mask=response_mask,
            rollout_is=_cfg(rc, "rollout_is", None),
            rollout_is_threshold=_cfg(rc, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=_cfg(rc, "rollout_is_batch_normalize", False),
            rollout_rs=_cfg(rc, "rollout_rs", None),
            rollout_rs_threshold=_cfg(rc, "rollout_rs_threshold", None),
        )
    if loss_type == "ppo_clip":
        loss, metrics = compute_policy_loss_vanilla(
            old_log_prob, log_prob, advantages, mask, loss_agg_mode, config, None
        )
    else:
        w = weights.batch["rollout_is_weights"] if weights is not None else None
        loss, out = _run(
            GPG(),
            old_log_prob,
            log_prob,
            advantages,
            mask,
            loss_agg_mode,
            config,
            w,
            logratio_clamp=None,
        )
        metrics = {"actor/ppo_kl": out.approx_kl.item()}
    metrics.update(rollout_metrics)
    return loss, metrics


# registry name -> function, for patch()
POLICY_LOSSES = {
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "cispo": compute_policy_loss_cispo,
    "geo_mean": compute_policy_loss_geo_mean,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "dro": compute_policy_loss_dro,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "bypass_mode": compute_policy_loss_bypass_mode,
}
