"""Count what the outlier guards of ``models/agrade/outliers.py`` suppressed, and warn when that was everything.

:class:`CountingAGRADEEditor` is the executor's :class:`~.editor.AGRADEEditor`: when editing (no grad, frozen
network) it counts, per module, the target rows whose G the guards set to 0 (a suppressed row's G is exactly 0).
:func:`note_suppressed` adds the counts of one chunk to the call's :class:`~easyedit_agrade.core.edit_report.EditReport`
and warns when a module — or every module, so ΔW = 0 and the requests were not edited at all — got no signal;
:func:`note_heldout` adds what the perplexity guard did.
"""
from __future__ import annotations

import warnings

import torch

from ...core.edit_report import EditReport
from .editor import AGRADEEditor


class CountingAGRADEEditor(AGRADEEditor):
    """An :class:`AGRADEEditor` that counts guard-suppressed rows per module in :attr:`suppressed`
    (``{module: [suppressed, total]}``; reset with :meth:`reset_counts`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.suppressed: dict[str, list[int]] = {}

    def reset_counts(self) -> None:
        self.suppressed = {}

    def adjusted_gradient(self, name, H, *args, **kwargs):
        G = super().adjusted_gradient(name, H, *args, **kwargs)
        if not torch.is_grad_enabled() and not self.later_round:  # a row once per call, not once per round
            counts = self.suppressed.setdefault(name, [0, 0])
            counts[0] += int((G == 0).all(dim=1).sum())
            counts[1] += int(G.shape[0])
        return G


def note_suppressed(editor: CountingAGRADEEditor, report: EditReport) -> None:
    """Add the editor's counts for the chunk just computed to ``report`` and warn about modules that got no edit
    signal (a row is one target position, seen once in every module); with ``network_stage`` its editor's too."""
    if getattr(editor, "network_stage", None) is not None:
        note_suppressed(editor.network_stage, report)
    counts = editor.suppressed
    editor.reset_counts()
    if not counts:
        return
    for name, (s, _t) in counts.items():
        report.suppressed_rows[name] = report.suppressed_rows.get(name, 0) + s
    report.total_rows += max(t for _, t in counts.values())
    silent = [n for n, (s, t) in counts.items() if t and s == t]
    if len(silent) == len(counts):
        warnings.warn(f"AGRADE: the outlier guards (max_key_norm_ratio, max_row_zscore) suppressed every one of the "
                      f"{max(t for _, t in counts.values())} target rows of a chunk in every edited module: ΔW = 0, "
                      f"these requests were NOT edited (see models/agrade/outliers.py; null the guards to edit "
                      f"anyway)", RuntimeWarning, stacklevel=3)
    elif silent:
        warnings.warn(f"AGRADE: the outlier guards suppressed every target row in {silent}: those modules get "
                      f"ΔW = 0 for this chunk", RuntimeWarning, stacklevel=3)


def note_heldout(rounds: list[dict], report: EditReport) -> None:
    """Add what the perplexity guard did for one chunk (its rounds' ``step`` / ``heldout_ppl_ratio``, see
    :meth:`~.editor.AGRADEEditor.edit_in_rounds`) to ``report``; nothing when the guard is off. An undone round
    counts as step 0 and its ratio is not the chunk's: the ratio is the last kept round's."""
    guarded = [e for e in rounds if "step" in e]
    if guarded:
        report.guard_steps.append([0.0 if e.get("undone") else float(e["step"]) for e in guarded])
        kept = [e for e in guarded if not e.get("undone")]  # round 1 is never undone
        report.heldout_ppl_ratio = float(kept[-1]["heldout_ppl_ratio"])
