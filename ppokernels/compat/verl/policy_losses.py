"""veRL 0.9.1's registered policy losses other than ``vanilla`` (``verl.trainer.ppo.core_algos``
``POLICY_LOSS_REGISTRY``: gspo, sapo, gpg, geo_mean, cispo, dppo_tv, dppo_kl, dro) on the fused
``ppokernels.ppo_policy_loss``: veRL's signature ``(old_log_prob, log_prob, advantages,
response_mask, loss_agg_mode, config, rollout_is_weights) -> (pg_loss, metrics)``, the
``ActorConfig`` fields each mode reads, its clamps and aggregation, the same metrics dict.
"""

from __future__ import annotations

import ppokernels as ppk
from ppokernels.compat import float_dtype
from ppokernels.compat.verl.core_algos import _agg_args, _cfg

__all__ = [
    "compute_policy_loss_cispo",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_dro",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_gspo",
    "compute_policy_loss_sapo",
]


def _clips(config):
    clip = config.clip_ratio
    low = clip if config.clip_ratio_low is None else config.clip_ratio_low
    high = clip if config.clip_ratio_high is None else config.clip_ratio_high
    return low, high


def _run(mode, old, lp, adv, mask, agg_mode, config, weights, **kw):
    """(veRL's pg_loss, the ppokernels output) of one loss mode, aggregated as veRL's agg_loss
    with ``config.global_batch_info``."""
    assert config is not None
    info = dict(_cfg(config, "global_batch_info", None) or {})
    agg, num_tokens, num_seqs, scale = _agg_args(agg_mode, mask, **info)
    low, high = _clips(config)
    out = ppk.ppo_policy_loss(
        lp, old, adv, mask, loss_mode=mode, clip_low=low, clip_high=high, agg=agg,
        num_tokens=num_tokens, num_seqs=num_seqs, is_weights=weights, **kw,
    )  # fmt: skip
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
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
    config=None, rollout_is_weights=None,
):  # fmt: skip
    """GSPO: the clipped surrogate of the sequence ratio ``exp(min(mean_t(lp - old), 10))``
    (no log-ratio clamp) with per-token gradients, aggregated by ``loss_agg_mode``."""
    loss, out = _run(
        "gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights, logratio_clamp=None, seq_logratio_max=10.0,
    )  # fmt: skip
    return loss, _metrics(out, lower=False)


def compute_policy_loss_sapo(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
    config=None, rollout_is_weights=None,
):  # fmt: skip
    """SAPO: ``-sigmoid(tau (r - 1)) 4 / tau A`` with ``config.tau_pos`` / ``tau_neg``, always
    aggregated "seq-mean-token-mean" (veRL ignores ``loss_agg_mode`` here)."""
    loss, out = _run(
        "sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
        rollout_is_weights, tau_pos=float(config.tau_pos), tau_neg=float(config.tau_neg),
    )  # fmt: skip
    return loss, _metrics(out, clipfrac=False, lower=False)


def compute_policy_loss_gpg(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):  # fmt: skip
    """GPG: ``-lp A``; no metrics (veRL returns an empty dict)."""
    loss, _ = _run(
        "gpg", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights,
    )  # fmt: skip
    return loss, {}


def compute_policy_loss_cispo(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):  # fmt: skip
    """CISPO: ``-sg(clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) A lp``."""
    loss, out = _run(
        "cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights,
    )  # fmt: skip
    return loss, _metrics(out, lower=False)


def compute_policy_loss_geo_mean(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):  # fmt: skip
    """GMPO: mean over rows of ``-Abar exp(mean_t clipped log-ratio)`` (no log-ratio clamp);
    ``loss_agg_mode`` and ``global_batch_info`` are not used, as in veRL."""
    assert config is not None
    low, high = _clips(config)
    out = ppk.ppo_policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss_mode="geo_mean", clip_low=low,
        clip_high=high, logratio_clamp=None, is_weights=rollout_is_weights,
    )  # fmt: skip
    return out.loss.to(float_dtype(old_log_prob, log_prob, advantages)), _metrics(out)


def _dppo(mode, old, lp, adv, mask, agg_mode, config, weights):
    loss, out = _run(
        mode, old, lp, adv, mask, agg_mode, config, weights,
        ratio_cap=float(_cfg(config, "clip_ratio_c", 20.0)),
    )  # fmt: skip
    return loss, _metrics(out)


def compute_policy_loss_dppo_tv(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):  # fmt: skip
    """DPPO-Binary-TV: ``-A sg(min(r, clip_ratio_c)) lp`` inside the TV trust region
    ``p - p_old <= clip_ratio_high`` (A > 0) / ``>= -clip_ratio_low``."""
    return _dppo("dppo_tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                 config, rollout_is_weights)  # fmt: skip


def compute_policy_loss_dppo_kl(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):  # fmt: skip
    """DPPO-Binary-KL: as dppo_tv inside the binary-KL trust region."""
    return _dppo("dppo_kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                 config, rollout_is_weights)  # fmt: skip


def compute_policy_loss_dro(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):  # fmt: skip
    """DRO: ``-(lp A - beta (lp - old)^2 / 2)`` with ``config.policy_loss.dro_beta``."""
    assert config is not None
    assert config.policy_loss is not None
    beta = config.policy_loss.dro_beta
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    loss, out = _run(
        "dro", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights, logratio_clamp=None, dro_beta=float(beta),
    )  # fmt: skip
    return loss, _metrics(out, clipfrac=None, lower=None)


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
}
