"""Batched teacher-forced ES / GS / LS / Score for AGRADE edits (used by the trainer, the demo and the report).

* ES — token accuracy of ``target_new`` after the edit prompt (argmax at each target-predicting position), averaged
  per record, then over records.
* GS — the same on the rephrased prompt.
* LS — agreement of the edited model's argmax with the *unedited* model's argmax at the positions predicting the
  locality answer (teacher-forced with ``locality_ground_truth``), per record, then over records.
* Score — harmonic mean of ES, GS and LS (NaN-propagating; ``evaluate/metrics.py`` holds the arithmetic).

The layers below the first edited one are run once for all probes (they never change), the pre- and post-edit
upper passes reuse their output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ...core.weights import apply_deltas, restore_weights
from ...dataset.readers import EditRecord
from ...evaluate import metrics
from ...evaluate.metrics import per_record_mean, tensor_nanmean
from .editor import AGRADEEditor, MicroBatch


def harmonic_mean(*xs: float) -> float:
    """The reported ``score``: :func:`evaluate.metrics.harmonic_mean` of the parts with NaN propagating (a part
    without any probe makes the score NaN; a zero part makes it 0)."""
    return metrics.harmonic_mean(xs, nan_policy="propagate")  # type: ignore[return-value]


@dataclass
class Probes:
    """Tokenised edit / equivalent / locality probes of a set of records, with their lower-layer outputs."""

    n: int
    edit: list[MicroBatch]
    equiv: list[MicroBatch]
    loc: list[MicroBatch]


def build_probes(editor: AGRADEEditor, records: Sequence[EditRecord], micro_batch: int | None = None) -> Probes:
    for r in records:
        if r.rephrase_prompt is None or r.locality_prompt is None or r.locality_ground_truth is None:
            raise ValueError(f"record {r.index} ({r.source}) lacks rephrase/locality fields needed for ES/GS/LS")
    mb = micro_batch or editor.hparams.cache_batch_size
    p = Probes(
        n=len(records),
        edit=editor.encode([r.prompt for r in records], [r.target_new for r in records], mb,
                           subjects=[r.subject for r in records]),
        equiv=editor.encode([r.rephrase_prompt for r in records], [r.target_new for r in records], mb),  # type: ignore[misc]
        # locality answers can be long (zsRE's loc_ans up to ~50 tokens): never cut them
        loc=editor.encode([r.locality_prompt for r in records], [r.locality_ground_truth for r in records], mb,  # type: ignore[misc]
                          max_length=None),
    )
    for group in (p.edit, p.equiv, p.loc):
        editor.lower(group)
    return p


@torch.no_grad()
def argmax_at_targets(editor: AGRADEEditor, mbs: Sequence[MicroBatch]) -> list[torch.Tensor]:
    return [editor.stack.upper(mb.hidden, mb.input_ids, mb.attention_mask, mb.predict_mask).argmax(-1) for mb in mbs]


@torch.no_grad()
def accuracy(editor: AGRADEEditor, mbs: Sequence[MicroBatch], n: int,
             reference: Sequence[torch.Tensor] | None = None) -> float:
    """Per-record teacher-forced token accuracy vs the labels (or agreement with ``reference`` argmaxes)."""
    preds = argmax_at_targets(editor, mbs)
    vals, rows = [], []
    for i, (mb, pred) in enumerate(zip(mbs, preds)):
        want = mb.target_labels if reference is None else reference[i]
        vals.append((pred == want).double())
        rows.append(mb.rows)
    return tensor_nanmean(per_record_mean(torch.cat(vals), torch.cat(rows), n))


@torch.no_grad()
def pre_edit_metrics(editor: AGRADEEditor, probes: Probes) -> dict[str, float]:
    """ES/GS/LS/Score of the unedited model (LS = 1 by definition)."""
    es, gs = accuracy(editor, probes.edit, probes.n), accuracy(editor, probes.equiv, probes.n)
    return {"es": es, "gs": gs, "ls": 1.0, "score": harmonic_mean(es, gs, 1.0)}


@torch.no_grad()
def evaluate_records(editor: AGRADEEditor, records: Sequence[EditRecord], *, pre: bool = True,
                     probes: Probes | None = None) -> dict[str, float]:
    """Edit all ``records`` in one batch with ``editor``; return ES/GS/LS/Score (and pre-edit ES/GS/Score with
    ``pre``), plus the edit wall time. The model is restored bit-exactly afterwards."""
    probes = probes or build_probes(editor, records)
    ref_loc = argmax_at_targets(editor, probes.loc)
    out: dict[str, float] = {"n": float(len(records))}
    if pre:
        out.update({f"pre_{k}": v for k, v in pre_edit_metrics(editor, probes).items()})
    t0 = time.perf_counter()
    with torch.enable_grad():
        result = editor.solve(probes.edit)  # as the executor edits (edit_rounds, the perplexity guard)
    weights_copy = apply_deltas(editor.model, result.deltas, mode=editor.hparams.apply_mode)
    out["edit_time_s"] = time.perf_counter() - t0
    try:
        out["es"] = accuracy(editor, probes.edit, probes.n)
        out["gs"] = accuracy(editor, probes.equiv, probes.n)
        out["ls"] = accuracy(editor, probes.loc, probes.n, reference=ref_loc)
    finally:
        restore_weights(editor.model, weights_copy)
    out["score"] = harmonic_mean(out["es"], out["gs"], out["ls"])
    out["delta_norm"] = float(sum(float(d.norm()) ** 2 for d in result.deltas.values()) ** 0.5)
    return out
