"""EasyEdit's ``BaseEditor`` for the faces (demo, bench, ``edit``): build it, on a given or an already-loaded model,
and watch its per-request evaluation. ``easyeditor`` is imported only when these functions run.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Any, Iterator

from .baseline_compat import ensure_model_parallel_field
from .easyedit import register
from .preloaded import PreloadedModel


def editor_module() -> Any:
    """``easyeditor.editors.editor`` (the module that defines ``BaseEditor`` and calls ``compute_edit_quality``)."""
    return importlib.import_module("easyeditor.editors.editor")


def base_editor_from_hparams(hparams: Any) -> Any:
    """``BaseEditor.from_hparams(hparams)`` with our methods registered first (wrap it in ``cuda_on_cpu()`` on a
    machine without CUDA, with the PyPI wheel, together with the editing calls that follow)."""
    register()
    return editor_module().BaseEditor.from_hparams(hparams)


def base_editor_on_loaded_model(hparams: Any, model: Any, tok: Any, model_alias: str) -> Any:
    """``BaseEditor`` on an already-loaded model, built from a *copy* of ``hparams`` (whose ``model_name``
    becomes a :class:`PreloadedModel`): EasyEdit writes into the hparams it is given (``BaseEditor.edit`` sets
    ``batch_size = 1``, ``model_parallel`` rewrites ``device``), and the caller's object must not change.
    Use ``editor.hparams`` afterwards."""
    from .cpu_compat import cuda_on_cpu  # imports torch

    register()
    hparams = copy.deepcopy(hparams)
    if ensure_model_parallel_field(hparams):
        hparams._easyedit_agrade_added_model_parallel = True
    hparams.model_name = PreloadedModel(model_alias, model, tok)
    with cuda_on_cpu():
        editor = editor_module().BaseEditor.from_hparams(hparams)
    # the padding side for hparams.alg_name is set by BaseEditor itself (integration.preloaded.patch_base_editor)
    return editor


@contextlib.contextmanager
def counting_edit_evaluations(bar: Any) -> Iterator[None]:
    """While active, every call of EasyEdit's per-request ``compute_edit_quality`` ticks ``bar`` (``bar.update(1)``;
    ``BaseEditor.batch_edit``'s evaluation has no progress bar of its own)."""
    module = editor_module()
    original = module.compute_edit_quality

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            bar.update(1)

    module.compute_edit_quality = wrapper
    try:
        yield
    finally:
        module.compute_edit_quality = original
