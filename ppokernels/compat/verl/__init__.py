"""Drop-in replacements for veRL's PPO/GRPO arithmetic, targeting **verl 0.9.1** (PyPI).

Same names, signatures, values, gradients and output dtypes as ``verl.trainer.ppo.core_algos``,
``verl.utils.torch_functional``, ``verl.utils.kernel.linear_cross_entropy`` and
``verl.utils.experimental.torch_functional`` of that release, computed with ppokernels ops
(one fused scan for GAE instead of a Python loop over tokens, grouped statistics instead of a loop
over the batch, fused clipped loss, online-softmax log-probs without ``[N, V]`` temporaries).
Masks are 0/1 (``response_mask``); entries where the mask is 0 may hold anything.

Switch on in every process that computes losses (driver and Ray workers)::

    import ppokernels.compat.verl as ppk_verl
    ppk_verl.patch()          # ppk_verl.unpatch() restores veRL's functions

With veRL's launcher, ``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=
ppokernels.compat.verl.patch`` runs it in each Ray worker (see docs/compat.md).

Differences in how (not what) things are computed: log-probs are fp32 whatever the logits dtype
(veRL's flash-attn path; its pure-torch fallback returns bf16 for bf16 logits), entropies are
computed in fp32 and returned in veRL's dtype, and errors veRL raises (``masked_var`` on fewer
than two valid tokens, ``dp_size > 1`` without global counts) are raised the same way.
"""

from __future__ import annotations

import ppokernels as ppk  # noqa: F401  (tests check ppk.<op> through this module)
from ppokernels.compat import Patcher
from ppokernels.compat.verl.advantages import (  # noqa: F401
    ESTIMATORS,
    compute_gdpo_outcome_advantage,
    compute_gpg_outcome_advantage,
    compute_grpo_passk_outcome_advantage,
    compute_grpo_vectorized_outcome_advantage,
    compute_multi_turn_optimal_token_baseline_advantage,
    compute_opo_outcome_advantage,
    compute_optimal_token_baseline_advantage,
    compute_reinforce_plus_plus_baseline_outcome_advantage,
    compute_remax_outcome_advantage,
    compute_rloo_vectorized_outcome_advantage,
)
from ppokernels.compat.verl.core_algos import (  # noqa: F401
    agg_loss,
    compute_entropy_loss,
    compute_gae_advantage_return,
    compute_grpo_outcome_advantage,
    compute_policy_loss,
    compute_policy_loss_vanilla,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_rloo_outcome_advantage,
    compute_value_loss,
    kl_penalty,
)
from ppokernels.compat.verl.kernel import FusedLinearForPPO, linear_cross_entropy  # noqa: F401
from ppokernels.compat.verl.policy_losses import (  # noqa: F401
    POLICY_LOSSES,
    compute_policy_loss_bypass_mode,
    compute_policy_loss_cispo,
    compute_policy_loss_clip_cov,
    compute_policy_loss_dppo_kl,
    compute_policy_loss_dppo_tv,
    compute_policy_loss_dro,
    compute_policy_loss_geo_mean,
    compute_policy_loss_gpg,
    compute_policy_loss_gspo,
    compute_policy_loss_kl_cov,
    compute_policy_loss_sapo,
)
from ppokernels.compat.verl.rollout_corr import (  # noqa: F401
    compute_offpolicy_metrics,
    compute_rollout_corr_metrics_from_logprobs,
    compute_rollout_correction_and_rejection_mask,
    compute_rollout_correction_weights,
    compute_rollout_rejection_mask,
)
from ppokernels.compat.verl.torch_functional import (  # noqa: F401
    entropy_from_logits,
    entropy_from_logits_with_chunking,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

TARGET_VERSION = "0.9.1"

_PATCHER = Patcher()
_CORE = (
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "agg_loss",
    "compute_value_loss",
    "kl_penalty",
    "compute_entropy_loss",
    *(fn.__name__ for fn in POLICY_LOSSES.values()),
    *(fn.__name__ for fn in ESTIMATORS.values()),
)
_ADV = {
    "gae": "compute_gae_advantage_return",
    "grpo": "compute_grpo_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
    "reinforce_plus_plus": "compute_reinforce_plus_plus_outcome_advantage",
}
_ROLLOUT_CORR = (
    "compute_rollout_correction_weights",
    "compute_rollout_rejection_mask",
    "compute_rollout_correction_and_rejection_mask",
    "compute_offpolicy_metrics",
    "compute_rollout_corr_metrics_from_logprobs",
)
_TF = (
    "logprobs_from_logits",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
)


def patch() -> None:
    """Install the replacements in veRL (idempotent): ``core_algos`` attributes (the trainer
    calls GAE/GRPO by attribute), the advantage-estimator registry (``_ADV`` and every estimator
    of ``ESTIMATORS``, the optimal-token-baseline ones included) and the policy-loss
    registry ("vanilla" and every mode of ``POLICY_LOSSES``, bypass_mode included),
    the ``torch_functional`` helpers, the fused linear log-prob and the rollout correction of
    ``rollout_corr_helper`` (weights, rejection mask, their combination, off-policy metrics);
    every veRL module that imported one of them by name is updated too."""
    if _PATCHER.active:
        return
    from verl.trainer.ppo import core_algos

    g = globals()
    for name in _CORE:
        _PATCHER.everywhere("verl", core_algos.__name__, name, g[name])
    for key, name in _ADV.items():
        _PATCHER.set(core_algos.ADV_ESTIMATOR_REGISTRY, key, g[name])
    for key, fn in ESTIMATORS.items():
        _PATCHER.set(core_algos.ADV_ESTIMATOR_REGISTRY, key, fn)
    _PATCHER.set(core_algos.POLICY_LOSS_REGISTRY, "vanilla", compute_policy_loss_vanilla)
    for key, fn in POLICY_LOSSES.items():
        _PATCHER.set(core_algos.POLICY_LOSS_REGISTRY, key, fn)
    for name in _TF:
        _PATCHER.everywhere("verl", "verl.utils.torch_functional", name, g[name])
    _PATCHER.everywhere(
        "verl",
        "verl.utils.kernel.linear_cross_entropy",
        "linear_cross_entropy",
        linear_cross_entropy,
    )
    _PATCHER.everywhere(
        "verl", "verl.utils.experimental.torch_functional", "FusedLinearForPPO", FusedLinearForPPO
    )
    for name in _ROLLOUT_CORR:
        _PATCHER.everywhere("verl", "verl.trainer.ppo.rollout_corr_helper", name, g[name])


def unpatch() -> None:
    """Restore every veRL attribute and registry entry :func:`patch` replaced."""
    _PATCHER.restore()
