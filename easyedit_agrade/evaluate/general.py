"""General-ability probes for decay after editing: held-out perplexity and a small multiple-choice probe.

* Perplexity on a fixed slice of WikiText-2 (test split, ``wikitext/wiki.test.tokens`` in the shared data): the
  first ``n_windows * window`` tokens of the file, cut into ``n_windows`` windows of ``window`` tokens, scored
  without padding. The same slice before and after editing gives the perplexity change.
* Multiple-choice accuracy on ``data/mc_probe.json`` (40 hand-written questions): each choice is scored by the
  log-likelihood of ``" " + choice`` after ``"Question: <q>\\nAnswer:"`` (one batched teacher-forced pass for all
  choices); ``acc`` uses the summed log-likelihood, ``acc_norm`` the per-token mean.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .scoring import perplexity, score_pairs

if TYPE_CHECKING:  # pragma: no cover
    import torch

MC_PROBE_PATH = Path(__file__).resolve().parent / "data" / "mc_probe.json"
MC_PROMPT = "Question: {question}\nAnswer:"
WIKITEXT_FILE = "wikitext/wiki.test.tokens"


def load_mc_probe(path: str | os.PathLike[str] | None = None) -> list[dict]:
    """The multiple-choice questions (``question``, ``choices``, ``answer`` index), validated."""
    data = json.loads(Path(path or MC_PROBE_PATH).read_text(encoding="utf-8"))
    questions = data["questions"] if isinstance(data, dict) else data
    for i, q in enumerate(questions):
        choices = q.get("choices")
        if not isinstance(q.get("question"), str) or not isinstance(choices, list) or len(choices) < 2:
            raise ValueError(f"mc probe question {i}: needs 'question' and at least two 'choices'")
        if not isinstance(q.get("answer"), int) or not 0 <= q["answer"] < len(choices):
            raise ValueError(f"mc probe question {i}: 'answer' must index into 'choices'")
    return questions


def mc_accuracy(model: Any, tok: Any, questions: Sequence[dict], **score_kwargs: Any) -> dict:
    """``{acc, acc_norm, n}``: log-likelihood multiple-choice accuracy over ``questions``."""
    prompts, targets, owner = [], [], []
    for qi, q in enumerate(questions):
        for choice in q["choices"]:
            prompts.append(MC_PROMPT.format(question=q["question"]))
            targets.append(choice)
            owner.append(qi)
    scores = score_pairs(model, tok, prompts, targets, **score_kwargs)
    by_q: dict[int, list] = {}
    for qi, s in zip(owner, scores):
        by_q.setdefault(qi, []).append(s)
    correct = correct_norm = 0
    for qi, q in enumerate(questions):
        s = by_q[qi]
        best = max(range(len(s)), key=lambda j: s[j].logprob)
        best_norm = max(range(len(s)), key=lambda j: s[j].mean_logprob)
        correct += int(best == q["answer"])
        correct_norm += int(best_norm == q["answer"])
    n = len(questions)
    return {"acc": correct / n if n else None, "acc_norm": correct_norm / n if n else None, "n": n}


def wikitext_windows(tok: Any, path: str | os.PathLike[str], *, n_windows: int = 8, window: int = 256) -> "torch.Tensor":
    """The first ``n_windows * window`` tokens of a text file as a ``(n_windows, window)`` tensor."""
    from ..core.tokenize import text_windows

    return text_windows(tok, path, n_windows=n_windows, window=window)


def general_ability(model: Any, tok: Any, *, windows: "torch.Tensor | None", questions: Sequence[dict] | None,
                    **score_kwargs: Any) -> dict:
    """``{"ppl": ..., "mc": {...}}`` for the given probes (either may be None to skip it)."""
    out: dict[str, Any] = {}
    if windows is not None:
        out["ppl"] = perplexity(model, windows)
        out["ppl_tokens"] = int(windows.numel())
    if questions:
        out["mc"] = mc_accuracy(model, tok, questions, **score_kwargs)
    return out
