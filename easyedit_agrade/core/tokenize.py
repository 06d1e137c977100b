"""Tokenise ``prompt + target`` pairs for causal LMs with a mask on the target tokens.

Shared by the editors (which cache H and ∇G on target tokens only) and the evaluator (teacher-forced token
accuracy). The text is ``prompt + " " + target`` as in EasyEdit (no extra space when the prompt already ends
with whitespace or the target starts with one). Target tokens are found from character offsets, so a BPE merge
across the prompt/target boundary cannot shift the mask. Causal-LM label shift: the logit at position ``t``
predicts token ``t + 1``; :attr:`PromptTargetBatch.predict_positions` are those ``t``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def join_prompt_target(prompt: str, target: str) -> tuple[str, int]:
    """Return the full text and the character index where the target part (including its space) starts."""
    if not target:
        raise ValueError("target is empty")
    sep = "" if (not prompt or prompt[-1].isspace() or target[0].isspace()) else " "
    return prompt + sep + target, len(prompt)


@dataclass
class PromptTargetBatch:
    """A padded batch. ``labels`` holds the token ids on target positions and -100 elsewhere."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 outside targets
    target_mask: torch.Tensor  # (B, L) bool, True on target tokens
    #: (B, L) bool, True on the last token of the subject in the prompt (``subjects`` given; else None)
    subject_mask: torch.Tensor | None = None

    @property
    def predict_mask(self) -> torch.Tensor:
        """(B, L) bool: positions whose logits predict a target token (target mask shifted left by one)."""
        mask = torch.zeros_like(self.target_mask)
        mask[:, :-1] = self.target_mask[:, 1:]
        return mask

    @property
    def shifted_labels(self) -> torch.Tensor:
        """(B, L) labels aligned with logits: position t holds the id of token t+1 (or -100)."""
        out = torch.full_like(self.labels, -100)
        out[:, :-1] = self.labels[:, 1:]
        return out

    def to(self, device: torch.device | str) -> "PromptTargetBatch":
        return PromptTargetBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                          self.target_mask)),
                                 subject_mask=None if self.subject_mask is None else self.subject_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_prompt_target(
    tok,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    max_length: int | None = None,
    padding_side: str = "right",
    record_ids: Sequence[int] | None = None,
    subjects: Sequence[str | None] | None = None,
) -> PromptTargetBatch:
    """Tokenise pairs; truncation (``max_length``) cuts the *prompt's start*, never the target.

    With ``subjects`` the batch also gets :attr:`PromptTargetBatch.subject_mask`: per row the last token of the
    subject's first occurrence in the prompt (character offsets, like the target; ROME/MEMIT's subject position).
    A row whose subject is None, does not occur in its prompt, or was cut away by truncation has no subject token.

    Raises ``ValueError`` naming the record index when a pair is empty or the target would be cut: the caller's
    index ``record_ids[i]`` when given (e.g. the original position of a length-sorted micro-batch's records),
    else the position ``i`` in ``prompts``.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if record_ids is not None and len(record_ids) != len(prompts):
        raise ValueError(f"{len(record_ids)} record_ids for {len(prompts)} prompts")
    if subjects is not None and len(subjects) != len(prompts):
        raise ValueError(f"{len(subjects)} subjects for {len(prompts)} prompts")
    rows: list[tuple[list[int], list[bool], int | None]] = []
    for j, (prompt, target) in enumerate(zip(prompts, targets)):
        i = int(record_ids[j]) if record_ids is not None else j
        if not isinstance(prompt, str) or not isinstance(target, str):
            raise ValueError(f"record {i}: prompt and target must be strings, got {type(prompt)} / {type(target)}")
        if not target.strip():
            raise ValueError(f"record {i}: field 'target' is empty")
        text, start = join_prompt_target(prompt, target)
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        is_target = [(s >= start and e > s) for s, e in offsets]
        # a token spanning the boundary (possible only without a separating space) counts as target
        is_target = [t or (s < start < e) for t, (s, e) in zip(is_target, offsets)]
        if not any(is_target):
            raise ValueError(f"record {i}: target {target!r} produced no tokens")
        in_subject = subject_token_indices(prompt, subjects[j] if subjects is not None else None, offsets)
        subject_at = in_subject[-1] if in_subject else None
        if max_length is not None and len(ids) > max_length:
            first_target = is_target.index(True)
            n_target = len(ids) - first_target
            if n_target >= max_length:
                raise ValueError(f"record {i}: target needs {n_target} tokens, more than max_length={max_length}")
            cut = len(ids) - max_length
            ids, is_target = ids[cut:], is_target[cut:]
            subject_at = None if subject_at is None or subject_at < cut else subject_at - cut
        rows.append((ids, is_target, subject_at))
    width = max(len(ids) for ids, _, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = len(rows)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    target_mask = torch.zeros((batch, width), dtype=torch.bool)
    subject_mask = torch.zeros((batch, width), dtype=torch.bool) if subjects is not None else None
    for b, (ids, is_target, subject_at) in enumerate(rows):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
        attention[b, sl] = 1
        target_mask[b, sl] = torch.tensor(is_target, dtype=torch.bool)
        if subject_mask is not None and subject_at is not None:
            subject_mask[b, sl.start + subject_at] = True
    labels = torch.where(target_mask, input_ids, torch.full_like(input_ids, -100))
    return PromptTargetBatch(input_ids, attention, labels, target_mask, subject_mask)


def subject_token_indices(prompt: str, subject: str | None, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the tokens (character ``offsets`` of a tokenisation of text starting with ``prompt``) that
    overlap the subject's first occurrence in ``prompt``; [] when the subject is None or absent."""
    at = prompt.find(subject) if subject else -1
    if at < 0:
        return []
    end = at + len(subject)  # type: ignore[arg-type]
    return [t for t, (s, e) in enumerate(offsets) if e > s and s < end and e > at]


def text_windows(tok, path, *, n_windows: int, window: int, skip: int = 0) -> torch.Tensor:
    """``n_windows * window`` tokens of a UTF-8 text file, after its first ``skip`` tokens, as a
    ``(n_windows, window)`` tensor (no special tokens; only as much text as needed is tokenised). Used for held-out
    perplexity, the key statistics of :mod:`easyedit_agrade.core.preserved_stats` and (``skip`` = the statistics'
    tokens) the held-out text of :mod:`easyedit_agrade.core.heldout`."""
    from pathlib import Path

    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    need = skip + n_windows * window
    text = Path(path).read_text(encoding="utf-8")
    chars = max(need * 8, 4096)
    while True:
        ids = tok(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"{path}: only {len(ids)} tokens, {need} needed for {n_windows} windows of {window}"
                         + (f" after the first {skip}" if skip else ""))
    return torch.tensor(ids[skip:need], dtype=torch.long).view(n_windows, window)


def spread_windows(tok, path, *, n_windows: int, window: int, skip: int = 0) -> torch.Tensor:
    """``n_windows`` windows of ``window`` tokens evenly spaced over a UTF-8 text file after its first ``skip``
    tokens, as a ``(n_windows, window)`` tensor (the whole file is tokenised, no special tokens). Window i starts at
    slot ⌊i·S/n⌋ of the S = ⌊(tokens − skip)/window⌋ whole windows there, so the sample covers every part of the
    text instead of one article — the held-out text of :mod:`easyedit_agrade.core.heldout`."""
    from pathlib import Path

    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    ids = tok(Path(path).read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    slots = max(len(ids) - skip, 0) // window
    if slots < n_windows:
        raise ValueError(f"{path}: only {slots} windows of {window} tokens after the first {skip} "
                         f"({len(ids)} tokens), {n_windows} needed")
    starts = [skip + (i * slots // n_windows) * window for i in range(n_windows)]
    return torch.tensor([ids[s:s + window] for s in starts], dtype=torch.long)


def check_prompt_targets(tok, prompts: Sequence[str], targets: Sequence[str], *, max_length: int | None) -> None:
    """Tokenise every pair on its own, as :func:`encode_prompt_target` would, so that a bad pair raises its
    ``ValueError`` with the caller's index (``record i`` = position in ``prompts``) — before any micro-batching or
    length sorting, and before a weight is touched."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        encode_prompt_target(tok, [prompt], [target], max_length=max_length, record_ids=[i])
