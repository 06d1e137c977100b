"""What every hypernetwork method's EasyEdit executor (``apply_<method>_to_model``) does the same way.

* :func:`check_requests` — all of a call's requests are checked (``prompt + target`` within ``max_length`` tokens,
  then the tokenisation itself) before any weight is written; errors name the request's index in the call.
* :func:`edit_in_chunks` — requests are edited in chunks of ``hparams.batch_size``; each chunk's ΔW (computed by
  the method on the model as earlier chunks left it) is checked against ``hparams.max_delta_ratio`` and written
  with :func:`~easyedit_agrade.core.weights.apply_deltas` (``apply_mode: auto`` → in place for every dtype, fp32
  masters for 16-bit weights: :func:`~easyedit_agrade.core.weights.executor_apply_mode`). All or nothing: any
  exception restores the original weights exactly before it propagates. Returns the
  :class:`~easyedit_agrade.core.edit_report.EditedWeights` (the originals, with the call's ``.report``).
* :func:`run_easyedit_executor` — EasyEdit's ``apply_to_model`` contract around a method's ``execute``: one request
  dict or a list, ``copy=True`` edits a deep copy, ``weights_copy`` only when ``return_orig_weights``.
"""
from __future__ import annotations

import copy as _copy
from typing import Callable, Sequence

import torch
from torch import nn

from .edit_report import EditedWeights, EditReport, refuse_large_deltas, remember
from .request_checks import check_lengths
from .tokenize import check_prompt_targets
from .weights import apply_deltas, executor_apply_mode, restore_weights

#: ``edit_chunk(start, stop, report)`` → ΔW per module (editor layout) for requests ``start:stop`` of the call
ChunkEditor = Callable[[int, int, EditReport], "dict[str, torch.Tensor]"]


def check_requests(tok, prompts: Sequence[str], targets: Sequence[str], max_length: int | None, *,
                   method: str) -> None:
    """Raise ``ValueError`` naming the request (its index in this call) when ``prompt + target`` is longer than
    ``max_length`` tokens or cannot be tokenised as the editors do (nothing has been edited yet)."""
    check_lengths(tok, prompts, targets, max_length, method=method)
    check_prompt_targets(tok, prompts, targets, max_length=max_length)  # other tokenisation errors: the index too


def edit_in_chunks(model: nn.Module, hparams, method: str, n_requests: int, edit_chunk: ChunkEditor) -> EditedWeights:
    """Apply ``edit_chunk``'s ΔW for each chunk of ``hparams.batch_size`` requests to ``model`` in place (see the
    module docstring); return the original weights with the call's report."""
    weights_copy = EditedWeights(report=EditReport(method, n_requests=n_requests))  # + what the call did
    masters: dict[str, torch.Tensor] = {}  # fp32 sums for 16-bit weights: each chunk's ΔW is rounded in once
    mode = executor_apply_mode(hparams.apply_mode)
    try:
        for start in range(0, n_requests, hparams.batch_size):
            deltas = edit_chunk(start, start + hparams.batch_size, weights_copy.report)
            refuse_large_deltas(model, deltas, hparams.max_delta_ratio, weights_copy.report, weights_copy)
            apply_deltas(model, deltas, mode=mode, weights_copy=weights_copy, masters=masters)
            weights_copy.report.chunks += 1
    except BaseException:
        restore_weights(model, weights_copy)  # all or nothing: earlier chunks are taken out again
        raise
    remember(model, weights_copy.report)
    return weights_copy


def run_easyedit_executor(execute: Callable[..., EditedWeights], model: nn.Module, tok, requests, hparams, *,
                          copy: bool = False, return_orig_weights: bool = False):
    """``(model, weights_copy)`` of EasyEdit's ``apply_to_model`` for ``execute(model, tok, requests, hparams)``.

    ``copy=True`` edits a deep copy. ``weights_copy`` holds the original weights when ``return_orig_weights``
    is true, else it is empty (its ``.report`` still says what the call did)."""
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        return model, {}
    if copy:
        model = _copy.deepcopy(model)
    weights_copy = execute(model, tok, requests, hparams)
    return model, (weights_copy if return_orig_weights else EditedWeights(report=weights_copy.report))
