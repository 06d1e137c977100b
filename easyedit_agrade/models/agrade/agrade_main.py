"""EasyEdit executor for AGRADE: ``apply_agrade_to_model`` (EasyEdit's ``apply_to_model`` contract).

* The trained archive is found (``hparams.archive`` or the shipped one under ``archives/``), fingerprint-checked
  and loaded once per (path, mtime, dtype); later calls reuse it. The network is in eval mode: its input
  normaliser is frozen, nothing about it changes between calls.
* Requests are edited in chunks of ``hparams.batch_size`` (one cache pass + one solve per chunk; later chunks are
  computed on the model already edited by earlier ones). ``BaseEditor.batch_edit`` chunks by the same field.
* All or nothing: every request is checked first (fields, and ``prompt + target`` within ``hparams.max_length``
  tokens — a longer one is an error naming its index, never cut), and any exception while the chunks are applied
  restores the original weights exactly before it propagates.
* Returns ``(model, weights_copy)``: ``weights_copy`` maps parameter names to exact clones of the original weights
  (EasyEdit restores with ``param[...] = v``; :func:`easyedit_agrade.core.weights.restore_weights` does the same
  and also removes fp32 hooks). ``apply_mode: auto`` writes ΔW into the weights for every dtype (16-bit weights:
  ``round(w₃₂ + ΣΔW)`` from an fp32 master kept across the chunks of one call, cast once), because EasyEdit's
  ``param[...] = v`` cannot remove a hook; both restores are then exact copies (see
  :func:`easyedit_agrade.core.weights.executor_apply_mode`).
* ``weights_copy`` is an :class:`~easyedit_agrade.core.edit_report.EditedWeights` dict whose ``.report`` says what
  the call did: ‖ΔW‖/‖W‖ per module and the target rows the outlier guards suppressed (a warning when that is
  all of them: ΔW = 0). A chunk whose ΔW exceeds ``hparams.max_delta_ratio`` is refused before it is applied
  and the weights of earlier chunks are restored (:func:`~easyedit_agrade.core.edit_report.refuse_large_deltas`).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ...core.archive_cache import ArchiveCache
from ...core.executor import check_requests, edit_in_chunks, run_easyedit_executor
from ...dataset.readers import records_from_requests
from .agrade_hparams import AGRADEHyperParams
from .archive import ArchiveMismatchError, ArchiveNotFoundError, build_networks, find_archive, load_networks
from .guards import CountingAGRADEEditor, note_heldout, note_suppressed

__all__ = ["apply_agrade_to_model", "execute_agrade", "ArchiveNotFoundError", "ArchiveMismatchError",
           "clear_archive_cache"]

_ARCHIVES = ArchiveCache()


def clear_archive_cache() -> None:
    _ARCHIVES.clear()


def _networks_for(model, hparams: AGRADEHyperParams):
    """The archive's network for ``model`` (loaded and checked once per model object, see
    :mod:`easyedit_agrade.core.archive_cache`)."""
    return _ARCHIVES.networks_for(model, hparams, find_archive, load_networks)


def execute_agrade(model, tok, requests, hparams: AGRADEHyperParams, nets=None,
                   collective=None) -> dict[str, torch.Tensor]:
    """Apply AGRADE edits for ``requests`` to ``model`` in place; return the original weights.

    Data-parallel (``collective`` with several ranks; default: the initialised ``torch.distributed`` group, if
    any): every rank passes the *same* requests, caches H and ∇G only for its shard of each chunk
    (``chunk[rank::world_size]``), the Gram, HᵀG and eq 4's products are summed over ranks, and every rank applies
    the same ΔW — equal to the single-process edit up to rounding (``tests/distributed``).
    """
    from ...distributed.collective import get_collective

    coll = collective if collective is not None else get_collective()
    if nets is None and hparams.uses_value_search():
        nets = build_networks(model, hparams)  # the edit-time value search uses no trained network
    elif nets is None:
        nets, _ = _networks_for(model, hparams)
    records = records_from_requests(requests)
    check_requests(tok, [r.prompt for r in records], [r.target_new for r in records], hparams.max_length,
                   method="AGRADE")
    stage_hp = hparams.network_stage_hparams()  # value edit, then a trained network's: its archive, cached too
    stage_nets = _networks_for(model, stage_hp)[0] if stage_hp is not None else None
    editor = CountingAGRADEEditor(model, tok, hparams, nets, stage_nets=stage_nets)

    def edit_chunk(start: int, stop: int, report) -> dict[str, torch.Tensor]:
        chunk = coll.shard(records[start:stop])
        result = editor.edit_deltas([r.prompt for r in chunk], [r.target_new for r in chunk], collective=coll,
                                   subjects=[r.subject for r in chunk])
        note_suppressed(editor, report)  # warns when the outlier guards left nothing to edit
        note_heldout(result.rounds, report)  # the perplexity guard (the editor warned if it scaled a round)
        if result.values:
            report.value_search.append(dict(result.values, n_requests=len(chunk)))
        return result.deltas

    warn_sequential_chunks(len(records), int(hparams.batch_size))
    return edit_in_chunks(model, hparams, "AGRADE", len(records), edit_chunk)


def warn_sequential_chunks(n_requests: int, batch_size: int) -> None:
    """A RuntimeWarning when one call edits its requests in more than one chunk of ``batch_size``: each chunk is
    solved on the model the earlier chunks edited, and the preserved-change budget and the guards hold per chunk,
    so the damage adds up (the benchmark's 2,048 mixed edits as 8 chunks of 256: perplexity 15×; in one solve
    1.14×, docs/evaluation.md)."""
    chunks = math.ceil(n_requests / batch_size)
    if chunks > 1:
        warnings.warn(f"AGRADE: {n_requests} requests are edited in {chunks} sequential chunks of batch_size="
                      f"{batch_size}; every chunk is solved on the model the earlier ones edited and the preserved-"
                      f"change budget holds per chunk, so their damage adds up. Set batch_size >= {n_requests} to "
                      f"edit them in one solve", RuntimeWarning, stacklevel=5)


def apply_agrade_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                          keep_original_weight=False, **kwargs: Any):
    """Edit ``model`` with AGRADE for ``requests`` (EasyEdit request dicts); returns ``(model, weights_copy)``.

    ``copy=True`` edits a deep copy. ``weights_copy`` holds the original weights when ``return_orig_weights``
    is true, else it is empty. ``keep_original_weight`` is accepted for EasyEdit's signature; each call's ΔW is
    computed for the model as it is when called.
    """
    return run_easyedit_executor(execute_agrade, model, tok, requests, hparams, copy=copy,
                                 return_orig_weights=return_orig_weights)
