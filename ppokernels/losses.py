"""The typed loss specs of ``ppo_policy_loss`` / ``linear_ppo_policy_loss``, and the vocabularies
of the loss head, each written once.

A loss spec says which surrogate the policy loss uses and carries that surrogate's parameters,
checked when the spec is made::

    from ppokernels import ppo_policy_loss
    from ppokernels.losses import SAPO, Clip

    out = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, loss=Clip(0.2, 0.28))
    out = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, loss=SAPO(1.0, 1.05))

Notation (per valid token): ``lp`` the policy's log-prob, ``old`` the behaviour log-prob,
``lr = clamp(lp - old, +-logratio_clamp)``, ``r = exp(lr)``, ``A`` the advantage, ``w`` the
importance weight (``is_weights``, 1 without), ``sg`` stop-gradient. Each spec's docstring gives
its token loss ``L``, where it comes from, and what the two flag metrics of the result
(``clipfrac``, ``dual_clipfrac``: masked means of per-token flags) count for it.

The torch ops take a spec as ``str loss_mode, float[] loss_params``: :attr:`LossSpec.mode` and
:meth:`LossSpec.params`, whose order is the spec's ``PARAMS``; the C++ kernels
(csrc/include/ppokernels/ppo_policy_loss_modes.h) and the Triton kernels (ppokernels/triton/) read
that layout, and tests/ops/test_losses.py fails when the C++ tables drift from the ones here.

This module imports nothing but the standard library: setup code, configs and the trainers'
drop-ins read it without torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "AGG_MODES",
    "CISPO",
    "DPPOKL",
    "DPPOTV",
    "DRO",
    "GPG",
    "GSPO",
    "KL_ESTIMATORS",
    "LOSS_MODES",
    "LOSS_SPECS",
    "SAPO",
    "Clip",
    "GeoMean",
    "LossSpec",
    "Vespo",
    "loss_spec",
]

# ---------------------------------------------------------------------------- vocabularies
#: How a per-token loss [B, T] becomes a scalar (veRL ``agg_loss``), with ``n`` valid tokens:
#: token-mean: sum / (num_tokens or n); token-sum: sum; seq-mean-token-mean: sum over rows of
#: the row's masked mean / (num_seqs or B); seq-mean-token-sum: sum of row sums / (num_seqs or B);
#: seq-mean-token-sum-norm: that / T. The index is the kernels' code.
AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)

#: Per-token estimators of KL(pi || pi_ref) from x = lp - ref_lp (Schulman 2020): k1 = x,
#: k2 = x^2 / 2, k3 = exp(-x) - 1 + x, abs = |x|; a trailing "+" (e.g. "k3+") keeps the value
#: and takes k2's gradient (veRL's straight-through "low_var_kl+" form). The index is the
#: kernels' code.
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _fail(spec: str, field: str, want: str, got) -> ValueError:
    return ValueError(f"{spec}: {field} must be {want}, got {got!r}")


def _real(spec: str, field: str, v, *, lo=None, lo_open=False, hi=None, allow_inf=False):
    """v as a float, checked: a real number (not bool), finite unless allow_inf, within bounds."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(spec, field, "a number", v)
    v = float(v)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise _fail(spec, field, "a finite number", v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise _fail(spec, field, f"{'>' if lo_open else '>='} {lo}", v)
    if hi is not None and v > hi:
        raise _fail(spec, field, f"<= {hi}", v)
    return v


# ------------------------------------------------------------------------------- the specs
@dataclass(frozen=True)
class LossSpec:
    """Base of the loss specs: a frozen dataclass whose fields are its surrogate's parameters."""

    #: the mode name the ops and the trainers' configs use (veRL's ``loss_mode``)
    mode: ClassVar[str]
    #: the names of :meth:`params`, in the order the kernels read them
    PARAMS: ClassVar[tuple[str, ...]] = ()
    #: whether a token's loss depends on its whole row (a sequence-level surrogate)
    row_level: ClassVar[bool] = False

    def params(self) -> tuple[float, ...]:
        """The op's ``loss_params``: the values named by ``PARAMS``."""
        return tuple(float(getattr(self, name)) for name in self.PARAMS)

    def _set(self, field: str, value) -> None:
        object.__setattr__(self, field, value)  # normalising a frozen field in __post_init__


class _PPORange(LossSpec):
    """The PPO clip range [1 - clip_low, 1 + clip_high] shared by Clip and GSPO."""

    def _check_range(self) -> None:
        name = type(self).__name__
        # clip_low = 1: the lower bound 0, i.e. no lower clip
        self._set("clip_low", _real(name, "clip_low", self.clip_low, lo=0.0, hi=1.0))
        high = self.clip_low if self.clip_high is None else self.clip_high
        self._set("clip_high", _real(name, "clip_high", high, lo=0.0))
        if self.dual_clip is not None:
            self._set("dual_clip", _real(name, "dual_clip", self.dual_clip, lo=1.0, lo_open=True))

    @property
    def dual(self) -> float:
        """The dual-clip constant, inf for none (its kernels' form: min(L, -A inf) is L)."""
        return math.inf if self.dual_clip is None else self.dual_clip


@dataclass(frozen=True)
class Clip(_PPORange):
    """PPO's clipped surrogate (Schulman et al. 2017; veRL ``compute_policy_loss_vanilla``,
    OpenRLHF ``PolicyLoss``, TRL ``loss_type="grpo"/"dapo"/"dr_grpo"/"bnpo"``), with the dual
    clip of Ye et al. 2019.

    ``L = w max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; with ``dual_clip = c > 1``,
    tokens with ``A < 0`` take ``min(L, -A c)``. ``clip_high`` None is ``clip_low``; DAPO's
    clip-higher is e.g. ``Clip(0.2, 0.28)``. ``clipfrac``: the clipped term is the larger;
    ``dual_clipfrac``: the dual clip is active (A < 0).
    """

    mode: ClassVar[str] = "vanilla"
    PARAMS: ClassVar[tuple[str, ...]] = ("clip_low", "clip_high", "dual")

    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None

    def __post_init__(self) -> None:
        self._check_range()


@dataclass(frozen=True)
class GSPO(_PPORange):
    """Group Sequence Policy Optimization (Zheng et al. 2025; veRL
    ``compute_policy_loss_gspo``): :class:`Clip`'s surrogate of the sequence ratio.

    ``s`` = the row's masked mean log-ratio, the ratio's value ``exp(min(s, seq_logratio_max))``
    and each token's gradient that of ``exp(lp - sg(lp) + sg(s))`` (zero where the clamp is
    active). veRL clamps ``s`` at 10; None is no clamp. Metrics as :class:`Clip`'s.
    """

    mode: ClassVar[str] = "gspo"
    PARAMS: ClassVar[tuple[str, ...]] = ("clip_low", "clip_high", "dual", "seq_max")
    row_level: ClassVar[bool] = True

    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    seq_logratio_max: float | None = None

    def __post_init__(self) -> None:
        self._check_range()
        if self.seq_logratio_max is not None:
            self._set("seq_logratio_max", _real("GSPO", "seq_logratio_max", self.seq_logratio_max))

    @property
    def seq_max(self) -> float:
        return math.inf if self.seq_logratio_max is None else self.seq_logratio_max


@dataclass(frozen=True)
class SAPO(LossSpec):
    """Soft Adaptive Policy Optimization (veRL ``compute_policy_loss_sapo``, TRL
    ``loss_type="sapo"``): a smooth gate in place of the clip.

    ``L = -w A sigmoid(tau (r - 1)) 4 / tau``, ``tau = tau_pos`` where ``A > 0`` else
    ``tau_neg`` (veRL's defaults 1.0 and 1.05). Both flag metrics are 0.
    """

    mode: ClassVar[str] = "sapo"
    PARAMS: ClassVar[tuple[str, ...]] = ("tau_pos", "tau_neg")

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self) -> None:
        for f in self.PARAMS:
            self._set(f, _real("SAPO", f, getattr(self, f), lo=0.0, lo_open=True))


@dataclass(frozen=True)
class CISPO(LossSpec):
    """Clipped IS-weight Policy Optimization (MiniMax-M1; veRL ``compute_policy_loss_cispo``,
    TRL ``loss_type="cispo"``): the clipped ratio as a detached weight of a REINFORCE term.

    ``L = -w sg(clip(r, lower, upper)) A lp`` with ``[lower, upper] = [1 - clip_low,
    1 + clip_high]`` (veRL), or ``[-inf, ratio_cap]`` when ``ratio_cap`` is given (TRL's
    ``epsilon_high`` form). ``clipfrac``: ``r != clip(r)``; ``dual_clipfrac``: ``r > upper``
    with ``A > 0``.
    """

    mode: ClassVar[str] = "cispo"
    PARAMS: ClassVar[tuple[str, ...]] = ("lower", "upper")

    clip_low: float = 0.2
    clip_high: float | None = None
    ratio_cap: float | None = None

    def __post_init__(self) -> None:
        high = self.clip_low if self.clip_high is None else self.clip_high
        if self.ratio_cap is None:
            self._set("clip_low", _real("CISPO", "clip_low", self.clip_low, lo=0.0, hi=1.0))
        else:
            self._set("clip_low", _real("CISPO", "clip_low", self.clip_low, lo=0.0))
            self._set(
                "ratio_cap", _real("CISPO", "ratio_cap", self.ratio_cap, lo=0.0, lo_open=True)
            )
        self._set("clip_high", _real("CISPO", "clip_high", high, lo=0.0))

    @property
    def lower(self) -> float:
        return -math.inf if self.ratio_cap is not None else 1.0 - self.clip_low

    @property
    def upper(self) -> float:
        return self.ratio_cap if self.ratio_cap is not None else 1.0 + self.clip_high


@dataclass(frozen=True)
class GPG(LossSpec):
    """Group Policy Gradient (Chu et al. 2025; veRL ``compute_policy_loss_gpg``): plain
    REINFORCE on the group advantage, ``L = -w A lp``. Both flag metrics are 0."""

    mode: ClassVar[str] = "gpg"


@dataclass(frozen=True)
class GeoMean(LossSpec):
    """Geometric-Mean Policy Optimization (GMPO, Zhao et al. 2025; veRL
    ``compute_policy_loss_geo_mean``): one loss per row from the geometric mean of its ratios.

    Per row ``-Abar exp(sum_t m dt / (n + 1e-8))``, ``dt`` the log-ratio clipped to
    ``clip_high`` where ``A > 0`` and to ``-clip_low`` where ``A < 0`` (0 where ``A = 0``),
    ``Abar`` the masked mean advantage, ``n`` the row's valid tokens; is_weights enter as their
    per-row geometric mean. Averaged over ``num_seqs`` or B rows whatever ``agg`` (``agg`` still
    aggregates the KL and entropy terms). ``clipfrac`` / ``dual_clipfrac``: the log-ratio outside
    ``[-clip_low, clip_high]`` with ``A > 0`` / with ``A < 0``.
    """

    mode: ClassVar[str] = "geo_mean"
    PARAMS: ClassVar[tuple[str, ...]] = ("clip_low", "clip_high")
    row_level: ClassVar[bool] = True

    clip_low: float = 0.2
    clip_high: float | None = None

    def __post_init__(self) -> None:
        high = self.clip_low if self.clip_high is None else self.clip_high
        self._set("clip_low", _real("GeoMean", "clip_low", self.clip_low, lo=0.0))
        self._set("clip_high", _real("GeoMean", "clip_high", high, lo=0.0))


class _DPPO(LossSpec):
    """The trust-region REINFORCE of DPPO (veRL ``compute_policy_loss_dppo_tv`` /
    ``compute_policy_loss_dppo_kl``), shared by DPPOTV and DPPOKL."""

    PARAMS: ClassVar[tuple[str, ...]] = ("clip_low", "clip_high", "ratio_cap")

    def __post_init__(self) -> None:
        name = type(self).__name__
        high = self.clip_low if self.clip_high is None else self.clip_high
        self._set("clip_low", _real(name, "clip_low", self.clip_low, lo=0.0))
        self._set("clip_high", _real(name, "clip_high", high, lo=0.0))
        self._set("ratio_cap", _real(name, "ratio_cap", self.ratio_cap, lo=0.0, lo_open=True))


@dataclass(frozen=True)
class DPPOTV(_DPPO):
    """DPPO with the total-variation trust region (veRL ``compute_policy_loss_dppo_tv``).

    ``L = -w A sg(min(r, ratio_cap)) lp valid`` (veRL's ``clip_ratio_c``, 20), ``valid``:
    ``p - p_old <= clip_high`` where ``A > 0``, ``p - p_old >= -clip_low`` elsewhere
    (``p = exp(lp)``). ``clipfrac``: outside the trust region; ``dual_clipfrac``:
    ``r > ratio_cap`` inside it.
    """

    mode: ClassVar[str] = "dppo_tv"

    clip_low: float = 0.2
    clip_high: float | None = None
    ratio_cap: float = 20.0


@dataclass(frozen=True)
class DPPOKL(_DPPO):
    """DPPO with the binary-KL trust region (veRL ``compute_policy_loss_dppo_kl``): as
    :class:`DPPOTV` with ``valid``: ``KL_bin(p_old || p) <= clip_high`` or ``p <= p_old`` where
    ``A > 0``, ``<= clip_low`` or ``p >= p_old`` elsewhere."""

    mode: ClassVar[str] = "dppo_kl"

    clip_low: float = 0.2
    clip_high: float | None = None
    ratio_cap: float = 20.0


@dataclass(frozen=True)
class DRO(LossSpec):
    """Direct Reward Optimisation's policy term (veRL ``compute_policy_loss_dro``):
    ``L = -w (lp A - beta lr^2 / 2)``; ``beta > 0`` has no default (veRL requires it). Both flag
    metrics are 0."""

    mode: ClassVar[str] = "dro"
    PARAMS: ClassVar[tuple[str, ...]] = ("beta",)

    beta: float

    def __post_init__(self) -> None:
        self._set("beta", _real("DRO", "beta", self.beta, lo=0.0, lo_open=True))


@dataclass(frozen=True)
class Vespo(LossSpec):
    """VESPO (TRL 1.16 ``loss_type="vespo"``): a gamma-shaped weight of the row's log-ratio.

    ``L = -phi A lp``, ``phi = sg(exp(lam + k log_w - lam exp(log_w)))`` (NaN / inf -> 0),
    ``log_w`` = the row's summed log-ratio plus its summed ``clamp(log w, log 1e-8, 20)``, clamped
    to ``[log 1e-8, 20]``; ``(k, lam) = (k_pos, lambda_pos)`` where ``A >= 0`` else
    ``(k_neg, lambda_neg)`` (TRL's defaults), ``lam`` at least 1e-4. is_weights enter ``log_w``
    only; they do not scale the loss. ``clipfrac``: the mean phi; ``dual_clipfrac``: 0.
    """

    mode: ClassVar[str] = "vespo"
    PARAMS: ClassVar[tuple[str, ...]] = ("k_pos", "lambda_pos", "k_neg", "lambda_neg")
    row_level: ClassVar[bool] = True

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        for f in self.PARAMS:
            self._set(f, _real("Vespo", f, getattr(self, f)))


#: mode name -> spec class, in the kernels' mode-code order
LOSS_SPECS: dict[str, type[LossSpec]] = {
    c.mode: c for c in (Clip, GSPO, SAPO, CISPO, GPG, GeoMean, DPPOTV, DPPOKL, DRO, Vespo)
}
#: the policy-loss modes (veRL's names); the index is the kernels' code
LOSS_MODES = tuple(LOSS_SPECS)


def loss_spec(mode: str | LossSpec, **fields) -> LossSpec:
    """The spec of a mode name with the given fields (a spec passes through unchanged), for
    configs and command lines: ``loss_spec("sapo", tau_pos=1.0)`` is ``SAPO(tau_pos=1.0)``."""
    if isinstance(mode, LossSpec):
        if fields:
            return dataclasses.replace(mode, **fields)
        return mode
    if mode not in LOSS_SPECS:
        raise ValueError(f"loss: unknown loss mode {mode!r}; expected one of {LOSS_MODES}")
    cls = LOSS_SPECS[mode]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"loss: {cls.__name__} ({mode!r}) has no field {unknown[0]!r}; its fields are "
            f"{sorted(known)}"
        )
    try:
        return cls(**fields)
    except TypeError as e:  # a required field (DRO's beta) is missing
        raise ValueError(f"loss: {cls.__name__} ({mode!r}): {e}") from None
