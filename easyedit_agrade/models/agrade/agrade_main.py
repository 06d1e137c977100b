"""EasyEdit executor for AGRADE: ``apply_agrade_to_model`` (EasyEdit's ``apply_to_model`` contract).

* The trained archive is found (``hparams.archive`` or the shipped one under ``archives/``), fingerprint-checked
  and loaded once per (path, mtime, dtype); later calls reuse it. The network is in eval mode: its input
  normaliser is frozen, nothing about it changes between calls.
* Requests are edited in chunks of ``hparams.batch_size`` (one cache pass + one solve per chunk; later chunks are
  computed on the model already edited by earlier ones). ``BaseEditor.batch_edit`` chunks by the same field.
* Returns ``(model, weights_copy)``: ``weights_copy`` maps parameter names to exact clones of the original weights
  (EasyEdit restores with ``param[...] = v``; :func:`easyedit_agrade.core.weights.restore_weights` does the same
  and also removes fp32 hooks). ``apply_mode: auto`` writes ΔW into the weights for every dtype (16-bit weights:
  ``round(w₃₂ + ΣΔW)`` from an fp32 master kept across the chunks of one call, cast once), because EasyEdit's
  ``param[...] = v`` cannot remove a hook; both restores are then exact copies (see
  :func:`easyedit_agrade.core.weights.executor_apply_mode`).
"""
from __future__ import annotations

import copy as _copy
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from ...core.weights import apply_deltas, executor_apply_mode
from ...dataset.readers import records_from_requests
from .agrade_hparams import AGRADEHyperParams
from .archive import ArchiveMismatchError, ArchiveNotFoundError, find_archive, load_networks
from .editor import AGRADEEditor

__all__ = ["apply_agrade_to_model", "execute_agrade", "ArchiveNotFoundError", "ArchiveMismatchError",
           "clear_archive_cache"]

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def clear_archive_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def _networks_for(model, hparams: AGRADEHyperParams):
    """The archive's network for ``model``. The archive is located and fingerprint-checked the first time a given
    model object is edited with it (later calls — e.g. sequential edits on the already-edited model — reuse it)."""
    dtype = torch.float64 if hparams.editor_dtype == "float64" else torch.float32
    device = next(model.parameters()).device
    hkey = (id(model), str(hparams.archive), tuple(hparams.inner_params), hparams.rank, hparams.n_blocks,
            str(dtype), str(device))
    with _LOCK:
        hit = _CACHE.get(("model",) + hkey)
        if hit is not None and hit[0]() is model:
            return hit[1], hit[2]
    path = find_archive(model, hparams)
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns, str(dtype), str(device))
    with _LOCK:
        nets = _CACHE.get(key)
        if nets is None:
            nets = load_networks(path, model, hparams, dtype=dtype).to(device)
            _CACHE[key] = nets
        _CACHE[("model",) + hkey] = (weakref.ref(model), nets, path)
    return nets, path


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
    if nets is None:
        nets, _ = _networks_for(model, hparams)
    records = records_from_requests(requests)
    editor = AGRADEEditor(model, tok, hparams, nets)
    weights_copy: dict[str, torch.Tensor] = {}
    masters: dict[str, torch.Tensor] = {}  # fp32 sums for 16-bit weights: each chunk's ΔW is rounded in once
    mode = executor_apply_mode(hparams.apply_mode)
    for start in range(0, len(records), hparams.batch_size):
        chunk = coll.shard(records[start:start + hparams.batch_size])
        result = editor.edit_deltas([r.prompt for r in chunk], [r.target_new for r in chunk], collective=coll)
        apply_deltas(model, result.deltas, mode=mode, weights_copy=weights_copy, masters=masters)
    return weights_copy


def apply_agrade_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                          keep_original_weight=False, **kwargs: Any):
    """Edit ``model`` with AGRADE for ``requests`` (EasyEdit request dicts); returns ``(model, weights_copy)``.

    ``copy=True`` edits a deep copy. ``weights_copy`` holds the original weights when ``return_orig_weights``
    is true, else it is empty. ``keep_original_weight`` is accepted for EasyEdit's signature; each call's ΔW is
    computed for the model as it is when called.
    """
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        return model, {}
    if copy:
        model = _copy.deepcopy(model)
    weights_copy = execute_agrade(model, tok, requests, hparams)
    return model, (weights_copy if return_orig_weights else {})
