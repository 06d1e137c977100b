"""Registration of our methods into EasyEdit — the only module that imports ``easyeditor``.

Two EasyEdit generations are supported:

* ``"pypi"`` — the wheel ``easyeditor==0.0.1.dev0`` (CUDA hard-coded; use :func:`..cpu_compat.cuda_on_cpu`);
* ``"upstream"`` — a current source checkout (has ``easyeditor.util.device.normalize_device`` and the newer
  ``BaseEditor.batch_edit(..., locality_inputs=..., portability_inputs=..., sequential_edit=...)`` signature).

In both, ``easyeditor.util`` is shadowed by another ``util`` after ``import easyeditor``; modules are reached with
``importlib.import_module("easyeditor.util.alg_dict")``.
"""
from __future__ import annotations

import functools
import importlib
import threading
from typing import Any, Callable

from ..registry import METHODS as _METHOD_TABLE
from .preloaded import patch_base_editor

#: EasyEdit ``alg_name`` -> (module, executor function, trainer class) — imported only when called
METHODS: dict[str, tuple[str, str, str]] = {m.alg_name: (m.package, m.executor, m.trainer_class) for m in _METHOD_TABLE}

_lock = threading.RLock()
_registered_with: Any = None  # the ALG_DICT object we registered into (a reloaded EasyEdit gets a fresh one)


def _module(name: str):
    return importlib.import_module(name)


def easyedit_generation() -> str:
    """``"upstream"`` for a current EasyEdit checkout, ``"pypi"`` for the 0.0.1.dev0 wheel."""
    import importlib.util

    _module("easyeditor")
    if importlib.util.find_spec("easyeditor.util.device") is not None:
        device_mod = _module("easyeditor.util.device")
        if hasattr(device_mod, "normalize_device"):
            return "upstream"
    return "pypi"


def _lazy_executor(alg_name: str) -> Callable[..., Any]:
    """An ``apply_to_model`` entry that imports the real executor on first call (keeps registration cheap)."""
    module_name, func_name, _ = METHODS[alg_name]

    def apply_to_model(model, tok, requests, hparams, *args, **kwargs):
        return getattr(_module(module_name), func_name)(model, tok, requests, hparams, *args, **kwargs)

    apply_to_model.__name__ = func_name
    apply_to_model.__qualname__ = func_name
    apply_to_model.__doc__ = f"EasyEdit entry for {alg_name}: forwards to {module_name}.{func_name}."
    return apply_to_model


class _LazyTrainer:
    """Stands in ``ALG_TRAIN_DICT`` for a trainer class; constructing it builds the real trainer."""

    def __init__(self, alg_name: str) -> None:
        self.alg_name = alg_name
        self.module_name, _, self.class_name = METHODS[alg_name]

    def resolve(self) -> type:
        return getattr(_module(self.module_name), self.class_name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<easyedit_agrade trainer {self.module_name}.{self.class_name}>"


def _patch_batchable(batch_editor_cls: Any) -> None:
    """Make ``BatchEditor.is_batchable_method`` accept our methods (wrapping the original, once)."""
    current = batch_editor_cls.is_batchable_method
    if getattr(current, "_easyedit_agrade", False):
        return

    @functools.wraps(current)
    def is_batchable_method(alg_name: str) -> bool:
        return alg_name in METHODS or current(alg_name)

    is_batchable_method._easyedit_agrade = True  # type: ignore[attr-defined]
    is_batchable_method._easyedit_agrade_original = current  # type: ignore[attr-defined]
    batch_editor_cls.is_batchable_method = staticmethod(is_batchable_method)


def _patch_mend(alg_dict: dict) -> None:
    """EasyEdit's MEND executor on the embedded model: architecture-tagged name, safetensors archives."""
    from .mend_compat import patch_mend_executor, rebind_mend_entry

    try:
        mend_main = _module("easyeditor.models.mend.mend_main")
    except ImportError:  # an EasyEdit without MEND
        return
    patch_mend_executor(mend_main.MendRewriteExecutor)
    rebind_mend_entry(alg_dict, mend_main.MendRewriteExecutor)


def register(force: bool = False) -> bool:
    """Add AGRADE and InstructEdit to EasyEdit's ``ALG_DICT``, ``ALG_TRAIN_DICT`` and ``BatchEditor``.

    Idempotent; returns ``False`` (and changes nothing) when EasyEdit is not importable.
    """
    global _registered_with
    with _lock:
        try:
            alg_dict_mod = _module("easyeditor.util.alg_dict")
            train_dict_mod = _module("easyeditor.util.alg_train_dict")
            batch_mod = _module("easyeditor.editors.batch_editor")
        except ImportError:
            return False
        alg_dict = alg_dict_mod.ALG_DICT
        if _registered_with is alg_dict and not force and all(k in alg_dict for k in METHODS):
            return True
        editor_mod = _module("easyeditor.editors.editor")
        for name in METHODS:
            entry = _lazy_executor(name)
            alg_dict[name] = entry
            # editor.py did `from ..util.alg_dict import *`: it holds the same dict object, checked anyway
            getattr(editor_mod, "ALG_DICT", alg_dict)[name] = entry
            train_dict_mod.ALG_TRAIN_DICT[name.upper()] = _LazyTrainer(name)
        _patch_batchable(batch_mod.BatchEditor)
        patch_base_editor(editor_mod.BaseEditor)  # padding side per alg_name for PreloadedModel names (ROME: right)
        _patch_mend(alg_dict)
        _registered_with = alg_dict
        return True


def is_registered() -> bool:
    try:
        alg_dict = _module("easyeditor.util.alg_dict").ALG_DICT
    except ImportError:
        return False
    return all(k in alg_dict for k in METHODS)


def batch_edit_all_chunks(editor: Any, prompts: list[str], target_new: list[str], **kwargs: Any):
    """``editor.batch_edit(...)`` that returns the metrics of **every** chunk.

    EasyEdit's ``BaseEditor.batch_edit`` edits in chunks of ``hparams.batch_size`` but resets its metrics list per
    chunk, so it returns only the last chunk's. This calls it once per chunk (each call a single chunk, edited,
    evaluated and restored exactly as ``batch_edit`` does it) and concatenates the metrics, with ``case_id``
    counted over all requests. Per-request keyword arguments (lists as long as ``prompts``, also inside dicts
    such as ``locality_inputs``) are sliced with them. Returns ``(metrics, model, weights_copy of the last chunk)``.
    """
    n = len(prompts)
    if len(target_new) != n:
        raise ValueError(f"{n} prompts but {len(target_new)} target_new")
    size = max(1, int(getattr(editor.hparams, "batch_size", n) or n))

    def cut(value: Any, sl: slice) -> Any:
        if isinstance(value, (list, tuple)) and len(value) == n:
            return list(value[sl])
        if isinstance(value, dict):
            return {k: cut(v, sl) for k, v in value.items()}
        return value

    metrics: list[dict] = []
    model, weights_copy = editor.model, {}
    for start in range(0, n, size):
        sl = slice(start, start + size)
        chunk_metrics, model, weights_copy = editor.batch_edit(
            prompts=list(prompts[sl]), target_new=list(target_new[sl]), **{k: cut(v, sl) for k, v in kwargs.items()})
        for i, m in enumerate(chunk_metrics):
            m["case_id"] = start + i
        metrics.extend(chunk_metrics)
    return metrics, model, weights_copy
