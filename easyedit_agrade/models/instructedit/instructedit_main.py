"""EasyEdit executor for InstructEdit: ``apply_instructedit_to_model`` (EasyEdit's ``apply_to_model`` contract).

* The trained editor archive (``hparams.archive`` or the shipped one under ``archives/``) is fingerprint-checked,
  loaded once per (path, mtime, dtype, device) and used in eval mode (frozen normaliser).
* Prompts: a prompt already in the instruction template (see :func:`.instructions.wrap_requests`, the way to get
  EasyEdit's pre- and post-edit metrics on the instructed prompt) is used as is. An unwrapped prompt is wrapped
  here, for computing the edit only, with ``request["task"]`` or ``hparams.task`` and ``hparams.instruction_index``.
  The request dicts are **never changed**, so ``BaseEditor``'s pre and post metrics always see the same prompt.
  With ``use_instruction: false`` (multi-task MEND) nothing is wrapped.
* Requests are edited in chunks of ``hparams.batch_size`` (one ΔW per chunk, applied before the next chunk).
* All or nothing: every request is checked first (fields, task, and the edit prompt as the editor sees it plus
  the target within ``hparams.max_length`` tokens — a longer one is an error naming its index, never cut), and any
  exception while the chunks are applied restores the original weights exactly before it propagates.
* Returns ``(model, weights_copy)`` with exact clones of the original weights (bit-exact restore with
  ``param[...] = v`` or :func:`easyedit_agrade.core.weights.restore_weights`). ``apply_mode: auto`` writes ΔW
  into the weights for every dtype (16-bit weights: fp32 master, cast once) since EasyEdit's ``param[...] = v``
  cannot remove a forward hook (:func:`easyedit_agrade.core.weights.executor_apply_mode`). Its ``.report``
  (:class:`~easyedit_agrade.core.edit_report.EditReport`) holds ‖ΔW‖/‖W‖ per module; a chunk beyond
  ``hparams.max_delta_ratio`` is refused with the weights of earlier chunks restored.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ...core.archive_cache import ArchiveCache
from ...core.executor import check_requests, edit_in_chunks, run_easyedit_executor
from .archive import ArchiveMismatchError, ArchiveNotFoundError, find_archive, load_networks
from .editor import InstructEditEditor
from .instructedit_hparams import InstructEditHyperParams
from .instructions import is_wrapped, load_instructions, sentiment_label

__all__ = ["apply_instructedit_to_model", "execute_instructedit", "instructed_prompts", "ArchiveNotFoundError",
           "ArchiveMismatchError", "clear_archive_cache"]

_ARCHIVES = ArchiveCache()


def clear_archive_cache() -> None:
    _ARCHIVES.clear()


def networks_for(model, hparams: InstructEditHyperParams):
    """The archive's network for ``model`` (loaded and checked once per model object, see
    :mod:`easyedit_agrade.core.archive_cache`)."""
    return _ARCHIVES.networks_for(model, hparams, find_archive, load_networks, extra_key=(bool(hparams.use_instruction),))


def instructed_prompts(requests: Sequence[dict], hparams: InstructEditHyperParams) -> list[str]:
    """The edit prompt of each request as the editor sees it (wrapped unless already wrapped or instructions off)."""
    out = []
    for i, req in enumerate(requests):
        if not isinstance(req, dict):
            raise ValueError(f"request {i}: expected a dict, got {type(req).__name__}")
        for key in ("prompt", "target_new"):
            if not isinstance(req.get(key), str) or not req[key].strip():
                raise ValueError(f"request {i}: field {key!r} is missing or empty")
        prompt = req["prompt"]
        if not hparams.use_instruction or is_wrapped(prompt):
            out.append(prompt)
            continue
        task = req.get("task") or hparams.task
        if task is None:
            raise ValueError(f"request {i}: InstructEdit needs the task for the instruction: wrap the requests "
                             "with easyedit_agrade.models.instructedit.wrap_requests(...), or set `task:` in the "
                             "hparams (or use_instruction: false)")
        ins = load_instructions(hparams.instructions_path)
        label = req.get("label") or (sentiment_label(req["target_new"]) if task == "convsent" else None)
        out.append(ins.wrap(prompt, task, hparams.instruction_index, label=label, topic=req.get("subject")))
    return out


def execute_instructedit(model, tok, requests, hparams: InstructEditHyperParams, nets=None) -> dict[str, torch.Tensor]:
    """Apply InstructEdit edits for ``requests`` to ``model`` in place; return the original weights."""
    if nets is None:
        nets, _ = networks_for(model, hparams)
    prompts = instructed_prompts(requests, hparams)
    targets = [r["target_new"] for r in requests]
    check_requests(tok, prompts, targets, hparams.max_length, method="InstructEdit")
    editor = InstructEditEditor(model, tok, hparams, nets)

    def edit_chunk(start: int, stop: int, report) -> dict[str, torch.Tensor]:
        return editor.edit_deltas(prompts[start:stop], targets[start:stop])

    return edit_in_chunks(model, hparams, "InstructEdit", len(prompts), edit_chunk)


def apply_instructedit_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                                keep_original_weight=False, **kwargs: Any):
    """Edit ``model`` with InstructEdit for ``requests`` (EasyEdit request dicts); returns ``(model, weights_copy)``.

    ``copy=True`` edits a deep copy. ``weights_copy`` holds the original weights when ``return_orig_weights`` is
    true, else it is empty. ``keep_original_weight`` and extra keywords are accepted for EasyEdit's signature.
    """
    return run_easyedit_executor(execute_instructedit, model, tok, requests, hparams, copy=copy,
                                 return_orig_weights=return_orig_weights)
