"""Loss modes of ``ppo_policy_loss``: argument checks and the mode string the kernels read.

The torch ops take the mode as one string argument (the schema's ``ratio_level``):
``"<mode>"`` or ``"<mode>:<p0>,<p1>,..."`` with the mode's parameters written by ``repr`` (which
C++ ``strtod`` and Python ``float`` read back exactly). ``"token"`` / ``"sequence"`` (the former
ratio levels) still mean vanilla / gspo without a sequence clamp. Parameters per mode:

- gspo: the clamp of the sequence log-ratio (veRL: 10; inf for none)
- sapo: tau_pos, tau_neg
- cispo: the clip bounds of the ratio (veRL: 1 - clip_low, 1 + clip_high; TRL: -inf, epsilon_high)
- dppo_tv / dppo_kl: the truncation cap of the ratio (veRL's clip_ratio_c)
- dro: beta
- vespo: k_pos, lambda_pos, k_neg, lambda_neg
"""

from __future__ import annotations

import math

from ppokernels.ops import _checks
from ppokernels.reference.ppo_loss import LOSS_MODES

__all__ = ["LOSS_MODES", "mode_spec"]

# modes whose ratio clip is the PPO range [1 - clip_low, 1 + clip_high] (clip_low < 1)
_PPO_RANGE = ("vanilla", "gspo")


def _pair(name: str, arg: str, v) -> tuple[float, float]:
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise ValueError(f"{name}: {arg} must be a pair (positive-advantage, negative-advantage)")
    return _checks.number(name, f"{arg}[0]", v[0]), _checks.number(name, f"{arg}[1]", v[1])


def mode_spec(name: str, loss_mode, *, clip_low, clip_high, dual_clip, opts: dict) -> str:
    """Checks the mode-specific options and returns the op's mode string.

    opts: tau_pos, tau_neg, ratio_cap, seq_logratio_max, dro_beta, vespo_k, vespo_lambda.
    """
    _checks.choice(name, "loss_mode", loss_mode, LOSS_MODES)
    if loss_mode in _PPO_RANGE or (loss_mode == "cispo" and opts["ratio_cap"] is None):
        if not clip_low <= 1.0:  # 1: the lower bound 0, i.e. no lower clip
            raise ValueError(f"{name}: clip_low must be in [0, 1], got {clip_low}")
    if dual_clip is not None and loss_mode not in _PPO_RANGE:
        raise ValueError(f"{name}: dual_clip applies to loss_mode 'vanilla' and 'gspo' only")
    cap = _checks.positive(name, "ratio_cap", opts["ratio_cap"], allow_none=True)
    if cap is not None and loss_mode not in ("cispo", "dppo_tv", "dppo_kl"):
        raise ValueError(f"{name}: ratio_cap applies to loss_mode 'cispo' and 'dppo_*' only")
    smax = opts["seq_logratio_max"]
    if smax is not None:
        smax = _checks.number(name, "seq_logratio_max", smax)
        if loss_mode != "gspo":
            raise ValueError(f"{name}: seq_logratio_max applies to loss_mode 'gspo' only")
    beta = _checks.positive(name, "dro_beta", opts["dro_beta"], allow_none=True)
    if loss_mode == "dro" and beta is None:
        raise ValueError(f"{name}: loss_mode 'dro' needs dro_beta > 0")
    params: tuple = ()
    if loss_mode == "gspo":
        params = (math.inf if smax is None else smax,)
    elif loss_mode == "sapo":
        params = (
            _checks.positive(name, "tau_pos", opts["tau_pos"]),
            _checks.positive(name, "tau_neg", opts["tau_neg"]),
        )
    elif loss_mode == "cispo":
        params = (-math.inf, cap) if cap is not None else (1 - clip_low, 1 + clip_high)
    elif loss_mode in ("dppo_tv", "dppo_kl"):
        params = (20.0 if cap is None else cap,)
    elif loss_mode == "dro":
        params = (beta,)
    elif loss_mode == "vespo":
        k = _pair(name, "vespo_k", opts["vespo_k"])
        lam = _pair(name, "vespo_lambda", opts["vespo_lambda"])
        params = (k[0], lam[0], k[1], lam[1])
    if not params:
        return loss_mode
    return loss_mode + ":" + ",".join(repr(float(p)) for p in params)
