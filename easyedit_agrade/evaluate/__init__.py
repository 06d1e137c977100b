"""Evaluation of knowledge edits: batched teacher-forced metrics (ES/GS/LS/Editing Score, EasyEdit's
``rewrite_acc``/``rephrase_acc``/``locality``/``portability``), the pitfalls suite (portability, Other-Attribution,
Distract-Neighbor, MQuAKE) and general-ability decay (perplexity, a multiple-choice probe). Knows no edit method.

Submodules import torch only inside functions; ``import easyedit_agrade.evaluate`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "harmonic_mean": "metrics",
    "editing_score": "metrics",
    "token_accuracy": "metrics",
    "agreement": "metrics",
    "mean": "metrics",
    "PairScore": "scoring",
    "score_pairs": "scoring",
    "perplexity": "scoring",
    "EvalRecord": "records",
    "Probe": "records",
    "MQuAKECase": "records",
    "RecordError": "records",
    "load_records": "records",
    "parse_records": "records",
    "build_pool": "records",
    "Evaluator": "suite",
    "distract_prompt": "suite",
    "load_mc_probe": "general",
    "mc_accuracy": "general",
    "wikitext_windows": "general",
    "general_ability": "general",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
