"""Metric arithmetic: means that skip missing values, the zero-safe harmonic mean, Editing Score, and the batched
(torch, imported inside the functions) per-record means of the fast scorers.

The AGRADE paper (Appendix A) defines, over the edited set:

* ES, Edit Success — the edited model gives the new target on the edit prompt (eq. 1);
* GS, Generalization Success — it gives the new target on equivalent (paraphrased) prompts (eq. 2);
* LS, Locality Success — on unrelated prompts it gives what the *unedited* model gave (eq. 3);
* Editing Score — the harmonic mean of ES, GS and LS.

As in EasyEdit (``test_prediction_acc``) and the MEND/MALMEN line of work, "gives" is measured teacher-forced,
token by token: a record's value is the fraction of its target tokens that are the argmax prediction; ES/GS/LS are
the means over records. The harmonic mean is 0 when any part is 0 (the limit of ``n / sum(1/x)``), never a
division error; missing parts (``None``/NaN) are left out and reported as such, or — with
``nan_policy="propagate"``, as the AGRADE trainer and report compute ``score`` — make the score NaN.

This is the one metrics module: the batched scorers (:mod:`.scoring`, ``models/agrade/agrade_eval.py``,
``models/instructedit/instructedit_eval.py``) compute their numbers with these functions.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Literal, Mapping, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch


def is_missing(x: Optional[float]) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def mean(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the present values; ``None`` when there are none."""
    vals = [float(v) for v in values if not is_missing(v)]
    return sum(vals) / len(vals) if vals else None


def nanmean(values: Iterable[Optional[float]]) -> float:
    """:func:`mean`, but NaN (not ``None``) when no value is present (the InstructEdit tables' convention)."""
    m = mean(values)
    return float("nan") if m is None else m


NanPolicy = Literal["omit", "propagate"]


def harmonic_mean(values: Sequence[Optional[float]], *, nan_policy: NanPolicy = "omit") -> Optional[float]:
    """Zero-safe harmonic mean of values in [0, 1] (or any non-negative numbers).

    Any zero makes the result 0 (the limit of ``n / sum(1/x)`` as an entry goes to 0). Negative values raise
    ``ValueError``. What a missing part does is the caller's choice:

    * ``nan_policy="omit"`` (the pitfalls suite, EasyEdit-style summaries): missing values (``None`` or NaN) are
      left out; ``None`` when nothing is left.
    * ``nan_policy="propagate"`` (the AGRADE trainer/report's ``score``): a NaN part makes the result NaN (unless
      another part is 0, which still gives 0); no values give NaN. ``None`` is not accepted.
    """
    if nan_policy == "omit":
        vals = [float(v) for v in values if not is_missing(v)]
        if not vals:
            return None
    elif nan_policy == "propagate":
        if any(v is None for v in values):
            raise ValueError("harmonic_mean(nan_policy='propagate') takes numbers (NaN for a missing one), not None")
        vals = [float(v) for v in values]  # type: ignore[arg-type]
        if not vals:
            return float("nan")
    else:
        raise ValueError(f"nan_policy must be 'omit' or 'propagate', got {nan_policy!r}")
    if any(v < 0 for v in vals):
        raise ValueError(f"harmonic mean of negative values: {vals}")
    if any(v == 0.0 for v in vals):
        return 0.0
    if any(math.isnan(v) for v in vals):
        return float("nan")
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


# ----------------------------------------------------------------------------- batched (torch) forms
# The fast scorers (models/agrade/agrade_eval.py, models/instructedit/instructedit_eval.py) score many probes in
# one padded batch: one value per target token, with the row (record or probe) it belongs to. torch is imported
# inside the functions, so importing this module stays cheap.
def per_record_mean(values: "torch.Tensor", rows: "torch.Tensor", n_records: int) -> "torch.Tensor":
    """Mean of ``values`` grouped by ``rows`` (record index) -> (n_records,) float64 on the CPU; records without
    values get NaN. With ``values`` the per-token hits, a record's entry is its :func:`token_accuracy`."""
    import torch

    rows, values = rows.cpu(), values.double().cpu()
    sums = torch.zeros(n_records, dtype=torch.float64).index_add_(0, rows, values)
    counts = torch.zeros(n_records, dtype=torch.float64).index_add_(0, rows, torch.ones_like(values))
    return sums / counts


def tensor_nanmean(x: "torch.Tensor") -> float:
    """Mean of the non-NaN entries of ``x`` (torch arithmetic); NaN when there are none."""
    import torch

    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")
