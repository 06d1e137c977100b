"""What an executor call did, and the ΔW magnitude guard (shared by the AGRADE and InstructEdit executors).

* :class:`EditReport` — per edited module ``‖ΔW‖_F / ‖W‖_F`` (the largest over the call's chunks, each chunk's ΔW
  against the weight it is added to), and for AGRADE the target rows the outlier guards gave no edit signal
  (``suppressed_rows[module]`` of ``total_rows``; see ``models/agrade/guards.py``).
* :class:`EditedWeights` — the ``weights_copy`` dict the executors return (EasyEdit restores from it as from any
  dict) with the report attached as ``.report``; :func:`last_report` gives the report of the latest call on a
  model object (for callers that only see ``BaseEditor``'s results).
* :func:`refuse_large_deltas` — before a chunk's ΔW is applied: if any module's ratio exceeds the hparam
  ``max_delta_ratio`` (``None``: off), weights already changed by this call are restored from ``weights_copy``
  and :class:`DeltaTooLargeError` is raised — all or nothing, the model is left as it was before the call.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from .weights import get_module, restore_weights


class DeltaTooLargeError(ValueError):
    """A ΔW is larger, relative to its weight, than ``max_delta_ratio`` allows; nothing was applied."""


@dataclass
class EditReport:
    alg_name: str
    n_requests: int = 0
    chunks: int = 0
    #: module name → largest ‖ΔW‖_F / ‖W‖_F over the chunks of the call
    delta_ratio: dict[str, float] = field(default_factory=dict)
    #: module name → target rows (positions) whose edit signal the outlier guards set to 0 (AGRADE), summed over
    #: the chunks; ``total_rows``: all target rows of the call (each is one row in every edited module)
    suppressed_rows: dict[str, int] = field(default_factory=dict)
    total_rows: int = 0
    #: AGRADE's perplexity guard (``max_heldout_ppl_ratio``): held-out perplexity after the last chunk over the
    #: model as the call got it (None: guard off), and per chunk the step each solved round's ΔW was scaled by
    heldout_ppl_ratio: float | None = None
    guard_steps: list[list[float]] = field(default_factory=list)
    #: AGRADE's ``value_source: optimized``: per chunk, the value search (steps, mean target NLL before/after,
    #: requests that reached the stopping NLL)
    value_search: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"alg_name": self.alg_name, "n_requests": self.n_requests, "chunks": self.chunks,
                "delta_ratio": dict(self.delta_ratio), "suppressed_rows": dict(self.suppressed_rows),
                "total_rows": self.total_rows, "heldout_ppl_ratio": self.heldout_ppl_ratio,
                "guard_steps": [list(s) for s in self.guard_steps],
                "value_search": [dict(v) for v in self.value_search]}


class EditedWeights(dict):
    """``{param_name: original weight}`` plus ``.report`` (:class:`EditReport`)."""

    def __init__(self, *args, report: EditReport | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.report = report


_LAST: "weakref.WeakKeyDictionary[nn.Module, EditReport]" = weakref.WeakKeyDictionary()


def remember(model: nn.Module, report: EditReport) -> None:
    _LAST[model] = report


def last_report(model: nn.Module) -> EditReport | None:
    """The :class:`EditReport` of the latest AGRADE/InstructEdit executor call on ``model`` (None if none)."""
    return _LAST.get(model)


@torch.no_grad()
def delta_ratios(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{module: ‖ΔW‖_F / ‖W‖_F}`` against the module's current weight (the layout does not change the norm)."""
    out = {}
    for name, delta in deltas.items():
        w = get_module(model, name).weight
        out[name] = float(delta.double().norm() / w.detach().double().norm().clamp_min(1e-30))
    return out


def refuse_large_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], max_ratio: float | None,
                        report: EditReport, weights_copy: Mapping[str, torch.Tensor]) -> None:
    """Record this chunk's ratios in ``report``; if one exceeds ``max_ratio``, restore ``weights_copy`` (the weights
    earlier chunks of the call changed) and raise :class:`DeltaTooLargeError` naming the modules."""
    ratios = delta_ratios(model, deltas)
    for name, r in ratios.items():
        report.delta_ratio[name] = max(r, report.delta_ratio.get(name, 0.0))
    over = {n: r for n, r in ratios.items() if max_ratio is not None and not r <= max_ratio}
    if over:
        restore_weights(model, weights_copy)
        worst = ", ".join(f"{n}: {r:.3g}" for n, r in sorted(over.items(), key=lambda kv: -kv[1]))
        raise DeltaTooLargeError(
            f"{report.alg_name}: refusing the edit — ‖ΔW‖/‖W‖ exceeds max_delta_ratio={max_ratio:g} for "
            f"{len(over)} module(s) ({worst}); the model was left unchanged. Such a ΔW usually wrecks the model "
            f"(requests far from the editor's training edits, or too many at once): edit fewer or other requests, "
            f"raise log_lambda_offset (a stronger ridge), or raise/null max_delta_ratio in the hparams to apply it "
            f"anyway")
