"""Plain metric arithmetic (no torch): means that skip missing values, the zero-safe harmonic mean, Editing Score.

The AGRADE paper (Appendix A) defines, over the edited set:

* ES, Edit Success — the edited model gives the new target on the edit prompt (eq. 1);
* GS, Generalization Success — it gives the new target on equivalent (paraphrased) prompts (eq. 2);
* LS, Locality Success — on unrelated prompts it gives what the *unedited* model gave (eq. 3);
* Editing Score — the harmonic mean of ES, GS and LS.

As in EasyEdit (``test_prediction_acc``) and the MEND/MALMEN line of work, "gives" is measured teacher-forced,
token by token: a record's value is the fraction of its target tokens that are the argmax prediction; ES/GS/LS are
the means over records. The harmonic mean is 0 when any part is 0 (the limit of ``n / sum(1/x)``), never a
division error; missing parts (``None``/NaN) are left out and reported as such.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence


def is_missing(x: Optional[float]) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def mean(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the present values; ``None`` when there are none."""
    vals = [float(v) for v in values if not is_missing(v)]
    return sum(vals) / len(vals) if vals else None


def harmonic_mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Zero-safe harmonic mean of the present values in [0, 1] (or any non-negative numbers).

    Any zero makes the result 0 (the limit of ``n / sum(1/x)`` as an entry goes to 0). Missing values (``None`` or
    NaN) are skipped; ``None`` when nothing is left. Negative values raise ``ValueError``.
    """
    vals = [float(v) for v in values if not is_missing(v)]
    if not vals:
        return None
    if any(v < 0 for v in vals):
        raise ValueError(f"harmonic mean of negative values: {vals}")
    if any(v == 0.0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def editing_score(es: Optional[float], gs: Optional[float], ls: Optional[float],
                  *, require_all: bool = True) -> Optional[float]:
    """The AGRADE paper's Editing Score: harmonic mean of ES, GS and LS.

    With ``require_all`` (default) a missing part makes the score ``None`` rather than a mean of fewer parts, so a
    dataset without paraphrases cannot look better than one with them.
    """
    parts = (es, gs, ls)
    if require_all and any(is_missing(p) for p in parts):
        return None
    return harmonic_mean(parts)


def token_accuracy(pred: Sequence[int], target: Sequence[int]) -> float:
    """Fraction of positions where ``pred`` equals ``target`` (NaN for an empty target)."""
    if len(pred) != len(target):
        raise ValueError(f"prediction has {len(pred)} tokens, target {len(target)}")
    if not target:
        return float("nan")
    return sum(int(p == t) for p, t in zip(pred, target)) / len(target)


def agreement(post: Sequence[int], pre: Sequence[int]) -> float:
    """Locality of one probe as EasyEdit's ``BaseEditor.edit`` computes it: ``mean(post_tokens == pre_tokens)``."""
    return token_accuracy(post, pre)


def summarize_scores(scores: Mapping[str, Optional[float]], keys: Sequence[str] = ("ES", "GS", "LS")) -> dict:
    """``{ES, GS, LS, Score}`` from a mapping holding the three parts."""
    out = {k: scores.get(k) for k in keys}
    out["Score"] = editing_score(*(scores.get(k) for k in keys))
    return out
