"""rollout_correction: importance weights, rejection mask and mismatch metrics between the
trainer's recomputed log-probs and the rollout engine's (vLLM / SGLang) log-probs."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ppokernels import _backend
from ppokernels._dtypes import acc_dtype
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, register_fake_cpp
from ppokernels.ops._rollout_correction_metrics import rollout_correction_metrics
from ppokernels.reference.rollout_correction import (
    CRITERIA,
    CRITERION_STATS,
    LEVELS,
    MAX_CRITERIA,
    MODES,
    ROW_STATS,
    RolloutCorrectionOutput,
    batch_norm_factor,
    metric_names,
)
from ppokernels.reference.rollout_correction import rollout_correction as _reference

if _backend.HAS_TRITON:
    import ppokernels.triton.rollout_correction  # noqa: F401  (registers the _triton op)

NAME = "rollout_correction"


def _bound(name: str, arg: str, v) -> float | None:
    if v is None:
        return None
    return _checks.number(name, arg, v)


def _bounds(name: str, arg: str, b) -> tuple[float | None, float | None]:
    """(lower, upper) from a pair (None: no bound) or an upper bound alone."""
    if b is None or isinstance(b, (int, float)) and not isinstance(b, bool):
        pair = (None, b)
    elif isinstance(b, (tuple, list)) and len(b) == 2:
        pair = tuple(b)
    else:
        raise TypeError(f"{name}: {arg} must be (lower, upper) or an upper bound, got {b!r}")
    lo, hi = _bound(name, f"{arg}[0]", pair[0]), _bound(name, f"{arg}[1]", pair[1])
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{name}: {arg} has lower {lo} > upper {hi}")
    return lo, hi


def _criteria(name: str, criteria) -> tuple[tuple[str, ...], tuple[tuple, ...]]:
    """Names and (lower, upper) bounds of the rejection criteria, in the order given."""
    if criteria is None:
        return (), ()
    if not isinstance(criteria, Mapping):
        raise TypeError(
            f"{name}: criteria must be a dict {{criterion: (lower, upper) or upper}}, "
            f"got {type(criteria).__name__}"
        )
    if len(criteria) > MAX_CRITERIA:
        raise ValueError(f"{name}: at most {MAX_CRITERIA} criteria, got {len(criteria)}")
    names, bounds = [], []
    for c, b in criteria.items():
        if c not in CRITERIA:
            raise ValueError(f"{name}: unknown criterion {c!r}; expected one of {CRITERIA}")
        names.append(c)
        bounds.append(_bounds(name, f"criteria[{c!r}]", b))
    return tuple(names), tuple(bounds)


def _flat(bounds) -> list[float]:
    """[lower, upper, ...] with NaN for "no bound" (the schema's float[] cannot hold None)."""
    return [math.nan if v is None else float(v) for pair in bounds for v in pair]


def rollout_correction(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    bounds=(None, 2.0),
    logratio_clamp: float | None = 20.0,
    batch_normalize: bool = False,
    criteria: Mapping | None = None,
    backend: str = "auto",
) -> RolloutCorrectionOutput:
    """Importance weights, rejection mask and mismatch metrics, in one pass per row.

    With ``x = logprobs - rollout_logprobs`` (log pi_train / pi_rollout), per row b and token t:

    - level "token": ``raw = exp(clamp(x, -C, C))``; "sequence": the geometric mean of the row's
      token ratios, ``exp(clamp(mean_t x, -C, C))`` on every token; "sequence_sum": their
      product ``exp(clamp(sum_t x, -C, C))`` (the form veRL 0.9.1 and TRL 1.16 call
      "sequence"; it falls to 0 or grows without bound with the length). ``C = logratio_clamp``.
    - mode "truncate" (TIS): ``w = clamp(raw, L, U)``; "mask" (IcePop / MIS, one- or two-sided):
      ``w = raw`` if ``L <= raw <= U`` else 0; ``bounds = (L, U)``, None for no bound; ``w = 0``
      where ``mask`` is 0.
    - ``batch_normalize``: ``w /= `` the batch mean of ``w`` (over valid tokens; for sequence
      levels over valid rows), when that exceeds 1e-8 (veRL's ``rollout_is_batch_normalize``).
    - ``criteria``: ``{"<agg>_<estimator>": (lower, upper) or upper}``, all must pass for a token
      to stay in the rejection mask; agg is token, seq_sum, seq_mean or seq_max; estimator k1
      (``-x``), k2 (``x^2 / 2``), k3 (``exp(x) - 1 - x``), each of the clamped ``x`` (veRL's
      ``rollout_rs`` options), binary_kl or tv of the sampled token's probabilities (OpenRLHF's
      gating). k1 bounds are in log space (veRL's ``"0.5_2.0"`` is ``(log 0.5, log 2)``).

    The outputs are constants: no gradient flows into the weights (they reweight the samples,
    they are not part of the objective), as in veRL, TRL and OpenRLHF; pass them to
    ``ppo_policy_loss`` as ``is_weights`` and the rejection mask as its ``mask``.

    Args:
        logprobs: [B, T] the trainer's log-probs of the sampled tokens (the behaviour policy
            recomputed), any float dtype.
        rollout_logprobs: [B, T] the sampler's, same dtype.
        mask: [B, T] valid tokens (bool, integer or floating; nonzero is valid). Masked
            positions may hold anything (NaN included) and give weight 0.
        level, mode, bounds, logratio_clamp, batch_normalize, criteria: as above.
        backend: "auto", "cpp", "triton" or "reference".

    Returns:
        :class:`RolloutCorrectionOutput` ``(weights [B, T] fp32 (fp64 for fp64), mask [B, T] in
        the input mask's dtype, metrics {name: 0-d fp64 tensor}, row_stats [B, K])``; metric
        names and definitions in :mod:`ppokernels.reference.rollout_correction` (``METRICS``,
        per criterion ``"<criterion>/<name>"``). Deterministic; no NaN from masked positions or
        rows without a valid token. Besides its outputs the op allocates nothing of size [B, T].
    """
    _checks.pair(NAME, "logprobs", logprobs, "rollout_logprobs", rollout_logprobs, ndim=2)
    if not isinstance(mask, torch.Tensor) or mask.dtype.is_complex:
        raise TypeError(f"{NAME}: mask must be a bool, integer or floating torch.Tensor")
    _checks.like(NAME, "mask", mask, "logprobs", logprobs)
    _checks.choice(NAME, "level", level, LEVELS)
    _checks.choice(NAME, "mode", mode, MODES)
    bounds = _bounds(NAME, "bounds", bounds)
    if logratio_clamp is not None:
        logratio_clamp = _checks.positive(NAME, "logratio_clamp", logratio_clamp)
    _checks.flag(NAME, "batch_normalize", batch_normalize)
    names, crit_bounds = _criteria(NAME, criteria)
    b = _backend.choose(NAME, logprobs.device, backend)
    cfg = dict(bounds=bounds, logratio_clamp=logratio_clamp)
    if b == "reference":
        return _reference(
            logprobs.detach(),
            rollout_logprobs.detach(),
            mask,
            level=level,
            mode=mode,
            batch_normalize=batch_normalize,
            criteria=names,
            criteria_bounds=crit_bounds,
            **cfg,
        )
    weights, keep, row_stats = kernel(NAME, b)(
        logprobs.detach(),
        rollout_logprobs.detach(),
        mask,
        level,
        mode,
        _flat([bounds]),
        logratio_clamp,
        [CRITERIA.index(c) for c in names],
        _flat(crit_bounds),
    )
    vec = rollout_correction_metrics(row_stats, criteria=names, criteria_bounds=crit_bounds, **cfg)
    names_out = metric_names(names)
    if batch_normalize:
        factor = batch_norm_factor(row_stats, level)
        # in place: the output itself, no second [B, T] tensor (veRL divides above 1e-8 only)
        weights.div_(torch.where(factor > 1e-8, factor, 1.0))
        vec = torch.cat([vec, factor.reshape(1).double()])
        names_out = names_out + ("batch_norm_factor",)
    return RolloutCorrectionOutput(
        weights, keep, dict(zip(names_out, vec.unbind(), strict=True)), row_stats
    )


def metrics_to_floats(out: RolloutCorrectionOutput) -> dict[str, float]:
    """The metrics as Python floats, read with one host sync."""
    values = torch.stack(list(out.metrics.values())).tolist() if out.metrics else []
    return dict(zip(out.metrics, values, strict=True))


# ------------------------------------------------------------------ fake kernel (C++ op)
def _fake(logprobs, rollout_logprobs, mask, level, mode, bounds, clamp, criteria, crit_bounds):
    B, T = logprobs.shape
    acc = acc_dtype(logprobs)
    cols = len(ROW_STATS) + len(CRITERION_STATS) * len(criteria)
    return (
        logprobs.new_empty((B, T), dtype=acc),
        mask.new_empty((B, T)),
        logprobs.new_empty((B, cols), dtype=acc),
    )


register_fake_cpp(NAME, _fake)
