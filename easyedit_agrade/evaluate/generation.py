"""Generation-based metrics: what the edited model *says*, not what it scores under teacher forcing.

Teacher-forced accuracy feeds the true previous tokens at every target position, so a model that would wander off
after the first token still scores well (EasyEdit issues #404/#396/#518; the QAEdit/WILD study: 96.8 % teacher-forced
vs 38.5 % generated). Here every prompt is decoded greedily for a bounded number of tokens, in left-padded batches,
and the text is judged as a user would read it:

* ``exact`` — the answer (the generation up to the first newline, then up to the first sentence end) equals the
  target, after :func:`normalize` (case, punctuation, articles, whitespace);
* ``prefix`` — the normalised generation starts with the normalised target (the model says the new fact first and
  may go on);
* ``token_acc`` — the share of target tokens that greedy decoding reproduces at their positions (free-running,
  the generated counterpart of EasyEdit's teacher-forced ``rewrite_acc``);
* ``entropy`` — fluency as ROME/EasyEdit define it: the weighted bi-/tri-gram entropy (bits) of the generation's
  words, ``(2/3·H₂ + 4/3·H₃) / 2`` (:func:`ngram_entropy`; EasyEdit ``n_gram_entropy``, weights 2/3 and 4/3, mean
  aggregation). Words come from NLTK's ``NLTKWordTokenizer`` — ``nltk.word_tokenize`` without the Punkt sentence
  splitter, which needs a data download; on single-sentence generations the two agree;
* ``repetition`` — the share of repeated word n-grams in a generation, ``1 − distinct n-grams / n-grams``
  (n = 2 by default; 0 for varied text, → 1 for "India, India, India, India"), and ``degenerate``, the share of
  generations whose repetition exceeds ``degenerate_threshold``.

Everything is batched (sorted by prompt length, ``batch_size`` prompts per ``generate`` call) and bounded
(``max_new_tokens`` per prompt, ``max_prompts`` per call).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: ROME / EasyEdit n-gram entropy: orders and weights (``compute_n_gram_entropy``)
ENTROPY_NS = (2, 3)
ENTROPY_WEIGHTS = (2 / 3, 4 / 3)
DEFAULT_MAX_NEW_TOKENS = 24
DEFAULT_BATCH_SIZE = 32
DEFAULT_DEGENERATE_THRESHOLD = 0.5

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_word_tokenizer = None


def words(text: str) -> list[str]:
    """Word tokens as NLTK's ``word_tokenize`` splits them (punctuation separate), without the Punkt download."""
    global _word_tokenizer
    if _word_tokenizer is None:
        from nltk.tokenize import NLTKWordTokenizer

        _word_tokenizer = NLTKWordTokenizer()
    return _word_tokenizer.tokenize(text)


def ngram_entropy(text: str, ns: Sequence[int] = ENTROPY_NS, weights: Sequence[float] = ENTROPY_WEIGHTS,
                  tokens: Sequence[str] | None = None) -> float:
    """ROME/EasyEdit fluency: Σₙ wₙ Hₙ / Σₙ wₙ, Hₙ the entropy in bits of the text's word n-gram frequencies.

    (EasyEdit's ``compute_n_gram_entropy`` takes the arithmetic mean of ``wₙ Hₙ``; with its weights 2/3 and 4/3,
    which sum to 2, that is the same number.) ``tokens`` overrides the tokenisation (InstructEdit's eq. 8 splits on
    whitespace). A text shorter than n words contributes Hₙ = 0.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError("ngram_entropy: 'ns' and 'weights' must be non-empty and of equal length")
    toks = list(words(text) if tokens is None else tokens)
    hs = []
    for n in ns:
        grams = Counter(tuple(toks[i:i + n]) for i in range(max(0, len(toks) - n + 1)))
        total = sum(grams.values())
        hs.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return float(sum(w * h for w, h in zip(weights, hs)) / sum(weights))


def repetition_rate(text: str, n: int = 2) -> float:
    """``1 − distinct / total`` word n-grams of ``text`` (0 when it has fewer than n words)."""
    toks = words(text)
    grams = [tuple(toks[i:i + n]) for i in range(max(0, len(toks) - n + 1))]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style answer normalisation)."""
    text = text.lower()
    text = "".join(ch if ch not in string.punctuation else " " for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_span(generation: str) -> str:
    """The answer part of a generation: up to the first newline, then up to the first sentence end."""
    first_line = generation.strip().split("\n")[0]
    m = re.search(r"(?<!\b[A-Z])[.!?](\s|$)", first_line)
    return first_line[:m.start()] if m else first_line


def exact_match(generation: str, target: str) -> bool:
    """The generation's answer span equals the target (normalised)."""
    return normalize(answer_span(generation)) == normalize(target) != ""


def prefix_match(generation: str, target: str) -> bool:
    """The normalised generation starts with the normalised target, at a word boundary."""
    gen, tgt = normalize(generation), normalize(target)
    return bool(tgt) and (gen == tgt or gen.startswith(tgt + " "))


@dataclass
class Generation:
    """One greedy continuation of a prompt."""

    prompt: str
    text: str  # decoded continuation (special tokens dropped)
    token_ids: list[int]  # generated token ids, up to the end-of-sequence token


def greedy_generate(model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    batch_size: int = DEFAULT_BATCH_SIZE, max_prompts: int | None = None) -> list[Generation]:
    """Greedy continuations of ``prompts`` (input order), decoded in left-padded batches sorted by length."""
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_prompts is not None and len(prompts) > max_prompts:
        raise ValueError(f"{len(prompts)} prompts exceed max_prompts={max_prompts} (the generation budget)")
    if tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tok.pad_token = tok.eos_token")
    device = next(model.parameters()).device
    lengths = [len(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[Generation | None] = [None] * len(prompts)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for i, seq in zip(idx, seqs[:, enc["input_ids"].shape[1]:].tolist()):
                if tok.eos_token_id is not None and tok.eos_token_id in seq:
                    seq = seq[:seq.index(tok.eos_token_id)]
                out[i] = Generation(prompts[i], tok.decode(seq, skip_special_tokens=True), seq)
    finally:
        tok.padding_side = side
    return out  # type: ignore[return-value]


def target_token_ids(tok: Any, target: str) -> list[int]:
    """The target's tokens as they follow a prompt (a leading space, as :mod:`~easyedit_agrade.core.tokenize`)."""
    return tok(" " + target.strip(), add_special_tokens=False)["input_ids"]


def token_accuracy(generated: Sequence[int], target: Sequence[int]) -> float:
    """Share of target tokens reproduced at their positions by the free-running generation."""
    if not target:
        return float("nan")
    return sum(int(i < len(generated) and generated[i] == t) for i, t in enumerate(target)) / len(target)


def judge(gen: Generation, target: str | None, tok: Any = None, *, repetition_n: int = 2) -> dict[str, float]:
    """The per-generation metrics: matches against ``target`` (when given) and fluency."""
    row: dict[str, float] = {"entropy": ngram_entropy(gen.text), "repetition": repetition_rate(gen.text, repetition_n)}
    if target is not None:
        row["exact"] = float(exact_match(gen.text, target))
        row["prefix"] = float(prefix_match(gen.text, target))
        if tok is not None:
            row["token_acc"] = token_accuracy(gen.token_ids, target_token_ids(tok, target))
    return row


def summarize(rows: Sequence[Mapping[str, float]], *, degenerate_threshold: float = DEFAULT_DEGENERATE_THRESHOLD
              ) -> dict[str, float | int]:
    """Means over generations of every metric, plus ``degenerate`` (share with repetition > threshold) and ``n``."""
    out: dict[str, float | int] = {"n": len(rows)}
    keys = sorted({k for r in rows for k in r})
    for k in keys:
        vals = [r[k] for r in rows if k in r and not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    if rows:
        out["degenerate"] = sum(r["repetition"] > degenerate_threshold for r in rows) / len(rows)
    return out


def generation_metrics(model: Any, tok: Any, probes: Mapping[str, Sequence[tuple[str, str]]], *,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
                       max_prompts: int | None = None, repetition_n: int = 2,
                       degenerate_threshold: float = DEFAULT_DEGENERATE_THRESHOLD,
                       keep_texts: int = 0) -> dict[str, Any]:
    """Generate once for every ``(prompt, target)`` of every probe kind, judge, summarise per kind.

    ``probes`` maps a kind (e.g. ``"rewrite"``, ``"rephrase"``) to pairs; all kinds share the batches. Returns
    ``{kind: {exact, prefix, token_acc, entropy, repetition, degenerate, n}}`` plus ``"all"`` (fluency over every
    generation) and, with ``keep_texts=k``, ``"examples"``: the first k generations of each kind.
    """
    flat = [(kind, p, t) for kind, pairs in probes.items() for p, t in pairs]
    gens = greedy_generate(model, tok, [p for _, p, _ in flat], max_new_tokens=max_new_tokens, batch_size=batch_size,
                           max_prompts=max_prompts)
    rows = [judge(g, t, tok, repetition_n=repetition_n) for g, (_, _, t) in zip(gens, flat)]
    out: dict[str, Any] = {}
    for kind in probes:
        out[kind] = summarize([r for r, (k, _, _) in zip(rows, flat) if k == kind],
                              degenerate_threshold=degenerate_threshold)
    fluency = [{"entropy": r["entropy"], "repetition": r["repetition"]} for r in rows]
    out["all"] = summarize(fluency, degenerate_threshold=degenerate_threshold)
    out["max_new_tokens"] = max_new_tokens
    if keep_texts:
        out["examples"] = {kind: [{"prompt": g.prompt, "target": t, "generation": g.text}
                                  for g, (k, _, t) in zip(gens, flat) if k == kind][:keep_texts]
                           for kind in probes}
    return out
