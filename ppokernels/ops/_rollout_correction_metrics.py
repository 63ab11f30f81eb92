"""The mismatch metrics of rollout_correction from its per-row statistics, in few torch calls.

Same values as :func:`ppokernels.reference.rollout_correction.rollout_correction_metrics` (the
specification, one readable line per metric; tests/ops/test_rollout_correction.py compares the
two), computed by reduction type instead of metric by metric: one column sum of ``row_stats``
for every per-token mean, one [B, K] matrix of per-row values for the means over rows, one for
the extremes, criteria side by side as [B, n_criteria] columns. About 60 torch calls whatever
the number of metrics (the spec makes about 700), which is most of the op's cost at small
shapes. Branch-free on data (it runs under torch.compile); fp64.
"""

from __future__ import annotations

import math

import torch

from ppokernels.reference.rollout_correction import (
    CRITERION_STATS,
    ROW_STATS,
    metric_names,
)

_R = {k: i for i, k in enumerate(ROW_STATS)}
_C = {k: i for i, k in enumerate(CRITERION_STATS)}
_NR, _NC = len(ROW_STATS), len(CRITERION_STATS)

# Per-token means: column sums of row_stats / N.
_PER_TOKEN = (
    "sum_weights",
    "count_high",
    "count_low",
    "sum_logratio",
    "sum_k3",
    "sum_ratio_sq",
    "sum_abs_logratio",
    "count_rejected",
    "sum_weights_sq",
)
# The order in which the pieces below are concatenated (then permuted into metric_names order).
_ORDER = (
    # per-token means (the first 8 of _PER_TOKEN) and the values made from them
    "weights_mean",
    "ratio_fraction_high",
    "ratio_fraction_low",
    "kl",
    "k3_kl",
    "chi2_token",
    "logratio_abs_mean",
    "rejected_fraction",
    "fraction_bounded",
    "weights_std",
    "eff_sample_size",
    # means over all rows
    "seq_weights_mean",
    "seq_weight_mean",
    "training_log_ppl",
    "rollout_log_ppl",
    "log_ppl_diff",
    "training_ppl",
    "rollout_ppl",
    "ppl_ratio",
    "chi2_seq",
    "log_ppl_abs_diff",
    "seq_raw_fraction_high",
    "seq_raw_fraction_low",
    "seq_logratio_fraction_high",
    "seq_logratio_fraction_low",
    "rejected_seq_fraction",
    "seq_weights_std",
    # extremes over all rows
    "seq_weights_max",
    "seq_weights_max_deviation",
    "seq_logratio_max",
    "seq_weight_max",
    "log_ppl_diff_max",
    "seq_weights_min",
    "seq_logratio_min",
    "seq_weight_min",
    "log_ppl_diff_min",
    # extremes over the rows with a valid token
    "weights_max",
    "logratio_abs_max",
    "weights_min",
)
# Per criterion, metric by metric over the criteria (each piece is [n_criteria]).
_CRIT_ORDER = (
    "mean",
    "masked_fraction",
    "fraction_high",
    "fraction_low",
    "std",
    "seq_mean",
    "seq_std",
    "seq_fraction_high",
    "seq_fraction_low",
    "seq_masked_fraction",
    "max",
    "seq_max",
    "seq_max_deviation",
    "min",
    "seq_min",
)


_PERMUTATIONS: dict[tuple[str, ...], list[int]] = {}


def _permutation(criteria: tuple[str, ...]) -> list[int]:
    """Positions, in the concatenation, of the metrics in :func:`metric_names` order (cached per
    criteria tuple in a plain dict: torch.compile traces through it, not through lru_cache)."""
    perm = _PERMUTATIONS.get(criteria)
    if perm is None:
        cat = list(_ORDER) + [f"{c}/{m}" for m in _CRIT_ORDER for c in criteria]
        pos = {name: i for i, name in enumerate(cat)}
        perm = _PERMUTATIONS[criteria] = [pos[name] for name in metric_names(criteria)]
    return perm


def _extremes(x: torch.Tensor, keep: torch.Tensor | None, largest: bool) -> torch.Tensor:
    """Max (min) over the rows of x [B, K] where keep [B] (all rows: None) is set, per column;
    0 where no row is kept. NaN propagates."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape[1:])
    if keep is None:
        return x.amax(0) if largest else x.amin(0)
    fill = -math.inf if largest else math.inf
    m = torch.where(keep[:, None], x, fill)
    m = m.amax(0) if largest else m.amin(0)
    return torch.where(keep.any(), m, 0.0)


def _std(x: torch.Tensor, keep: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the rows of x [B, K] where keep [B] is set (count of them), per column;
    0 for fewer than two."""
    k = keep.to(x.dtype)[:, None]
    mean = (x * k).sum(0) / count.clamp(min=1)
    var = ((x - mean).square() * k).sum(0) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.clamp(min=0).sqrt(), 0.0)


def rollout_correction_metrics(
    row_stats, *, bounds=(None, 2.0), logratio_clamp=20.0, criteria=(), criteria_bounds=()
):
    """The metrics vector (fp64, in :func:`metric_names` order) from ``row_stats``."""
    r = row_stats.double()
    rows = max(r.shape[0], 1)
    inf = math.inf
    lower = -inf if bounds[0] is None else float(bounds[0])
    upper = inf if bounds[1] is None else float(bounds[1])
    report_low = lower if lower > -inf else (1.0 / upper if upper < inf else -inf)
    clamp = inf if logratio_clamp is None else float(logratio_clamp)
    log_hi = math.log(upper) if 0 < upper < inf else inf
    log_lo = math.log(report_low) if report_low > 0 else -inf

    n = r[:, 0]
    total = r.sum(0)
    N = total[0]
    valid = n > 0
    n_valid = valid.sum().double()
    pt = total[[_R[k] for k in _PER_TOKEN]] / N.clamp(min=1)
    mean_w, sq_w = pt[0], pt[8]
    bounded = pt[1] + pt[2] if lower > -inf else pt[1]
    tok_rest = torch.stack(
        [
            bounded,
            torch.where(N > 1, (sq_w - mean_w.square()).clamp(min=0).sqrt(), 0.0),
            1.0 / (sq_w / (mean_w + 1e-8).square()),
        ]
    )
    signs = pt.new_tensor([1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    offsets = pt.new_tensor([0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0])
    tok = pt[:8] * signs + offsets  # kl = -mean logratio, chi2_token = mean ratio^2 - 1

    # per-row values: means over the row's tokens (veRL's masked_mean: / (count + 1e-8))
    cols = [_R[k] for k in ("sum_weights", "sum_raw_weights", "sum_logprobs")]
    cols.append(_R["sum_rollout_logprobs"])
    seq_w, seq_raw, lp_mean, rlp_mean = (r[:, cols] / (n + 1e-8)[:, None]).unbind(1)
    d = rlp_mean - lp_mean
    s, w_row = r[:, _R["seq_logratio"]], r[:, _R["seq_weight"]]
    logs = torch.stack([-lp_mean, -rlp_mean, d], 1)
    chi2_row = (2.0 * r[:, _R["sum_logratio"]].clamp(-clamp, clamp)).exp()
    flags = torch.stack(
        [
            seq_raw > upper,
            seq_raw < report_low,
            s > log_hi,
            s < log_lo,
            r[:, _R["count_rejected"]] > 0,
        ],
        1,
    )
    per_row = torch.cat(
        [
            torch.stack([seq_w, w_row], 1),
            logs,
            logs.exp(),
            torch.stack([chi2_row, d.abs()], 1),
            flags.double(),
        ],
        1,
    )
    row_means = per_row.sum(0) / rows
    row_means = row_means - row_means.new_tensor([0.0] * 8 + [1.0] + [0.0] * 6)  # chi2_seq
    seq_w_std = seq_w.std().reshape(1) if seq_w.numel() > 1 else seq_w.new_zeros(1)
    ext_rows = torch.cat(
        [
            _extremes(torch.stack([seq_w, (seq_w - 1).abs(), s, w_row, d], 1), None, True),
            _extremes(torch.stack([seq_w, s, w_row, d], 1), None, False),
        ]
    )
    mx = r[:, [_R["max_weight"], _R["max_abs_logratio"]]]
    ext_valid = torch.cat(
        [_extremes(mx, valid, True), _extremes(r[:, [_R["min_weight"]]], valid, False)]
    )
    pieces = [tok, tok_rest, row_means, seq_w_std, ext_rows, ext_valid]

    if criteria:
        k = len(criteria)
        c = r[:, _NR:].reshape(r.shape[0], k, _NC)
        ct = total[_NR:].reshape(k, _NC)
        lo = r.new_tensor([-inf if b[0] is None else float(b[0]) for b in criteria_bounds])
        hi = r.new_tensor([inf if b[1] is None else float(b[1]) for b in criteria_bounds])
        token = torch.tensor([name.startswith("token_") for name in criteria], device=r.device)
        v = c[:, :, _C["value"]]
        per_tok = ct[:, [_C[x] for x in ("sum", "count_rejected", "count_high", "count_low")]]
        per_tok = per_tok / N.clamp(min=1)  # [k, 4]
        mean_c = ct[:, _C["sum_clamped"]] / N.clamp(min=1)
        var_c = ct[:, _C["sum_clamped_sq"]] / N.clamp(min=1) - mean_c.square()
        vk = v * valid[:, None]
        row_flags = torch.stack([v > hi, v < lo, c[:, :, _C["count_rejected"]] > 0], 2)
        valid_frac = (row_flags & valid[:, None, None]).sum(0).double() / n_valid.clamp(min=1)
        seq_hi, seq_lo, seq_rej = valid_frac.unbind(1)
        stat_max = torch.where(token, c[:, :, _C["max"]], v)
        stat_min = torch.where(token, c[:, :, _C["min"]], v)
        maxes = _extremes(torch.cat([stat_max, v, v.abs()], 1), valid, True)
        mins = _extremes(torch.cat([stat_min, v], 1), valid, False)
        pieces += [
            per_tok[:, 0],
            per_tok[:, 1],
            torch.where(token, per_tok[:, 2], seq_hi),
            torch.where(token, per_tok[:, 3], seq_lo),
            torch.where(N > 1, var_c.clamp(min=0).sqrt(), 0.0),
            vk.sum(0) / n_valid.clamp(min=1),
            _std(v, valid, n_valid),
            seq_hi,
            seq_lo,
            seq_rej,
            maxes,
            mins,
        ]
    flat = torch.cat([p.reshape(-1) for p in pieces])
    perm = torch.tensor(_permutation(tuple(criteria)), device=flat.device)
    return flat[perm]
