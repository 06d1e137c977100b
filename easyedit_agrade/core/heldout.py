"""Held-out perplexity of an edited model, measured cheaply while an edit is being computed (the perplexity guard).

A hypernetwork editor only changes modules at or above its first edited layer, so the layers below run once per
window of held-out text (:meth:`HeldOutText.nll` reuses their output for every candidate ΔW) and a candidate's
perplexity costs one pass through the upper layers and the head, with the ΔW added through
:func:`~easyedit_agrade.core.weights.added_deltas` (weights never written).

The text is *statistics* text — by default windows of the key-statistics corpus (``wiki.valid.tokens``) spread
evenly over the text after the tokens the preserved-knowledge term's C₀ was computed from
(:func:`~easyedit_agrade.core.tokenize.spread_windows`: 16 contiguous windows are one or two articles, and their
ratio under-read a wide sample's by a quarter to a third in log space, docs/agrade.md) — never the perplexity test
text (``wiki.test.tokens``), so a guard chosen on it is not chosen on the evaluation.

:func:`largest_step_within_perplexity` is the guard's search: the largest step t ∈ [0, 1] of a candidate ΔW (on
top of edits already accepted) whose held-out perplexity stays within a ratio of the reference — bisection, since
perplexity is measured, not modelled.

Data-parallel: each rank scores its shard of the windows and the NLL sums and token counts are all-reduced, so
every rank takes the same decisions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .weights import added_deltas


@dataclass
class HeldOutText:
    """Token windows of held-out text with the hidden state entering the first edited layer for each micro-batch
    of windows (computed once). ``nll(deltas)`` is the mean next-token NLL over all ranks' windows with ``deltas``
    added to the edited modules."""

    stack: object  # core.cache.LayerStack of the editor
    batches: list  # [(input_ids (b, L), hidden entering layer `first`)] of this rank's windows
    collective: object = None

    @classmethod
    def from_windows(cls, editor, windows: torch.Tensor, collective=None, micro_batch: int = 4) -> "HeldOutText":
        """This rank's shard of ``windows`` (``(n, L)`` token ids; ``collective``: a
        :class:`~easyedit_agrade.distributed.Collective`, None = one process), lower layers run once per
        ``micro_batch`` windows (the head's logits for b·L positions are held at once)."""
        everything = list(range(windows.shape[0]))
        mine = everything if collective is None else collective.shard(everything)
        batches = []
        for start in range(0, len(mine), micro_batch):
            ids = windows[mine[start:start + micro_batch]].to(editor.device)
            batches.append((ids, editor.lower_one(_Windows(ids))))
        return cls(editor.stack, batches, collective)

    @torch.no_grad()
    def nll(self, deltas: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean next-token NLL (nats) of the held-out windows, with ``deltas`` (editor layout, per module) added."""
        totals = torch.zeros(2, dtype=torch.float64)
        with added_deltas(self.stack.model, dict(deltas or {})):
            for ids, hidden in self.batches:
                mask = torch.ones_like(ids, dtype=torch.bool)
                mask[:, -1] = False  # the last position predicts nothing inside the window
                logits = self.stack.upper(hidden, ids, torch.ones_like(ids), mask)
                logits = logits if logits.dtype == torch.float64 else logits.float()
                totals[0] += float(torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1),
                                                                     reduction="sum"))
                totals[1] += ids[:, 1:].numel()
        if self.collective is not None:
            self.collective.all_reduce_(totals)
        if totals[1] <= 0:
            raise ValueError("no held-out tokens to score")
        return float(totals[0] / totals[1])


class _Windows:
    """The two fields of a micro-batch that :meth:`HypernetEditor.lower_one` reads."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.input_ids, self.attention_mask = ids, torch.ones_like(ids)


def combined(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], t: float) -> dict:
    """``base + t·delta`` per module (modules of either)."""
    out = dict(base)
    for name, d in delta.items():
        out[name] = t * d if name not in out else out[name] + t * d
    return out


def largest_step_within_perplexity(nll: Callable[[Mapping[str, torch.Tensor]], float], reference_nll: float,
                                   base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                                   max_ratio: float, search_steps: int) -> tuple[float, float]:
    """(t, perplexity ratio at t): the largest step t ∈ [0, 1] found with exp(nll(base + t·delta) − reference) ≤
    ``max_ratio``. t = 1 is tried first (one evaluation when it fits); otherwise ``search_steps`` bisection steps
    on [0, 1] (t is a multiple of 2^−search_steps; 0 when none of the tried steps fits). ``base`` is assumed within
    the limit (its ratio is measured only when t = 0 is returned)."""
    if search_steps < 0:
        raise ValueError(f"search_steps must be >= 0, got {search_steps}")
    limit = math.log(max_ratio)
    full = nll(combined(base, delta, 1.0)) - reference_nll
    if full <= limit:
        return 1.0, math.exp(full)
    lo, hi, at_lo = 0.0, 1.0, None
    for _ in range(search_steps):
        mid = 0.5 * (lo + hi)
        value = nll(combined(base, delta, mid)) - reference_nll
        if value <= limit:
            lo, at_lo = mid, value
        else:
            hi = mid
    if at_lo is None:  # nothing of delta fits: report where base alone is
        at_lo = nll(dict(base)) - reference_nll
    return lo, math.exp(at_lo)
