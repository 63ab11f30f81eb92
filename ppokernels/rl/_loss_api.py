"""The loss API of issue 29 (``ppokernels.losses``: vocabularies and typed loss specs), or, until
it is on this branch, a stand-in that lowers a spec to ``ppo_policy_loss``'s flat keywords.

Everything in :mod:`ppokernels.rl` reaches the policy loss through :func:`loss_kwargs`: with the
spec API it is ``{"loss": spec}``; the stand-in returns the flat keywords. Once
``ppokernels.losses`` is everywhere this module goes and the callers pass ``loss=spec``.
"""

from __future__ import annotations

import inspect

from ppokernels import ppo_policy_loss

if "loss" in inspect.signature(ppo_policy_loss).parameters:
    from ppokernels.losses import AGG_MODES, KL_ESTIMATORS, LOSS_MODES, loss_spec

    def loss_kwargs(spec) -> dict:
        return {"loss": spec}

else:  # the flat keywords of ppo_policy_loss before the loss specs
    import dataclasses

    from ppokernels.ops.ppo_loss import KL_ESTIMATORS, LOSS_MODES
    from ppokernels.reference import AGG_MODES

    # the fields of each mode's spec (ppokernels.losses), with the stand-in's own defaults
    _FIELDS = {
        "vanilla": ("clip_low", "clip_high", "dual_clip"),
        "gspo": ("clip_low", "clip_high", "dual_clip", "seq_logratio_max"),
        "sapo": ("tau_pos", "tau_neg"),
        "cispo": ("clip_low", "clip_high", "ratio_cap"),
        "gpg": (),
        "geo_mean": ("clip_low", "clip_high"),
        "dppo_tv": ("clip_low", "clip_high", "ratio_cap"),
        "dppo_kl": ("clip_low", "clip_high", "ratio_cap"),
        "dro": ("beta",),
        "vespo": ("k_pos", "lambda_pos", "k_neg", "lambda_neg"),
    }

    @dataclasses.dataclass(frozen=True)
    class _Spec:
        mode: str
        fields: tuple

    def loss_spec(mode: str, **fields):
        if mode not in _FIELDS:
            raise ValueError(f"loss: unknown loss mode {mode!r}; expected one of {LOSS_MODES}")
        unknown = sorted(set(fields) - set(_FIELDS[mode]))
        if unknown:
            raise ValueError(
                f"loss: {mode!r} has no field {unknown[0]!r}; its fields are "
                f"{sorted(_FIELDS[mode])}"
            )
        if mode == "dro" and fields.get("beta") is None:
            raise ValueError("loss: DRO ('dro'): missing required field 'beta'")
        spec = _Spec(mode, tuple(sorted(fields.items())))
        import torch

        z = torch.zeros(1, 1)  # the op checks every value: one token, before any training
        ppo_policy_loss(z, z, z, z, **loss_kwargs(spec), backend="reference")
        return spec

    def loss_kwargs(spec) -> dict:
        f = dict(spec.fields)
        out = {"loss_mode": spec.mode}
        for k in ("clip_low", "clip_high", "dual_clip", "seq_logratio_max", "tau_pos", "tau_neg"):
            if k in f:
                out[k] = f[k]
        if "ratio_cap" in f:
            out["ratio_cap"] = f["ratio_cap"]
        if "beta" in f:
            out["dro_beta"] = f["beta"]
        if spec.mode == "vespo":
            out["vespo_k"] = (f.get("k_pos", 2.0), f.get("k_neg", 3.0))
            out["vespo_lambda"] = (f.get("lambda_pos", 3.0), f.get("lambda_neg", 2.0))
        return out


__all__ = ["AGG_MODES", "KL_ESTIMATORS", "LOSS_MODES", "loss_kwargs", "loss_spec"]
