"""Metric arithmetic on hand-computed cases."""
from __future__ import annotations

import math

import pytest

from easyedit_agrade.evaluate.metrics import (agreement, editing_score, harmonic_mean, mean, summarize_scores,
                                              token_accuracy)


def test_harmonic_mean_hand_computed():
    assert harmonic_mean([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert harmonic_mean([0.5, 1.0, 1.0]) == pytest.approx(3 / (2 + 1 + 1))  # 0.75
    assert harmonic_mean([0.2, 0.5]) == pytest.approx(2 / (5 + 2))
    assert harmonic_mean([0.9, 0.8, 0.6]) == pytest.approx(3 / (1 / 0.9 + 1 / 0.8 + 1 / 0.6))


def test_harmonic_mean_with_zeros_is_zero_not_an_error():
    assert harmonic_mean([0.0, 0.9, 0.8]) == 0.0
    assert harmonic_mean([0.0, 0.0, 0.0]) == 0.0
    assert harmonic_mean([0, 1]) == 0.0


def test_harmonic_mean_missing_and_invalid():
    assert harmonic_mean([]) is None
    assert harmonic_mean([None, float("nan")]) is None
    assert harmonic_mean([None, 0.5, 1.0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        harmonic_mean([-0.1, 0.5])


def test_editing_score():
    assert editing_score(1.0, 1.0, 1.0) == pytest.approx(1.0)
    assert editing_score(0.877, 0.8301, 0.5999) == pytest.approx(3 / (1 / 0.877 + 1 / 0.8301 + 1 / 0.5999))
    assert editing_score(0.9, 0.0, 0.9) == 0.0
    assert editing_score(0.9, None, 0.9) is None  # a missing part never silently raises the score
    assert editing_score(0.9, None, 0.9, require_all=False) == pytest.approx(0.9)
    s = summarize_scores({"ES": 0.5, "GS": 1.0, "LS": 1.0})
    assert s["Score"] == pytest.approx(0.75) and s["ES"] == 0.5


def test_token_accuracy_and_agreement():
    assert token_accuracy([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert token_accuracy([5], [5]) == 1.0
    assert math.isnan(token_accuracy([], []))
    with pytest.raises(ValueError):
        token_accuracy([1], [1, 2])
    assert agreement([7, 8], [7, 9]) == 0.5


def test_mean_skips_missing():
    assert mean([1.0, None, 0.0, float("nan")]) == 0.5
    assert mean([]) is None


def test_harmonic_mean_nan_policies_are_explicit_and_differ():
    """'omit' (the pitfalls suite, calibration) leaves a missing part out; 'propagate' (AGRADE's reported score,
    ``agrade_eval.harmonic_mean``) makes the score NaN — except that a zero part still gives 0."""
    from easyedit_agrade.models.agrade.agrade_eval import harmonic_mean as agrade_score

    nan = float("nan")
    assert harmonic_mean([nan, 0.5, 1.0]) == pytest.approx(2 / 3)
    assert math.isnan(harmonic_mean([nan, 0.5, 1.0], nan_policy="propagate"))
    assert math.isnan(agrade_score(nan, 0.5, 1.0))
    assert harmonic_mean([nan, 0.0, 1.0], nan_policy="propagate") == 0.0 == agrade_score(nan, 0.0, 1.0)
    assert harmonic_mean([0.5, 1.0, 1.0], nan_policy="propagate") == 0.75 == agrade_score(0.5, 1.0, 1.0)
    assert agrade_score(0.9, 0.8, 0.6) == 3 / (1 / 0.9 + 1 / 0.8 + 1 / 0.6)  # bit-identical to the old formula
    assert math.isnan(harmonic_mean([], nan_policy="propagate")) and harmonic_mean([]) is None
    with pytest.raises(ValueError, match="not None"):
        harmonic_mean([None, 1.0], nan_policy="propagate")
    with pytest.raises(ValueError, match="nan_policy"):
        harmonic_mean([1.0], nan_policy="skip")


def test_batched_per_record_means():
    import torch

    from easyedit_agrade.evaluate.metrics import nanmean, per_record_mean, tensor_nanmean

    hits = torch.tensor([1.0, 0.0, 1.0, 1.0])  # record 0: 2 tokens, record 2: 2 tokens, record 1: none
    per = per_record_mean(hits, torch.tensor([0, 0, 2, 2]), 3)
    assert per.dtype == torch.float64 and per[0] == 0.5 and math.isnan(per[1]) and per[2] == 1.0
    assert tensor_nanmean(per) == 0.75 and math.isnan(tensor_nanmean(torch.tensor([float("nan")])))
    assert nanmean([1.0, float("nan"), 0.0]) == 0.5 and math.isnan(nanmean([]))
