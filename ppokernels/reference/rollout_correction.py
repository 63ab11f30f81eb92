"""Reference rollout_correction: importance weights between the trainer's and the sampler's
log-probs, a rejection mask, and the mismatch metrics, from ``[B, T]`` log-probs and a mask.

This module holds the vocabularies of the op family (levels, modes, rejection criteria, the
columns of the per-row statistics and the metric names) once; the C++ header
``csrc/include/ppokernels/rollout_correction.h`` spells the same tables and
tests/ops/test_rollout_correction.py checks them against these.

Notation, per token t of row b (``m`` the mask, ``n_b`` the row's valid count):

    x     = logprobs - rollout_logprobs             log pi_train / pi_rollout (unclamped)
    xc    = clamp(x, -C, C)                         C = logratio_clamp (no clamp when None)
    s_b   = sum_t m x            (level "sequence_sum": log of the product of the token ratios)
          = sum_t m x / n_b      (level "sequence": the geometric mean; "token": reported only)
    raw   = exp(xc)              (token)     |  exp(clamp(s_b, -C, C)) on every token (sequence*)
    w     = clamp(raw, L, U)     (mode "truncate", TIS)   |  raw if L <= raw <= U else 0 ("mask",
            IcePop / MIS); 0 where m = 0; L = -inf, U = +inf when not given.

Rejection criteria ``"<agg>_<est>"``: a per-token statistic ``est`` of KL(pi_rollout || pi_train)
from samples of the rollout policy, ``k1 = -xc``, ``k2 = xc^2 / 2``, ``k3 = exp(xc) - 1 - xc``,
or of the sampled token's probability under the two policies (p = exp(rollout_logprobs),
q = exp(logprobs), both clamped to [1e-6, 1 - 1e-6]) ``binary_kl = p log(p/q) + (1-p)
log((1-p)/(1-q))``, ``tv = |p - q|``; aggregated by ``agg`` = token (each token), seq_sum,
seq_mean, seq_max (over the row's valid tokens; 0 for a row without one). A token is kept when
every criterion's value lies in its ``[lower, upper]`` (NaN fails); the rejection mask is
``mask`` and all criteria.

The weights are constants (no gradient), as in every trainer: they change the measure, not the
objective.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ppokernels._dtypes import acc_dtype as _acc

# ------------------------------------------------------------------------- vocabularies
# Codes are the positions in these tuples (the C++ and Triton kernels use the same numbers).
LEVELS = ("token", "sequence", "sequence_sum")
MODES = ("truncate", "mask")
CRITERION_AGGS = ("token", "seq_sum", "seq_mean", "seq_max")
ESTIMATORS = ("k1", "k2", "k3", "binary_kl", "tv")
# criterion code = agg code * len(ESTIMATORS) + estimator code
CRITERIA = tuple(f"{a}_{e}" for a in CRITERION_AGGS for e in ESTIMATORS)
MAX_CRITERIA = 16
# the probability clamp of binary_kl and tv (OpenRLHF 0.11.2 openrlhf/models/loss.py PolicyLoss)
PROB_EPS = 1e-6

# Columns of row_stats [B, len(ROW_STATS) + len(CRITERION_STATS) * n_criteria], per row over its
# valid tokens. "high" / "low" count raw weights above U / below L (below 1 / U when L is not
# given: the band symmetric in log space that veRL reports against).
ROW_STATS = (
    "count",  # n_b
    "sum_logratio",  # sum x
    "sum_logprobs",  # sum logprobs
    "sum_rollout_logprobs",  # sum rollout_logprobs
    "sum_k3",  # sum exp(x) - 1 - x (unclamped x)
    "sum_ratio_sq",  # sum exp(2 xc)
    "sum_abs_logratio",  # sum |x|
    "max_abs_logratio",  # max |x| (0 for an empty row)
    "seq_logratio",  # s_b (unclamped; 0 for an empty row)
    "seq_weight",  # the row's weight w for every level but token, defined for empty rows too
    "sum_weights",  # sum w
    "sum_weights_sq",  # sum w^2
    "max_weight",  # max w (-inf for an empty row)
    "min_weight",  # min w (+inf for an empty row)
    "count_high",  # tokens with raw > U
    "count_low",  # tokens with raw < L (or < 1 / U when L = -inf)
    "sum_raw_weights",  # sum raw
    "count_rejected",  # valid tokens failing any criterion
)
# Per criterion, appended in the order the criteria were given. For a token criterion over the
# row's tokens; for a sequence criterion the row value v stands for each of its n_b tokens.
CRITERION_STATS = (
    "value",  # token criterion: the row mean of the statistic; sequence: v (0 for an empty row)
    "sum",  # sum of the statistic (sequence: n_b v)
    "max",  # max of the statistic (sequence: v; -inf for an empty row)
    "min",  # min (sequence: v; +inf for an empty row)
    "count_high",  # tokens with the statistic > upper
    "count_low",  # tokens with the statistic < lower
    "sum_clamped",  # sum of clamp(statistic, lower or 0, upper)
    "sum_clamped_sq",  # sum of its square
    "count_rejected",  # valid tokens this criterion rejects
)


def criterion_code(name: str) -> tuple[int, int]:
    """(agg code, estimator code) of a criterion name such as ``"seq_mean_k3"``."""
    code = CRITERIA.index(name)
    return divmod(code, len(ESTIMATORS))


class RolloutCorrectionOutput(NamedTuple):
    """Result of ``rollout_correction``; every tensor is a constant (no gradient).

    weights: [B, T] fp32 (fp64 for fp64 inputs) importance weights, 0 where ``mask`` is 0.
    mask: [B, T] the rejection-sampled mask, in the dtype of the input mask (``mask`` and every
        criterion; ``mask`` itself when no criterion is given).
    metrics: dict name -> 0-d tensor (views of one fp64 vector: one host sync reads them all);
        names in :data:`METRICS` plus :func:`criterion_metric_names` per criterion.
    row_stats: [B, K] the per-row statistics the metrics are reduced from (:data:`ROW_STATS`,
        then :data:`CRITERION_STATS` per criterion).
    """

    weights: torch.Tensor
    mask: torch.Tensor
    metrics: dict
    row_stats: torch.Tensor


# ----------------------------------------------------------------------- per-token math
def _estimator(est: str, xc, logprobs, rollout_logprobs):
    if est == "k1":
        return -xc
    if est == "k2":
        return 0.5 * xc * xc
    if est == "k3":
        return torch.expm1(xc) - xc
    p = rollout_logprobs.exp().clamp(PROB_EPS, 1 - PROB_EPS)
    q = logprobs.exp().clamp(PROB_EPS, 1 - PROB_EPS)
    if est == "binary_kl":
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    return (p - q).abs()


def _row_max(x, m, fill, largest=True):
    """Max (min) over the row's valid entries, ``fill`` for a row without one."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], fill)
    y = _masked(x, m, fill)
    return y.amax(-1) if largest else y.amin(-1)


def _bound(raw, mode, lower, upper):
    if mode == "truncate":
        return raw.clamp(min=lower, max=upper)
    return torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))


def _masked(x, m, fill):
    return torch.where(m, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def rollout_correction_rows(
    logprobs,
    rollout_logprobs,
    mask,
    *,
    level="token",
    mode="truncate",
    bounds=(None, 2.0),
    logratio_clamp=20.0,
    criteria=(),
    criteria_bounds=(),
):
    """``(weights, rejection mask, row_stats)``: the kernels' outputs, before the metrics.

    ``bounds`` = (L, U) and each of ``criteria_bounds`` = (lower, upper), None for no bound.
    Computed in fp32, or fp64 for fp64 inputs (pass fp64 tensors for the fp64 reference).
    """
    dtype = _acc(logprobs, rollout_logprobs)
    lp, rlp = logprobs.to(dtype), rollout_logprobs.to(dtype)
    m = mask != 0
    mf = m.to(dtype)
    inf = math.inf
    lower = -inf if bounds[0] is None else float(bounds[0])
    upper = inf if bounds[1] is None else float(bounds[1])
    clamp = inf if logratio_clamp is None else float(logratio_clamp)
    zero = torch.zeros((), dtype=dtype, device=lp.device)

    x = _masked(lp - rlp, m, 0.0)
    xc = x.clamp(-clamp, clamp)
    n = mf.sum(-1)
    sum_x = x.sum(-1)
    s = sum_x if level == "sequence_sum" else torch.where(n > 0, sum_x / n.clamp(min=1), zero)
    row_weight = _bound(s.clamp(-clamp, clamp).exp(), mode, lower, upper)
    if level == "token":
        raw = xc.exp()
    else:
        raw = s.clamp(-clamp, clamp).exp()[:, None].expand_as(x)
    raw = _masked(raw, m, 0.0)
    w = _masked(_bound(raw, mode, lower, upper), m, 0.0)
    report_low = lower if lower > -inf else (1.0 / upper if upper < inf else -inf)

    keep = m.clone()
    crit_cols = []
    for name, (c_lo, c_hi) in zip(criteria, criteria_bounds, strict=True):
        agg, est = CRITERION_AGGS[criterion_code(name)[0]], ESTIMATORS[criterion_code(name)[1]]
        c_lo = -inf if c_lo is None else float(c_lo)
        c_hi = inf if c_hi is None else float(c_hi)
        st = _masked(_estimator(est, xc, _masked(lp, m, 0.0), _masked(rlp, m, 0.0)), m, 0.0)
        if agg == "token":
            tok = st
        else:
            if agg == "seq_sum":
                v = st.sum(-1)
            elif agg == "seq_mean":
                v = torch.where(n > 0, st.sum(-1) / n.clamp(min=1), zero)
            else:
                v = torch.where(n > 0, _row_max(st, m, -inf), zero)
            tok = v[:, None].expand_as(st)
        passed = (tok >= c_lo) & (tok <= c_hi)
        rejected = m & ~passed
        keep &= ~rejected
        clo = c_lo if c_lo > -inf else 0.0
        tc = tok.clamp(clo, c_hi)
        value = torch.where(n > 0, st.sum(-1) / n.clamp(min=1), zero) if agg == "token" else v
        cols = [
            value,
            _masked(tok, m, 0.0).sum(-1),
            _row_max(tok, m, -inf),
            _row_max(tok, m, inf, largest=False),
            (m & (tok > c_hi)).sum(-1).to(dtype),
            (m & (tok < c_lo)).sum(-1).to(dtype),
            _masked(tc, m, 0.0).sum(-1),
            _masked(tc * tc, m, 0.0).sum(-1),
            rejected.sum(-1).to(dtype),
        ]
        crit_cols += cols

    cols = [
        n,
        sum_x,
        _masked(lp, m, 0.0).sum(-1),
        _masked(rlp, m, 0.0).sum(-1),
        _masked(torch.expm1(x) - x, m, 0.0).sum(-1),
        _masked((2 * xc).exp(), m, 0.0).sum(-1),
        x.abs().sum(-1),
        torch.where(n > 0, _row_max(x.abs(), m, 0.0), zero),
        s,
        row_weight,
        w.sum(-1),
        (w * w).sum(-1),
        _row_max(w, m, -inf),
        _row_max(w, m, inf, largest=False),
        (m & (raw > upper)).sum(-1).to(dtype),
        (m & (raw < report_low)).sum(-1).to(dtype),
        raw.sum(-1),
        (m & ~keep).sum(-1).to(dtype),
    ]
    row_stats = torch.stack(cols + crit_cols, dim=-1)
    keep_out = keep.to(mask.dtype)
    return w, keep_out, row_stats


# ---------------------------------------------------------------------------- metrics
# Batch metrics, reduced from row_stats (shared by every backend: the kernels produce row_stats
# only). N = number of valid tokens, "rows" = all B rows, "valid rows" = rows with a token.
METRICS = (
    "weights_mean",  # sum w / N
    "weights_max",  # max w over valid tokens
    "weights_min",  # min w over valid tokens
    "weights_std",  # sqrt(max(mean w^2 - mean^2, 0)) over valid tokens (0 for N <= 1)
    "eff_sample_size",  # 1 / mean((w / (mean w + 1e-8))^2) over valid tokens
    "ratio_fraction_high",  # tokens with raw > U, / N
    "ratio_fraction_low",  # tokens with raw < L (1 / U when no L), / N
    "fraction_bounded",  # tokens whose weight the bounds changed (truncated or masked), / N
    "seq_weights_mean",  # per-row masked mean of w (0 for an empty row): mean over rows
    "seq_weights_std",  # its unbiased std over rows (0 for one row)
    "seq_weights_max",
    "seq_weights_min",
    "seq_weights_max_deviation",  # max over rows of |row mean - 1|
    "seq_raw_fraction_high",  # rows whose masked mean raw weight > U, / rows
    "seq_raw_fraction_low",  # rows whose masked mean raw weight < L (1 / U), / rows
    "seq_logratio_max",  # max over rows of s_b (0 for an empty row)
    "seq_logratio_min",
    "seq_logratio_fraction_high",  # rows with s_b > log U, / rows
    "seq_logratio_fraction_low",  # rows with s_b < log L (log 1 / U), / rows
    "seq_weight_mean",  # the row weights (sequence levels; every row), mean over rows
    "seq_weight_min",
    "seq_weight_max",
    "training_ppl",  # mean over rows of exp(-row mean logprobs)
    "training_log_ppl",  # mean over rows of -row mean logprobs
    "rollout_ppl",
    "rollout_log_ppl",
    "kl",  # sum (rollout_logprobs - logprobs) / N: k1 of KL(pi_rollout || pi_train)
    "k3_kl",  # sum exp(x) - 1 - x / N
    "log_ppl_diff",  # mean over rows of d_b = row mean rollout_logprobs - row mean logprobs
    "log_ppl_abs_diff",  # mean |d_b|
    "log_ppl_diff_max",
    "log_ppl_diff_min",
    "ppl_ratio",  # mean exp(d_b)
    "chi2_token",  # sum exp(2 xc) / N - 1
    "chi2_seq",  # mean over rows of exp(2 clamp(sum_t x, -C, C)) - 1
    "logratio_abs_mean",  # sum |x| / N
    "logratio_abs_max",  # max |x| over valid tokens
    "rejected_fraction",  # valid tokens failing any criterion, / N
    "rejected_seq_fraction",  # rows with a rejected token, / rows
)
_CRITERION_METRICS = (
    "mean",  # mean of the statistic over valid tokens (a sequence value counts n_b times)
    "max",  # token: over valid tokens; sequence: over valid rows
    "min",
    "fraction_high",  # token: tokens above upper / N; sequence: valid rows above upper / rows
    "fraction_low",
    "std",  # of clamp(statistic, lower or 0, upper) over valid tokens (0 for N <= 1)
    "seq_mean",  # of the row values over valid rows
    "seq_std",  # unbiased, 0 for one valid row
    "seq_max",
    "seq_min",
    "seq_max_deviation",  # max |row value|
    "seq_fraction_high",  # valid rows whose row value > upper
    "seq_fraction_low",
    "masked_fraction",  # valid tokens this criterion rejects, / N
    "seq_masked_fraction",  # valid rows with such a token, / valid rows
)


def criterion_metric_names(criterion: str) -> tuple[str, ...]:
    """The metric names of one rejection criterion: ``"<criterion>/<name>"``."""
    return tuple(f"{criterion}/{k}" for k in _CRITERION_METRICS)


def _std_rows(v):
    """Unbiased std over all rows (0 for one row)."""
    return v.std() if v.numel() > 1 else torch.zeros((), dtype=v.dtype, device=v.device)


def _extreme(v, keep, largest=True):
    """Max (min) of v over the rows where keep is set, 0 when none is (branch-free)."""
    if v.numel() == 0:
        return torch.zeros((), dtype=v.dtype, device=v.device)
    fill = -math.inf if largest else math.inf
    m = torch.where(keep, v, fill)
    m = m.max() if largest else m.min()
    return torch.where(keep.any(), m, 0.0)


def _masked_std(v, keep, count):
    """Unbiased std of v over the rows where keep is set, 0 for fewer than two."""
    k = keep.to(v.dtype)
    mean = (v * k).sum() / count.clamp(min=1)
    var = ((v - mean).square() * k).sum() / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.clamp(min=0).sqrt(), 0.0)


def rollout_correction_metrics(
    row_stats,
    *,
    bounds=(None, 2.0),
    logratio_clamp=20.0,
    criteria=(),
    criteria_bounds=(),
):
    """The batch metrics (:data:`METRICS`, then :func:`criterion_metric_names` per criterion)
    from ``row_stats``, as one fp64 vector. Plain torch on ``[B]`` columns, in a fixed order and
    without data-dependent branches (it runs under torch.compile): the same for every backend,
    deterministic. Means over no token or no row are 0."""
    r = row_stats.double()
    col = {k: r[:, i] for i, k in enumerate(ROW_STATS)}
    inf = math.inf
    lower = -inf if bounds[0] is None else float(bounds[0])
    upper = inf if bounds[1] is None else float(bounds[1])
    report_low = lower if lower > -inf else (1.0 / upper if upper < inf else -inf)
    clamp = inf if logratio_clamp is None else float(logratio_clamp)
    n = col["count"]
    N = n.sum()
    rows = max(r.shape[0], 1)
    every = torch.ones_like(n, dtype=torch.bool)
    valid = n > 0
    n_valid = valid.sum().double()

    def per_token(x):
        return x.sum() / N.clamp(min=1)

    def row_mean(x):  # veRL's masked_mean per row: sum / (count + 1e-8), 0 for an empty row
        return x / (n + 1e-8)

    def rows_where(c):
        return c.sum().double() / rows

    def valid_where(c):
        return (c & valid).sum().double() / n_valid.clamp(min=1)

    mean_w = per_token(col["sum_weights"])
    var_w = per_token(col["sum_weights_sq"]) - mean_w.square()
    std_w = torch.where(N > 1, var_w.clamp(min=0).sqrt(), 0.0)
    ess = 1.0 / (per_token(col["sum_weights_sq"]) / (mean_w + 1e-8).square())
    seq_w = row_mean(col["sum_weights"])
    seq_raw = row_mean(col["sum_raw_weights"])
    s = col["seq_logratio"]
    lp_mean = row_mean(col["sum_logprobs"])
    rlp_mean = row_mean(col["sum_rollout_logprobs"])
    d = rlp_mean - lp_mean
    log_hi = math.log(upper) if 0 < upper < inf else inf
    log_lo = math.log(report_low) if report_low > 0 else -inf
    bounded = col["count_high"] + col["count_low"] if lower > -inf else col["count_high"]
    values = [
        mean_w,
        _extreme(col["max_weight"], valid),
        _extreme(col["min_weight"], valid, largest=False),
        std_w,
        ess,
        per_token(col["count_high"]),
        per_token(col["count_low"]),
        per_token(bounded),
        seq_w.sum() / rows,
        _std_rows(seq_w),
        _extreme(seq_w, every),
        _extreme(seq_w, every, largest=False),
        _extreme((seq_w - 1).abs(), every),
        rows_where(seq_raw > upper),
        rows_where(seq_raw < report_low),
        _extreme(s, every),
        _extreme(s, every, largest=False),
        rows_where(s > log_hi),
        rows_where(s < log_lo),
        col["seq_weight"].sum() / rows,
        _extreme(col["seq_weight"], every, largest=False),
        _extreme(col["seq_weight"], every),
        (-lp_mean).exp().sum() / rows,
        (-lp_mean).sum() / rows,
        (-rlp_mean).exp().sum() / rows,
        (-rlp_mean).sum() / rows,
        -per_token(col["sum_logratio"]),
        per_token(col["sum_k3"]),
        d.sum() / rows,
        d.abs().sum() / rows,
        _extreme(d, every),
        _extreme(d, every, largest=False),
        d.exp().sum() / rows,
        per_token(col["sum_ratio_sq"]) - 1.0,
        (2.0 * col["sum_logratio"].clamp(-clamp, clamp)).exp().sum() / rows - 1.0,
        per_token(col["sum_abs_logratio"]),
        _extreme(col["max_abs_logratio"], valid),
        per_token(col["count_rejected"]),
        rows_where(col["count_rejected"] > 0),
    ]
    base = len(ROW_STATS)
    width = len(CRITERION_STATS)
    for i, (name, (c_lo, c_hi)) in enumerate(zip(criteria, criteria_bounds, strict=True)):
        c = {k: r[:, base + i * width + j] for j, k in enumerate(CRITERION_STATS)}
        c_lo = -inf if c_lo is None else float(c_lo)
        c_hi = inf if c_hi is None else float(c_hi)
        token = name.startswith("token_")
        v = c["value"]
        mean_c = per_token(c["sum_clamped"])
        var_c = per_token(c["sum_clamped_sq"]) - mean_c.square()
        values += [
            per_token(c["sum"]),
            _extreme(c["max"] if token else v, valid),
            _extreme(c["min"] if token else v, valid, largest=False),
            per_token(c["count_high"]) if token else valid_where(v > c_hi),
            per_token(c["count_low"]) if token else valid_where(v < c_lo),
            torch.where(N > 1, var_c.clamp(min=0).sqrt(), 0.0),
            (v * valid).sum() / n_valid.clamp(min=1),
            _masked_std(v, valid, n_valid),
            _extreme(v, valid),
            _extreme(v, valid, largest=False),
            _extreme(v.abs(), valid),
            valid_where(v > c_hi),
            valid_where(v < c_lo),
            per_token(c["count_rejected"]),
            valid_where(c["count_rejected"] > 0),
        ]
    dev = row_stats.device
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev) for v in values])


def metric_names(criteria=()) -> tuple[str, ...]:
    """The names of the metrics vector, in order."""
    names = METRICS
    for c in criteria:
        names = names + criterion_metric_names(c)
    return names


def rollout_correction(
    logprobs,
    rollout_logprobs,
    mask,
    *,
    level="token",
    mode="truncate",
    bounds=(None, 2.0),
    logratio_clamp=20.0,
    batch_normalize=False,
    criteria=(),
    criteria_bounds=(),
):
    """Importance weights, rejection mask and metrics (see the module docstring); the
    specification of :func:`ppokernels.rollout_correction`.

    ``batch_normalize`` divides the weights by their batch mean when it exceeds 1e-8: the mean
    over valid tokens (level token) or over valid rows of each row's mean weight (sequence
    levels), as veRL 0.9.1 ``compute_rollout_correction_weights``; the metrics describe the
    weights before it (``batch_norm_factor`` is added).
    """
    with torch.no_grad():
        w, keep, row_stats = rollout_correction_rows(
            logprobs,
            rollout_logprobs,
            mask,
            level=level,
            mode=mode,
            bounds=bounds,
            logratio_clamp=logratio_clamp,
            criteria=criteria,
            criteria_bounds=criteria_bounds,
        )
        vec = rollout_correction_metrics(
            row_stats,
            bounds=bounds,
            logratio_clamp=logratio_clamp,
            criteria=criteria,
            criteria_bounds=criteria_bounds,
        )
        names = metric_names(criteria)
        if batch_normalize:
            factor = batch_norm_factor(row_stats, level)
            w = w / torch.where(factor > 1e-8, factor, 1.0).to(w.dtype)
            vec = torch.cat([vec, factor.reshape(1).double()])
            names = names + ("batch_norm_factor",)
    return RolloutCorrectionOutput(w, keep, dict(zip(names, vec.unbind(), strict=True)), row_stats)


def batch_norm_factor(row_stats, level):
    """The batch mean the weights are divided by under ``batch_normalize`` (0-d, the weights'
    dtype): token level, sum w / (N + 1e-8); sequence levels, the mean over valid rows of
    sum w / (n_b + 1e-8)."""
    n = row_stats[:, 0]
    sum_w = row_stats[:, ROW_STATS.index("sum_weights")]
    if level == "token":
        return sum_w.sum() / (n.sum() + 1e-8)
    valid = (n > 0).to(sum_w.dtype)
    return (sum_w / (n + 1e-8) * valid).sum() / valid.sum().clamp(min=1e-8)
