"""group_advantages: per-sequence advantages with a group baseline (GRPO, Dr.GRPO, RLOO).

The backward is itself a registered op (``group_advantages_backward`` / ``..._triton``); the
formulas are derived in ``csrc/include/ppokernels/group_advantages.h``.
"""

from __future__ import annotations

import torch

from ppokernels import _backend, reference
from ppokernels._dtypes import acc_dtype
from ppokernels.ops import _checks
from ppokernels.ops._register import kernel, register_fake_cpp, register_first_input_autograd

if _backend.HAS_TRITON:
    import ppokernels.triton.group_advantages  # noqa: F401  (group_advantages*_triton ops)

ESTIMATORS = ("grpo", "rloo")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def group_advantages(
    scores: torch.Tensor,
    group_index: torch.Tensor,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    norm_by_std: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence advantages with a group baseline (several samples of one prompt).

    With ``mean_g``, ``std_g`` (unbiased) and ``n_g`` the statistics of the group of sample i:
      - ``"grpo"``: ``(s_i - mean_g) / (std_g + eps)``; ``norm_by_std=False`` gives Dr.GRPO's
        ``s_i - mean_g``.
      - ``"rloo"``: ``s_i`` minus the mean of the other members, ``n_g / (n_g - 1) (s_i - mean_g)``.
    Groups of one sample behave as veRL's loop versions (``compute_grpo_outcome_advantage``,
    ``compute_rloo_outcome_advantage``): GRPO takes mean 0 and std 1, so ``A = s / (1 + eps)``
    (``s`` without std normalisation); RLOO returns the raw score ``s``.

    Args:
        scores: [B] any float dtype. group_index: [B] integer group ids, in any order, not
            necessarily contiguous or sorted (e.g. veRL's ``uid`` mapped to integers).
        eps: >= 0. norm_by_std: only for "grpo".
    Returns:
        [B] float32 (float64 for float64 scores), differentiable with respect to scores. In a
        group of equal scores (std 0) the std's gradient is taken as 0 (autograd through
        ``torch.std`` gives NaN there). The group ids are made dense with ``torch.unique``,
        which synchronises with the device.
    """
    name = "group_advantages"
    _checks.tensor(name, "scores", scores, ndim=1)
    if not isinstance(group_index, torch.Tensor):
        raise TypeError(f"{name}: group_index must be a torch.Tensor, got {type(group_index)}")
    if group_index.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: group_index must be an integer tensor, got {group_index.dtype}")
    _checks.same_shape(name, "group_index", group_index, "scores", scores)
    _checks.same_device(name, "group_index", group_index, scores)
    _checks.choice(name, "estimator", estimator, ESTIMATORS)
    eps = _checks.non_negative(name, "eps", eps)
    _checks.flag(name, "norm_by_std", norm_by_std)
    _checks.not_meta(name, "scores", scores)
    b = _backend.choose(name, scores.device, backend)
    if b == "reference":
        return reference.group_advantages(
            scores, group_index, estimator=estimator, eps=eps, norm_by_std=norm_by_std
        )
    uniq, ids = torch.unique(group_index, return_inverse=True)  # dense ids in [0, G)
    return kernel(name, b)(scores, ids, uniq.numel(), estimator, eps, norm_by_std)


# ------------------------------------------------------------------ fake kernels (C++ ops)
register_fake_cpp(
    "group_advantages",
    lambda scores, ids, num_groups, est, eps, norm: scores.new_empty(
        scores.shape, dtype=acc_dtype(scores)
    ),
)
register_fake_cpp(
    "group_advantages_backward",
    lambda grad, scores, ids, num_groups, est, eps, norm: scores.new_empty(scores.shape),
)

# ------------------------------------------------------------------------------- autograd
# scores only (group ids are not differentiable)
register_first_input_autograd("group_advantages", 2, save_output=False)
