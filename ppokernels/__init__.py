"""ppokernels: fused kernels for the token-level arithmetic of PPO-style RL on language models.

Every op is a registered torch op (``torch.ops.ppokernels.*``) with CPU C++, CUDA C++ and Triton
kernels and a plain-PyTorch reference (:mod:`ppokernels.reference`). Public functions take tensors
first, everything else keyword-only, and ``backend="auto" | "cpp" | "triton" | "reference"``.
"""

from ppokernels._backend import BackendUnavailable, info
from ppokernels.ops.gae import discounted_returns, gae
from ppokernels.ops.group_advantages import group_advantages
from ppokernels.ops.kl_penalty import kl_penalty
from ppokernels.ops.linear_logprobs import linear_logprobs
from ppokernels.ops.linear_ppo_policy_loss import linear_ppo_policy_loss
from ppokernels.ops.masked_whiten import masked_mean, masked_var, masked_whiten
from ppokernels.ops.ppo_policy_loss import PolicyLossOutput, ppo_policy_loss
from ppokernels.ops.rollout_correction import RolloutCorrectionOutput, rollout_correction
from ppokernels.ops.token_logprobs import token_logprobs
from ppokernels.ops.value_loss import ValueLossOutput, value_loss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "info",
    "kl_penalty",
    "discounted_returns",
    "gae",
    "group_advantages",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "token_logprobs",
    "linear_logprobs",
    "linear_ppo_policy_loss",
    "PolicyLossOutput",
    "ValueLossOutput",
    "ppo_policy_loss",
    "value_loss",
    "RolloutCorrectionOutput",
    "rollout_correction",
]
