"""veRL 0.9.1's rollout correction (``verl/trainer/ppo/rollout_corr_helper.py``) on the fused
:func:`ppokernels.rollout_correction`: the same signatures, weights, rejection masks and metric
dicts (same keys, same values), from one op call instead of some forty [B, T] passes.

veRL's semantics kept exactly (and documented in docs/semantics.md):

- ``rollout_is="sequence"`` weights a row by the *product* of its token ratios,
  ``exp(clamp(sum_t x, -20, 20))`` (ppokernels level "sequence_sum"); the geometric mean is
  ppokernels' "sequence".
- Every log-ratio is clamped to [-20, 20] before exp (``SAFETY_BOUND``), the rejection
  statistics included; ``k3_kl`` uses the unclamped log-ratio.
- A float threshold truncates from above only (TIS); ``"lower_upper"`` masks outside the band
  (IcePop). Metrics count ratios below ``1 / upper`` as "low" when no lower bound is given.
- ``rollout_rs`` k1 options bound ``-log_ratio`` by ``(log lower, log upper)``, the others bound
  the statistic from above.

Option and threshold strings are parsed by veRL's own helpers (same errors).
"""

from __future__ import annotations

import math

import torch

import ppokernels as ppk
from ppokernels.compat import float_dtype
from ppokernels.ops.rollout_correction import metrics_to_floats

__all__ = [
    "compute_offpolicy_metrics",
    "compute_rollout_corr_metrics_from_logprobs",
    "compute_rollout_correction_and_rejection_mask",
    "compute_rollout_correction_weights",
    "compute_rollout_rejection_mask",
]

SAFETY_BOUND = 20.0
_NO_VALID = "response_mask must contain at least one valid token (1)."


def _helper():
    """veRL's module (its parsers and option sets; imported when first called)."""
    from verl.trainer.ppo import rollout_corr_helper

    return rollout_corr_helper


# ------------------------------------------------------------------ configuration -> op
def _is_config(rollout_is, rollout_is_threshold):
    """(op keywords, upper, lower) for veRL's IS level and threshold, errors as veRL's."""
    valid_levels = {"token", "sequence"}  # a set, printed as veRL prints it
    if rollout_is not in valid_levels:
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {valid_levels}.")
    upper, lower = _helper()._parse_rollout_is_threshold(rollout_is_threshold)
    kw = dict(
        level="token" if rollout_is == "token" else "sequence_sum",
        mode="truncate" if lower is None else "mask",
        bounds=(lower, upper),
    )
    return kw, upper, lower


def _rs_config(rollout_rs, rollout_rs_threshold):
    """{criterion: (lower, upper)} for veRL's comma-separated options (duplicates dropped, in
    order), errors as veRL's."""
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError(
            "rollout_rs must be a non-empty string (comma separated for multiple options)."
        )
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    h = _helper()
    options = []
    for opt in (o.strip() for o in rollout_rs.split(",")):
        if not opt:
            continue
        if opt not in h.SUPPORTED_ROLLOUT_RS_OPTIONS:
            raise ValueError(
                f"Invalid rollout_rs option: {opt}. Must be one of "
                f"{sorted(h.SUPPORTED_ROLLOUT_RS_OPTIONS)}."
            )
        if opt not in options:
            options.append(opt)
    if not options:
        raise ValueError("rollout_rs must contain at least one valid option.")
    specs = h._parse_rollout_rs_thresholds(options, rollout_rs_threshold)
    criteria = {}
    for opt in options:
        lo, hi = specs[opt]["lower"], specs[opt]["upper"]
        k1 = opt.endswith("k1")
        criteria[opt] = (math.log(lo), math.log(hi)) if k1 else (None, hi)
    return criteria


def _run(old, rollout, mask, *, is_kw=None, criteria=None, batch_normalize=False):
    kw = is_kw or dict(level="token", mode="truncate", bounds=(None, None))
    with torch.no_grad():
        out = ppk.rollout_correction(
            old,
            rollout,
            mask,
            logratio_clamp=SAFETY_BOUND,
            batch_normalize=batch_normalize,
            criteria=criteria,
            **kw,
        )
    return out, metrics_to_floats(out)


def _zeros_like(x):
    return torch.zeros_like(x)


# ------------------------------------------------------------------ metric dicts
def _is_metrics(m, rollout_is, upper, lower, batch_normalize):
    """veRL's compute_is_metrics keys (+ oob ratio, batch-norm factor) from the op's metrics."""
    seq = {
        "rollout_is_seq_mean": m["seq_weights_mean"],
        "rollout_is_seq_std": m["seq_weights_std"],
        "rollout_is_seq_max": m["seq_weights_max"],
        "rollout_is_seq_min": m["seq_weights_min"],
        "rollout_is_seq_max_deviation": m["seq_weights_max_deviation"],
        "rollout_is_seq_fraction_high": m["seq_raw_fraction_high"],
        "rollout_is_seq_fraction_low": m["seq_raw_fraction_low"],
    }
    spread = {
        "rollout_is_std": m["weights_std"],
        "rollout_is_eff_sample_size": m["eff_sample_size"],
    }
    if rollout_is == "sequence":
        out = {
            # from the unclamped log of the row product (the max exp clamped at the bound)
            "rollout_is_max": math.exp(min(m["seq_logratio_max"], SAFETY_BOUND)),
            "rollout_is_min": math.exp(m["seq_logratio_min"]),
            "rollout_is_mean": m["weights_mean"],
            "rollout_is_ratio_fraction_high": m["seq_logratio_fraction_high"],
            "rollout_is_ratio_fraction_low": m["seq_logratio_fraction_low"],
        }
    else:
        out = {
            "rollout_is_mean": m["weights_mean"],
            "rollout_is_ratio_fraction_high": m["ratio_fraction_high"],
            "rollout_is_ratio_fraction_low": m["ratio_fraction_low"],
            "rollout_is_max": m["weights_max"],
            "rollout_is_min": m["weights_min"],
        }
    out.update(spread)
    out.update(seq)
    if lower is not None:
        out["rollout_is_oob_ratio"] = m["fraction_bounded"]
    if batch_normalize:
        factor = m["batch_norm_factor"]
        out["rollout_is_batch_norm_factor"] = factor if factor > 1e-8 else 1.0
    return out


_RS_KEYS = (
    "mean",
    "max",
    "min",
    "fraction_high",
    "fraction_low",
    "std",
    "seq_mean",
    "seq_std",
    "seq_max",
    "seq_min",
    "seq_max_deviation",
    "seq_fraction_high",
)


def _rs_metrics(m, criteria):
    out = {}
    for opt in criteria:
        p = f"rollout_rs_{opt}"
        for k in _RS_KEYS:
            out[f"{p}_{k}"] = m[f"{opt}/{k}"]
        if opt.endswith("k1"):
            out[f"{p}_seq_fraction_low"] = m[f"{opt}/seq_fraction_low"]
        out[f"{p}_masked_fraction"] = m[f"{opt}/masked_fraction"]
        out[f"{p}_seq_masked_fraction"] = m[f"{opt}/seq_masked_fraction"]
    out["rollout_rs_masked_fraction"] = m["rejected_fraction"]
    out["rollout_rs_seq_masked_fraction"] = m["rejected_seq_fraction"]
    return out


_OFFPOLICY_KEYS = (
    "training_ppl",
    "training_log_ppl",
    "kl",
    "k3_kl",
    "rollout_ppl",
    "rollout_log_ppl",
    "log_ppl_diff",
    "log_ppl_abs_diff",
    "log_ppl_diff_max",
    "log_ppl_diff_min",
    "ppl_ratio",
    "chi2_token",
    "chi2_seq",
)


def _offpolicy(m):
    return {k: m[k] for k in _OFFPOLICY_KEYS}


def _weights_dtype(*tensors_then_w):
    """veRL's weights' dtype: its inputs' promotion (log-ratio times mask); no copy when equal."""
    *tensors, w = tensors_then_w
    return w.to(float_dtype(*tensors))


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _normalise_distributed(w, mask, rollout_is, metrics):
    """veRL's batch normalisation across ranks (verl_F.distributed_masked_mean)."""
    import verl.utils.torch_functional as verl_F

    mask_f = mask.to(dtype=w.dtype)
    if rollout_is == "token":
        mean = verl_F.distributed_masked_mean(w, mask_f)
    else:
        seq = verl_F.masked_mean(w, mask, axis=-1)
        mean = verl_F.distributed_masked_mean(seq, (mask.sum(dim=-1) > 0).to(dtype=w.dtype))
    if mean > 1e-8:
        w = w / mean
        metrics["rollout_is_batch_norm_factor"] = mean.item()
    else:
        metrics["rollout_is_batch_norm_factor"] = 1.0
    return w


# ------------------------------------------------------------------ veRL's functions
def compute_rollout_correction_weights(
    log_ratio,
    response_mask,
    rollout_is="token",
    rollout_is_threshold=2.0,
    rollout_is_batch_normalize=False,
):
    """veRL's IS weights (detached) and ``rollout_is_*`` metrics from the log-ratio
    ``log pi_train / pi_rollout``: token ``exp(clamp(x, +-20))``, sequence
    ``exp(clamp(sum_t x, +-20))`` (a product, not a mean), truncated at a float threshold or
    masked outside a ``"lower_upper"`` band, optionally divided by the batch mean."""
    is_kw, upper, lower = _is_config(rollout_is, rollout_is_threshold)
    if not response_mask.any():
        raise ValueError(_NO_VALID)
    dist_norm = rollout_is_batch_normalize and _distributed()
    out, m = _run(
        log_ratio,
        _zeros_like(log_ratio),
        response_mask,
        is_kw=is_kw,
        batch_normalize=rollout_is_batch_normalize and not dist_norm,
    )
    metrics = _is_metrics(m, rollout_is, upper, lower, rollout_is_batch_normalize and not dist_norm)
    w = _weights_dtype(log_ratio, response_mask, out.weights)
    if dist_norm:
        w = _normalise_distributed(w, response_mask, rollout_is, metrics)
    return w, metrics


def compute_rollout_rejection_mask(
    log_ratio, response_mask, rollout_rs="token_k1", rollout_rs_threshold=None
):
    """veRL's rejection mask (every comma-separated option must pass) and ``rollout_rs_*``
    metrics, from the log-ratio."""
    if rollout_rs is None or not isinstance(rollout_rs, str) or rollout_rs_threshold is None:
        _rs_config(rollout_rs, rollout_rs_threshold)  # raises veRL's error
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    criteria = _rs_config(rollout_rs, rollout_rs_threshold)
    if not response_mask.any():
        raise ValueError(_NO_VALID)
    out, m = _run(log_ratio, _zeros_like(log_ratio), response_mask, criteria=criteria)
    return out.mask, _rs_metrics(m, criteria)


def compute_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask):
    """veRL's off-policy diagnostics (perplexities, KL, k3 KL, chi-square at token and sequence
    level), without the ``rollout_corr/`` prefix."""
    assert response_mask.any(), "Expected at least one valid token in response_mask"
    if rollout_log_prob is None:  # the training perplexity alone: the rollout side is unused
        _, m = _run(old_log_prob, old_log_prob, response_mask)
        return {k: m[k] for k in ("training_ppl", "training_log_ppl")}
    _, m = _run(old_log_prob, rollout_log_prob, response_mask)
    return _offpolicy(m)


def compute_rollout_corr_metrics_from_logprobs(log_prob, rollout_log_prob, response_mask):
    """:func:`compute_offpolicy_metrics` with the ``rollout_corr/`` prefix."""
    m = compute_offpolicy_metrics(log_prob, rollout_log_prob, response_mask)
    return {f"rollout_corr/{k}": v for k, v in m.items()}


def compute_rollout_correction_and_rejection_mask(
    old_log_prob,
    rollout_log_prob,
    response_mask,
    rollout_is=None,
    rollout_is_threshold=2.0,
    rollout_is_batch_normalize=False,
    rollout_rs=None,
    rollout_rs_threshold=None,
):
    """IS weights (a DataProto with ``rollout_is_weights``, or None), the rejection-sampled
    mask and every ``rollout_corr/*`` metric, from one fused op call."""
    if not response_mask.any():
        raise ValueError(_NO_VALID)
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(
            f"old_log_prob shape {old_log_prob.shape} does not match rollout_log_prob shape "
            f"{rollout_log_prob.shape}."
        )
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(
            f"log_prob shape {old_log_prob.shape} does not match response_mask shape "
            f"{response_mask.shape}."
        )
    use_is = rollout_is is not None and rollout_is_threshold is not None
    is_kw = upper = lower = None
    if use_is:
        is_kw, upper, lower = _is_config(rollout_is, rollout_is_threshold)
    criteria = None
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError(
                "rollout_rs_threshold must be explicitly provided when rollout_rs is enabled. "
                "Set rollout_rs_threshold to the desired threshold value."
            )
        criteria = _rs_config(rollout_rs, rollout_rs_threshold)
    dist_norm = use_is and rollout_is_batch_normalize and _distributed()
    norm = use_is and rollout_is_batch_normalize and not dist_norm
    out, m = _run(
        old_log_prob,
        rollout_log_prob,
        response_mask,
        is_kw=is_kw,
        criteria=criteria,
        batch_normalize=norm,
    )
    metrics = {}
    weights = None
    if use_is:
        metrics.update(_is_metrics(m, rollout_is, upper, lower, norm))
        weights = _weights_dtype(old_log_prob, rollout_log_prob, response_mask, out.weights)
        if dist_norm:
            weights = _normalise_distributed(weights, response_mask, rollout_is, metrics)
    if criteria is not None:
        metrics.update(_rs_metrics(m, criteria))
    metrics.update(_offpolicy(m))
    proto = None
    if weights is not None:
        from verl.protocol import DataProto

        proto = DataProto.from_dict(tensors={"rollout_is_weights": weights})
    return proto, out.mask, {f"rollout_corr/{k}": v for k, v in metrics.items()}
