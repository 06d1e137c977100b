"""InstructEdit metrics (paper §5.2), one edit at a time, the model restored bit-exactly after each.

* Reliability / Generalization / Portability — teacher-forced token accuracy of the target after the (instruction-
  wrapped) edit / rephrased / portability prompt, as EasyEdit computes them (argmax at each target-predicting
  position, averaged per probe, then over records).
* Locality — agreement of the edited model's argmax with the unedited model's at the positions predicting the
  locality answer (locality prompts are never wrapped).
* ConvSent — Reliability: the edited model prefers the target-sentiment responses over the opposite ones on the
  topic (mean per-token log-likelihood of the held-out target-sentiment responses > that of the opposite ones,
  given the wrapped question; no external classifier). Locality: token agreement on another topic's question and
  response. Fluency: weighted bi/tri-gram entropy (eq. 8, weights 2/3 and 4/3, word n-grams, bits) of a 24-token
  greedy generation after the wrapped question (the paper's table uses another scale; compare within a table).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...core.weights import apply_deltas, restore_weights
from ...evaluate.generation import ngram_entropy
from ...evaluate.metrics import nanmean, per_record_mean
from .editor import InstructEditEditor
from .instructions import InstructionSet
from .multitask import TaskRecord


def fluency(text: str) -> float:
    """Eq. 8 on whitespace words: :func:`~easyedit_agrade.evaluate.generation.ngram_entropy` (weights 2/3, 4/3)."""
    return ngram_entropy(text, tokens=text.split())


@dataclass
class Probe:
    """The instruction-applied prompts of one record."""

    rel: tuple[str, str]
    gen: list[tuple[str, str]] = field(default_factory=list)
    loc: list[tuple[str, str]] = field(default_factory=list)
    port: list[tuple[str, str]] = field(default_factory=list)
    question: str | None = None  # ConvSent: the wrapped question (LL reliability, fluency)
    responses: list[str] = field(default_factory=list)
    opposite: list[str] = field(default_factory=list)


def make_probe(rec: TaskRecord, instructions: InstructionSet | None, index: int, use_instruction: bool) -> Probe:
    def w(p: str) -> str:
        if not use_instruction or instructions is None:
            return p
        return instructions.wrap(p, rec.task, index, label=rec.label, topic=rec.subject)

    pr = Probe(rel=(w(rec.prompt), rec.target_new))
    if rec.task == "convsent":
        held = rec.responses[1:] or rec.responses
        pr.gen = [(w(rec.rephrase_prompt or rec.prompt), r) for r in held[:2]]
        pr.question, pr.responses, pr.opposite = w(rec.prompt), held, rec.opposite
    elif rec.rephrase_prompt:
        pr.gen = [(w(rec.rephrase_prompt), rec.target_new)]
    if rec.locality_prompt and rec.locality_ground_truth:
        pr.loc = [(rec.locality_prompt, rec.locality_ground_truth)]
    pr.port = [(w(p), a) for p, a in rec.portability]
    return pr


def _logits(editor: InstructEditEditor, pairs: Sequence[tuple[str, str]]):
    """[(predicted token ids, label ids, log-probs of labels, row index)] per micro-batch (full pairs list)."""
    mbs = editor.encode([p for p, _ in pairs], [t for _, t in pairs], micro_batch=16)
    editor.lower(mbs)
    out = []
    for mb in mbs:
        logits = editor.stack.upper(mb.hidden, mb.input_ids, mb.attention_mask, mb.predict_mask).float()
        lp = torch.log_softmax(logits, -1).gather(1, mb.target_labels[:, None])[:, 0]
        out.append((logits.argmax(-1), mb.target_labels, lp, mb.rows))
    return out


def _per_pair(values: list[torch.Tensor], rows: list[torch.Tensor], n: int) -> torch.Tensor:
    return per_record_mean(torch.cat(values), torch.cat(rows), n)


@torch.no_grad()
def token_accuracy(editor: InstructEditEditor, pairs: Sequence[tuple[str, str]]) -> float:
    if not pairs:
        return float("nan")
    res = _logits(editor, pairs)
    return float(_per_pair([(p == y).double() for p, y, _, _ in res], [r for *_, r in res], len(pairs)).mean())


@torch.no_grad()
def argmaxes(editor: InstructEditEditor, pairs: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
    return [p for p, *_ in _logits(editor, pairs)]


@torch.no_grad()
def agreement(editor: InstructEditEditor, pairs: Sequence[tuple[str, str]], ref: list[torch.Tensor]) -> float:
    if not pairs:
        return float("nan")
    res = _logits(editor, pairs)
    return float(_per_pair([(p == q).double() for (p, *_), q in zip(res, ref)], [r for *_, r in res],
                           len(pairs)).mean())


@torch.no_grad()
def mean_loglik(editor: InstructEditEditor, question: str, responses: Sequence[str]) -> float:
    """Mean over responses of the per-token mean log-likelihood of the response after ``question``."""
    res = _logits(editor, [(question, r) for r in responses])
    return float(_per_pair([lp for _, _, lp, _ in res], [r for *_, r in res], len(responses)).mean())


@torch.no_grad()
def generate(editor: InstructEditEditor, prompt: str, max_new_tokens: int = 24) -> str:
    tok, model = editor.tok, editor.model
    enc = tok(prompt, return_tensors="pt").to(editor.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def _edit_metrics(editor: InstructEditEditor, pr: Probe, conv: bool, fluency: bool) -> dict[str, float]:
    """Reliability (ConvSent: log-likelihood preference), generalization or fluency, and portability of the model
    as it is now (before or after the edit)."""
    out: dict[str, float] = {}
    if conv:
        out["rel"] = float(mean_loglik(editor, pr.question, pr.responses) > mean_loglik(editor, pr.question, pr.opposite))
        if fluency:
            out["fluency"] = fluency(generate(editor, pr.question))
    else:
        out["rel"] = token_accuracy(editor, [pr.rel])
        out["gen"] = token_accuracy(editor, pr.gen)
    out["port"] = token_accuracy(editor, pr.port)
    return out


@torch.no_grad()
def evaluate_task(editor: InstructEditEditor, records: Sequence[TaskRecord], *, instructions: InstructionSet | None,
                  index: int = 0, use_instruction: bool = True, pre: bool = True,
                  fluency: bool = True) -> dict[str, float]:
    """Edit each record alone and measure; returns percentages (0–100) averaged over records."""
    keys = ("rel", "gen", "loc", "port", "fluency", "pre_rel", "pre_gen", "pre_port", "pre_fluency")
    acc: dict[str, list[float]] = {k: [] for k in keys}
    for rec in records:
        pr = make_probe(rec, instructions, index, use_instruction)
        conv = rec.task == "convsent"
        ref = argmaxes(editor, pr.loc) if pr.loc else []
        if pre:
            for key, value in _edit_metrics(editor, pr, conv, fluency).items():
                acc[f"pre_{key}"].append(value)
        deltas = editor.edit_deltas([pr.rel[0]], [pr.rel[1]])
        copies = apply_deltas(editor.model, deltas, mode=editor.hparams.apply_mode)
        try:
            post = _edit_metrics(editor, pr, conv, fluency)
            post["loc"] = agreement(editor, pr.loc, ref)
            for key, value in post.items():
                acc[key].append(value)
        finally:
            restore_weights(editor.model, copies)
    out = {k: nanmean(v) for k, v in acc.items()}
    scaled = {k: (100.0 * v if not k.endswith("fluency") and v == v else v) for k, v in out.items()}
    scaled["n"] = float(len(records))
    return scaled
