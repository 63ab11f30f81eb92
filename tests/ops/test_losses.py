"""ppokernels.losses: the loss specs validate their fields, map onto the ops' ``loss_params``,
and the vocabularies the C++ kernels carry are the Python tables (read from the headers)."""

import dataclasses
import math
import re
from pathlib import Path

import pytest

from ppokernels import losses
from ppokernels.losses import (
    CISPO,
    DPPOKL,
    DPPOTV,
    DRO,
    GPG,
    GSPO,
    SAPO,
    Clip,
    GeoMean,
    Vespo,
    loss_spec,
)

HEADERS = Path(__file__).resolve().parents[2] / "csrc" / "include" / "ppokernels"


def _cpp_array(header: str, name: str) -> list[str]:
    """The initialiser list of ``constexpr ... name[...] = {...};`` in a header, as tokens."""
    text = (HEADERS / header).read_text()
    m = re.search(rf"{name}\[[^\]]*\]\s*=\s*\{{([^}}]*)\}}", text)
    assert m, f"{name} not found in {header}"
    return [t.strip().strip('"') for t in m.group(1).split(",") if t.strip()]


def test_cpp_tables_are_the_python_vocabularies():
    assert tuple(_cpp_array("ppo_policy_loss_modes.h", "kPolicyModeNames")) == losses.LOSS_MODES
    counts = [int(x) for x in _cpp_array("ppo_policy_loss_modes.h", "kPolicyModeParams")]
    assert counts == [len(c.PARAMS) for c in losses.LOSS_SPECS.values()]
    assert tuple(_cpp_array("agg.h", "kAggModeNames")) == losses.AGG_MODES
    assert tuple(_cpp_array("kl_penalty.h", "kKLEstimatorNames")) == losses.KL_ESTIMATORS


def test_params_follow_the_documented_layout():
    inf = math.inf
    assert Clip().params() == (0.2, 0.2, inf)
    assert Clip(0.2, 0.28, dual_clip=3.0).params() == (0.2, 0.28, 3.0)
    assert GSPO(seq_logratio_max=10).params() == (0.2, 0.2, inf, 10.0)
    assert SAPO(1.0, 1.05).params() == (1.0, 1.05)
    assert CISPO(0.2, 0.28).params() == pytest.approx((0.8, 1.28))
    assert CISPO(ratio_cap=5.0).params() == (-inf, 5.0)
    assert GPG().params() == ()
    assert GeoMean(0.4).params() == (0.4, 0.4)
    assert DPPOTV(0.1, 0.2).params() == DPPOKL(0.1, 0.2).params() == (0.1, 0.2, 20.0)
    assert DRO(0.3).params() == (0.3,)
    assert Vespo().params() == (2.0, 3.0, 3.0, 2.0)
    for cls in losses.LOSS_SPECS.values():
        assert cls.mode in losses.LOSS_MODES and cls.__doc__
    row = {m for m, c in losses.LOSS_SPECS.items() if c.row_level}
    assert row == {"gspo", "geo_mean", "vespo"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Clip(-0.1), "Clip: clip_low must be >= 0.0, got -0.1"),
        (lambda: Clip(1.5), "Clip: clip_low must be <= 1.0, got 1.5"),
        (lambda: Clip(0.2, -0.2), "Clip: clip_high must be >= 0.0"),
        (lambda: Clip("0.2"), "Clip: clip_low must be a number, got '0.2'"),
        (lambda: Clip(True), "Clip: clip_low must be a number"),
        (lambda: Clip(dual_clip=1.0), "Clip: dual_clip must be > 1.0"),
        (lambda: Clip(math.nan), "Clip: clip_low must be a finite number"),
        (lambda: GSPO(seq_logratio_max=math.inf), "GSPO: seq_logratio_max must be a finite"),
        (lambda: SAPO(tau_neg=0.0), "SAPO: tau_neg must be > 0.0"),
        (lambda: CISPO(1.5), "CISPO: clip_low must be <= 1.0"),
        (lambda: CISPO(ratio_cap=0.0), "CISPO: ratio_cap must be > 0.0"),
        (lambda: DPPOTV(ratio_cap=-1.0), "DPPOTV: ratio_cap must be > 0.0"),
        (lambda: DRO(-1.0), "DRO: beta must be > 0.0"),
        (lambda: Vespo(k_pos=None), "Vespo: k_pos must be a number"),
        (lambda: loss_spec("ppo"), "loss: unknown loss mode 'ppo'"),
        (lambda: loss_spec("sapo", tau=1.0), "loss: SAPO .'sapo'. has no field 'tau'"),
        (lambda: loss_spec("dro"), "loss: DRO .'dro'.: .*beta"),
    ],
)
def test_bad_fields_name_the_spec_and_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_specs_are_frozen_values():
    spec = Clip(0.2, 0.28)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.clip_low = 0.3
    assert spec == Clip(0.2, 0.28) and hash(spec) == hash(Clip(0.2, 0.28))
    assert Clip() == Clip(0.2, 0.2)  # clip_high None is clip_low
    assert loss_spec("sapo", tau_pos=2.0) == SAPO(2.0)
    assert loss_spec(spec) is spec
    assert loss_spec(spec, dual_clip=2.0) == Clip(0.2, 0.28, dual_clip=2.0)
    # DPPO's range may pass 1 (a probability difference), GMPO's too (a log-ratio bound)
    assert DPPOTV(1.5).clip_low == 1.5 and GeoMean(2.0).clip_low == 2.0
