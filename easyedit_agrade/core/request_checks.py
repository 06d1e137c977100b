"""Checks an executor runs on *all* of a call's requests before any weight is written.

The editors tokenise each chunk only when they reach it; a request that would fail there (a target longer than
``max_length``) or be cut silently (a prompt that does not fit) must be found before the first chunk's ΔW goes in.
"""
from __future__ import annotations

from typing import Sequence

from .tokenize import join_prompt_target


def check_lengths(tok, prompts: Sequence[str], targets: Sequence[str], max_length: int | None, *,
                  method: str) -> None:
    """Raise ``ValueError`` naming the request (its index in this call) and the limit when ``prompt + target``
    is longer than ``max_length`` tokens, counted as the editors tokenise (``None``: no limit)."""
    if max_length is None:
        return
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        text, _ = join_prompt_target(prompt, target)
        n = len(tok(text, add_special_tokens=True)["input_ids"])
        if n > max_length:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise ValueError(f"{method}: request {i} ({shown!r}) is {n} tokens (prompt + target), more than "
                             f"max_length={max_length} of its hparams; shorten the prompt or raise max_length "
                             "(nothing was edited)")
