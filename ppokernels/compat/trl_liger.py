"""Drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss``, its ``LigerFusedLinearGRPOFunction``
and the functional ``liger_fused_linear_grpo`` (liger-kernel 0.8.5,
``liger_kernel/chunked_loss/grpo_loss.py`` on ``fused_linear_ppo.py``'s chunk loop), computed with
:func:`ppokernels.linear_ppo_policy_loss`: the lm_head, the log-probs and the GRPO loss in one
chunked pass, three GEMMs per token and no ``[B T, V]`` logits.

Same constructor, ``forward`` signature, defaults and return value ``(loss, metrics)``: metrics is
``(mean KL, clip ratio)`` when ``beta != 0``, else ``(clip ratio,)``, both masked means over the
local batch, ``sum(x m) / max(sum(m), 1)``. Liger's semantics, kept here:

- per token ``log_ratio = lp - old`` (``old`` = the detached log-probs when
  ``old_per_token_logps`` is None, so the ratio is 1 with the gradient of ``lp``); sequence level
  (GSPO): the row's masked mean. grpo / bnpo / dr_grpo / dapo / luspo: ``-min(min(r, delta) A,
  clip(r, 1 - eps_low, 1 + eps_high) A)``; cispo: ``-sg(min(r, eps_high)) A lp``; sapo:
  ``-sigmoid(tau (r - 1)) 4 / tau A``; vespo: ``-phi A lp`` (TRL's gamma weight of the row's
  summed clamped log-ratio plus the summed clamped log of ``vllm_is_ratio``). Every type but
  vespo multiplies by ``vllm_is_ratio``; then ``+ beta k3(ref, lp)``, times the ratio when
  ``use_bias_correction_kl``. The KL is 0 unless ``use_ref_model`` (Liger ignores
  ``ref_per_token_logps`` otherwise); with ``ref_input`` the reference log-probs are
  :func:`ppokernels.linear_logprobs` of ``ref_input @ ref_weight.T + ref_bias`` under no_grad.
- normalisers: grpo / sapo mean of row means over B; bnpo token sum / max(N, 1); dr_grpo / (B
  max_completion_length); dapo / cispo / vespo / max(num_items_in_batch / world size, 1), or the
  all-reduced token count / world size when ``num_items_in_batch`` is None; luspo
  ``sum_{b,t} L n_b / (B T)`` over *every* position, padding included, when the per-token loss is
  ``[B, T]`` (token level, a KL term, a per-token ``vllm_is_ratio``): Liger's formula, which
  differs from TRL 1.16's masked ``(L m).sum(-1).mean()`` on padded rows.
- clip ratio: ``(r < 1 - eps_low, A < 0) or (r > 1 + eps_high, A > 0)``; cispo ``r > eps_high, A
  > 0``; sapo and vespo 0.

Differences, by design: ``compiled`` is accepted and ignored (nothing is compiled);
``chunk_size`` is accepted and ignored: Liger's counts sequences per chunk, ours chunks tokens
(:func:`ppokernels.ops.linear_ppo_policy_loss.default_chunk_size`). A valid token's label must be
in ``[0, V)`` (Liger returns ``-logsumexp`` for any other id) and the mask must be 0/1. The
loss is float32 (float64 for float64 inputs; Liger computes in float32 whatever the input).
What Liger refuses (an unknown loss type or level, a sequence-level cispo / sapo / vespo,
dr_grpo without max_completion_length, non-positive SAPO temperatures or delta) raises Liger's
own exception type and message; inputs Liger runs into garbage or a crash (a bad shape, a label
out of range, temperature 0) raise ValueError naming the class. Unsupported, raising
NotImplementedError: ``delta < 1 + epsilon_high`` (then the cap acts on positive advantages,
which no PPO clip expresses) and vespo rows whose ``vllm_is_ratio`` log-sum over the padding
leaves the per-token clamp range.

Cases the fused op cannot score take ``ppokernels.linear_logprobs`` + ``ppo_policy_loss`` (four
GEMMs): luspo with a ``[B, T]`` per-token loss, an IS-corrected KL, the KL of grpo / sapo (its
metric is a token mean, the op reports a row-mean aggregate), vespo with ``old = None``.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.distributed as dist

import ppokernels as ppk
from ppokernels.losses import CISPO, GPG, GSPO, SAPO, Clip, Vespo

TARGET_VERSION = "0.8.5"
NAME = "LigerFusedLinearGRPOLoss"
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO's clipped surrogate
_LOG_MIN = math.log(1e-8)  # VESPO's clamp of each log IS ratio: [log 1e-8, 20]


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Fused lm_head + GRPO loss, Liger-Kernel 0.8.5's interface (see the module docstring).

    ``forward(_input [B, T, H], lin_weight [V, H], selected_token_ids [B, T], attention_mask
    [B, T], advantages [B], bias [V] = None, ref_per_token_logps [B, T] = None,
    old_per_token_logps [B, T] = None, ref_input [B, T, H'] = None, ref_weight [V, H'] = None,
    ref_bias [V] = None, vllm_is_ratio [B, T] / [B, 1] / [B] = None, num_items_in_batch = None)``
    returns ``(loss, metrics)``; the loss is differentiable w.r.t. _input, lin_weight and bias."""

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ):
        super().__init__()
        for k, val in dict(locals()).items():  # every argument, as an attribute of that name
            if k not in ("self", "__class__"):
                setattr(self, k, val)
        # Liger's own checks and messages (LigerFusedLinearGRPOLoss.__init__)
        for arg in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if getattr(self, arg) <= 0:
                raise ValueError(f"{arg} must be positive, got {getattr(self, arg)}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        B, T = self._check_options(_input, attention_mask)
        m = _check_rows(_input, selected_token_ids, attention_mask, advantages)
        v = _vllm_2d(vllm_is_ratio, B, T)
        lt, seq = self.loss_type, self.importance_sampling_level == "sequence"
        if self.use_ref_model:
            if ref_per_token_logps is None and ref_input is None:
                raise ValueError(
                    f"{NAME}: use_ref_model=True needs ref_per_token_logps or ref_input"
                )
            if ref_per_token_logps is not None and ref_input is not None:
                warnings.warn(
                    f"{NAME}: both ref_per_token_logps and ref_input are given; using "
                    "ref_per_token_logps",
                    stacklevel=2,
                )
        kl_on = self.beta != 0.0 and self.use_ref_model  # else Liger's KL is k3(sg(lp), lp) = 0
        # luspo: Liger sums L n_b over every position when its per-token loss is [B, T]
        all_pos = lt == "luspo" and (not seq or kl_on)
        explicit = (
            all_pos
            or (kl_on and (self.use_bias_correction_kl or lt in ("grpo", "sapo")))
            or (old_per_token_logps is None and lt == "vespo")
        )
        where = torch.ones_like(m) if all_pos else m  # positions whose log-prob is needed
        _check_labels(selected_token_ids, where, lin_weight.shape[0])
        y = selected_token_ids.masked_fill(~where, -100)
        ref = None
        if kl_on:
            ref = self._reference(ref_per_token_logps, ref_input, ref_weight, ref_bias, y)
        n = m.sum(-1).to(torch.float32)
        w = _weights(lt, seq, v, m, n)
        agg, div = self._aggregation(m, B, T, num_items_in_batch)
        args = (_input, lin_weight, y, m, advantages, bias, old_per_token_logps, ref, w, agg, div)
        loss, kl, clip = (self._explicit if explicit else self._fused)(*args)
        if self.beta == 0.0:
            return loss, (clip,)
        return loss, (torch.zeros_like(clip) if kl is None else kl, clip)

    # ------------------------------------------------------------------ the two paths
    def _fused(self, h, W, y, m, adv, bias, old, ref, w, agg, div):
        mode, kl = self._mode(), {}
        if ref is not None:
            kl = dict(ref_logprobs=ref, kl_coef=float(self.beta), kl_estimator="k3")
        zeros = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
        probe = None
        if old is None:
            # Liger's ratio is exp(lp - sg(lp)): 1, with the gradient of lp. Every surrogate here
            # then has gpg's gradient (-A w d lp; cispo's weight is min(1, eps_high)) and a value
            # free of lp: ppo_policy_loss of zero log-probs gives that value and the clip flags
            with torch.no_grad():
                probe = ppk.ppo_policy_loss(zeros, zeros, adv, m, **mode, **agg, is_weights=w)
            if self.loss_type == "cispo":
                w = (torch.ones_like(adv, dtype=torch.float32) if w is None else w) * min(
                    1.0, float(self.epsilon_high)
                )
            mode, old = dict(loss=GPG()), zeros
        out = ppk.linear_ppo_policy_loss(
            h,
            W,
            y,
            old,
            adv,
            m,
            bias=bias,
            is_weights=w,
            temperature=float(self.temperature),
            **mode,
            **agg,
            **kl,
        )
        loss = out.loss
        if probe is not None and self.loss_type != "cispo":  # cispo's gpg value is exact
            gpg_value = loss.detach() - (kl["kl_coef"] * out.kl if kl else 0.0)
            loss = loss + (probe.loss - gpg_value)
        # out.kl: a token sum here (the KL takes this path only under token-sum aggregations)
        kl_mean = None if ref is None else out.kl / m.sum().clamp(min=1)
        return loss / div, kl_mean, self._clip(out if probe is None else probe)

    def _explicit(self, h, W, y, m, adv, bias, old, ref, w, agg, div):
        lp = ppk.linear_logprobs(h, W, y, bias=bias, temperature=float(self.temperature))[0]
        old = lp.detach() if old is None else old
        lt, mode = self.loss_type, self._mode()
        token_luspo = lt == "luspo" and self.importance_sampling_level == "token"
        pm = torch.ones_like(m) if token_luspo else m  # luspo token level: every position
        kl = extra = None
        if ref is not None:
            kl = ppk.kl_penalty(lp, ref, estimator="k3")
            if self.use_bias_correction_kl:
                lr = lp - old
                if self.importance_sampling_level == "sequence":  # the row's masked mean, [B, 1]
                    lr = torch.where(m, lr, 0.0).sum(-1, keepdim=True) / m.sum(
                        -1, keepdim=True
                    ).clamp(min=1)
                kl = kl * torch.exp(lr)
            if lt != "luspo":
                # the entropy input is aggregated exactly like the policy term, so it carries the
                # KL with Liger's normaliser: "- entropy_coef * entropy" = + beta * KL
                extra = dict(entropy=kl, entropy_coef=-float(self.beta))
        out = ppk.ppo_policy_loss(lp, old, adv, pm, **mode, **agg, is_weights=w, **(extra or {}))
        loss = out.loss / div
        if kl is not None and lt == "luspo":
            # Liger's luspo KL: sum over every position (padding included) of kl n_b / (B T); no
            # ppokernels aggregation weights rows by n_b over unmasked positions
            B, T = m.shape
            loss = loss + self.beta * (kl * m.sum(-1, keepdim=True)).sum() / (B * T)
        kl_mean = None
        if kl is not None:
            kl_mean = torch.where(m.any(), ppk.masked_mean(kl.detach(), m), 0.0)
        if token_luspo:  # the flags over the attention mask only
            with torch.no_grad():
                out = ppk.ppo_policy_loss(lp.detach(), old, adv, m, **mode)
        return loss, kl_mean, self._clip(out)

    # ------------------------------------------------------------------ options
    def _mode(self) -> dict:
        """ppo_policy_loss's surrogate options for this loss type (no log-ratio clamp but
        VESPO's, as Liger)."""
        lt = self.loss_type
        if lt in CLIPPED:
            spec = GSPO if self.importance_sampling_level == "sequence" else Clip
            # eps_low > 1 is a negative lower bound: for r > 0 the same as the op's bound 0
            low, high = min(float(self.epsilon_low), 1.0), float(self.epsilon_high)
            return dict(loss=spec(low, high, dual_clip=self.delta), logratio_clamp=None)
        if lt == "cispo":
            return dict(loss=CISPO(ratio_cap=float(self.epsilon_high)), logratio_clamp=None)
        if lt == "sapo":
            tau = float(self.sapo_temperature_pos), float(self.sapo_temperature_neg)
            return dict(loss=SAPO(*tau), logratio_clamp=None)
        k_lam = (self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg)
        return dict(loss=Vespo(*map(float, k_lam)), logratio_clamp=20.0)

    def _aggregation(self, m, B, T, num_items):
        """``(agg options, divisor)``: the op's aggregation and what its result is divided by."""
        lt = self.loss_type
        if lt in ("grpo", "sapo"):
            return dict(agg="seq-mean-token-mean", num_seqs=float(B)), 1.0
        if lt == "luspo":
            if self.importance_sampling_level == "token":
                return dict(agg="token-sum"), float(B * T)  # the row weights n_b are in w
            return dict(agg="seq-mean-token-sum", num_seqs=float(B)), 1.0
        if lt == "bnpo":
            return dict(agg="token-sum"), m.sum().to(torch.float32).clamp(min=1.0)
        if lt == "dr_grpo":
            return dict(agg="token-sum"), float(B * self.max_completion_length)
        return dict(agg="token-sum"), dapo_normalizer(m, num_items)

    def _reference(self, ref_lp, ref_input, ref_weight, ref_bias, y):
        if ref_lp is not None:
            if ref_lp.shape != y.shape:
                raise ValueError(
                    f"{NAME}: ref_per_token_logps has shape {tuple(ref_lp.shape)}, "
                    f"expected {tuple(y.shape)}"
                )
            return ref_lp
        if ref_weight is None:
            raise ValueError(f"{NAME}: ref_input needs ref_weight")
        with torch.no_grad():
            return ppk.linear_logprobs(
                ref_input, ref_weight, y, bias=ref_bias, temperature=float(self.temperature)
            )[0]

    def _clip(self, out):
        if self.loss_type in CLIPPED:
            return out.clipfrac  # clipped > unclipped: Liger's two one-sided flags
        if self.loss_type == "cispo":
            return out.dual_clipfrac  # r > eps_high with A > 0
        return torch.zeros_like(out.clipfrac)

    def _check_options(self, h, mask):
        lt, level = self.loss_type, self.importance_sampling_level
        # what Liger refuses, with its exception types and messages (grpo_loss.py: the Function's
        # forward, ppo_loss_fn; fused_linear_ppo.py asserts dr_grpo's max_completion_length)
        if level == "sequence" and lt in ("cispo", "sapo", "vespo"):
            raise ValueError(
                f"Sequence-level importance sampling is not supported for loss_type='{lt}'. "
                "Use importance_sampling_level='token' instead."
            )
        if lt == "dr_grpo" and self.max_completion_length is None:
            raise AssertionError("max_completion_length must be provided for loss_type 'dr_grpo'")
        if level not in ("token", "sequence"):
            raise ValueError(
                f"Unknown importance sampling level: {level}. Possible values are 'token' and "
                "'sequence'."
            )
        if lt not in LOSS_TYPES:
            raise ValueError(f"Unknown loss type: {lt}")
        strict = ("temperature", "epsilon_high") if lt == "cispo" else ("temperature",)
        for arg in ("epsilon_low", "epsilon_high", "temperature"):
            val = getattr(self, arg)
            if not (val > 0 if arg in strict else val >= 0):
                sign = "> 0" if arg in strict else ">= 0"
                raise ValueError(f"{NAME}: {arg} must be {sign}, got {val}")
        if lt in CLIPPED and self.delta is not None and self.delta < 1 + self.epsilon_high:
            raise NotImplementedError(f"{NAME}: delta = {self.delta} below 1 + epsilon_high")
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise ValueError(
                f"{NAME}: _input must be a [B, T, H] tensor, got {tuple(getattr(h, 'shape', ()))}"
            )
        return h.shape[0], h.shape[1]


class LigerFusedLinearGRPOFunction:
    """Drop-in for Liger's ``LigerFusedLinearGRPOFunction`` (the ``autograd.Function`` under the
    module, and through ``.apply`` the functional ``liger_fused_linear_grpo``): ``apply`` takes
    Liger's arguments in Liger's order with its defaults and returns ``(loss, metrics)`` as the
    module does; the loss is differentiable w.r.t. _input, weight and bias.

    The Function skips the module's constructor checks, as Liger's does: its SAPO temperatures
    are checked only where ``loss_type="sapo"`` reads them, with Liger's ``sapo_loss_fn``
    message."""

    @staticmethod
    def apply(
        _input,
        weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        beta=0.04,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="dapo",
        max_completion_length=None,
        importance_sampling_level="token",
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        temperature=1.0,
        compiled=True,
        use_ref_model=True,
        chunk_size=1,
        vllm_is_ratio=None,
        delta=None,
        use_bias_correction_kl=False,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        num_items_in_batch=None,
    ):
        if loss_type == "sapo" and min(sapo_temperature_pos, sapo_temperature_neg) <= 0:
            raise ValueError("sapo_temperature must be > 0.")
        module = LigerFusedLinearGRPOLoss.__new__(LigerFusedLinearGRPOLoss)
        torch.nn.Module.__init__(module)
        options = dict(locals())
        for key in inspect.signature(LigerFusedLinearGRPOLoss).parameters:
            setattr(module, key, options[key])
        return module(
            _input,
            weight,
            selected_token_ids,
            attention_mask,
            advantages,
            bias,
            ref_per_token_logps,
            old_per_token_logps,
            ref_input,
            ref_weight,
            ref_bias,
            vllm_is_ratio,
            num_items_in_batch,
        )


# Liger's functional name (liger_kernel.chunked_loss.functional)
liger_fused_linear_grpo = LigerFusedLinearGRPOFunction.apply


def dapo_normalizer(mask: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Liger's dapo / cispo / vespo divisor (``LigerFusedLinearPPOBase._compute_dapo_normalizer``):
    ``max(num_items_in_batch / world_size, 1)``, or without it the token count all-reduced over
    the default process group, over world_size (float32 0-d)."""
    init = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if init else 1
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            n = num_items_in_batch.to(device=mask.device, dtype=torch.float32)
        else:
            n = torch.tensor(float(num_items_in_batch), device=mask.device)
    else:
        n = mask.to(torch.float32).sum()
        if init:
            dist.all_reduce(n, op=dist.ReduceOp.SUM)
    return (n / world).clamp(min=1.0)


def _check_rows(h, y, mask, adv) -> torch.Tensor:
    """Shapes of the [B, T] inputs; returns the mask as bool."""
    B, T = h.shape[:2]
    for arg, t in (("selected_token_ids", y), ("attention_mask", mask)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T):
            raise ValueError(
                f"{NAME}: {arg} must be [B, T] = {(B, T)} like _input, got "
                f"{tuple(getattr(t, 'shape', ()))}"
            )
    if not isinstance(adv, torch.Tensor) or tuple(adv.shape) != (B,):
        raise ValueError(
            f"{NAME}: advantages must be [B] = ({B},), one per sequence, got "
            f"{tuple(getattr(adv, 'shape', ()))}"
        )
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise NotImplementedError(f"{NAME}: attention_mask with weights other than 0 and 1")
        mask = mask != 0
    return mask


def _check_labels(y, where, V) -> None:
    bad = where & ((y < 0) | (y >= V))
    if bool(bad.any()):
        raise ValueError(
            f"{NAME}: selected_token_ids must be in [0, {V}) where scored, got {int(y[bad][0])}"
        )


def _vllm_2d(v, B, T):
    """vllm_is_ratio as [B, T] or [B, 1] (a [B] one is per sequence)."""
    if v is None:
        return None
    if v.dim() == 1 and v.shape[0] == B:
        return v[:, None]
    if v.dim() == 2 and v.shape[0] == B and v.shape[1] in (1, T):
        return v
    raise ValueError(
        f"{NAME}: vllm_is_ratio must be [B], [B, 1] or [B, T] with B, T = {B, T}, "
        f"got {tuple(v.shape)}"
    )


def _weights(lt, seq, v, m, n):
    """ppo_policy_loss's is_weights ([B] or [B, T]) that reproduce Liger's use of vllm_is_ratio
    (and luspo's row weights)."""
    if lt == "vespo":
        if v is None:
            return None
        # Liger's phi adds sum_t clamp(log v) over every column (padding too); the op adds the
        # clamped log of each valid token's weight, so each of the n_b tokens gets 1 / n_b of it
        total = torch.log(v).clamp(_LOG_MIN, 20.0).sum(-1)
        per = torch.where(n > 0, total / n.clamp(min=1), 0.0)
        if bool(((per < _LOG_MIN - 1e-4) | (per > 20.0 + 1e-4)).any()):
            raise NotImplementedError(
                f"{NAME}: loss_type='vespo' with vllm_is_ratio whose log-sum "
                "over a row's padding leaves [log 1e-8, 20] per token"
            )
        return per.exp()
    if lt == "luspo":
        if seq:  # a [B, 1] loss times v, summed over v's columns / their count: the row mean
            return None if v is None else v.mean(-1)
        w = n[:, None] if v is None else n[:, None] * v  # token level: every position, times n_b
        return w[:, 0] if w.shape[1] == 1 else w
    if v is None or v.shape[1] == 1:
        return None if v is None else v[:, 0]
    if seq:  # Liger's [B, 1] loss times v: a token's gradient is the row's masked mean weight
        return torch.where(m, v, 0.0).sum(-1) / n.clamp(min=1)
    return v
