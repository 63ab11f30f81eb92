"""Plain-PyTorch definitions of every ppokernels op: the specification the kernels are tested
against, readable first, one module per stem. Each function computes in float32, or float64 for
float64 inputs, and is differentiable by autograd. Names follow the RL literature (cleanrl, the
PPO-RLHF papers); the trainers' own formulas are in ``docs/semantics.md``.
"""

from ppokernels.reference.agg import agg_loss
from ppokernels.reference.gae import discounted_returns, gae
from ppokernels.reference.group_advantages import group_advantages
from ppokernels.reference.kl_penalty import kl_penalty
from ppokernels.reference.linear_logprobs import linear_logprobs, linear_logprobs_stats
from ppokernels.reference.linear_ppo_policy_loss import linear_ppo_policy_loss
from ppokernels.reference.masked_whiten import masked_mean, masked_var, masked_whiten
from ppokernels.reference.ppo_policy_loss import PolicyLossOutput, ppo_policy_loss
from ppokernels.reference.rollout_correction import RolloutCorrectionOutput, rollout_correction
from ppokernels.reference.token_logprobs import token_logprobs
from ppokernels.reference.value_loss import ValueLossOutput, value_loss

__all__ = [
    "PolicyLossOutput",
    "ValueLossOutput",
    "agg_loss",
    "discounted_returns",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "linear_logprobs_stats",
    "linear_ppo_policy_loss",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "RolloutCorrectionOutput",
    "rollout_correction",
    "token_logprobs",
    "value_loss",
]
