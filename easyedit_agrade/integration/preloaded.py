"""Hand an already-loaded model to EasyEdit's ``BaseEditor`` through ``hparams.model_name``.

EasyEdit (both generations) picks the model class by substring of ``model_name`` (``'gpt'``, ``'llama'``, ...)
and has no branch for a generic Hugging Face causal LM such as SmolLM2; its alternative, passing a
``(model, tokenizer)`` tuple, breaks its own evaluation, which calls ``model_name.lower()``.

:class:`PreloadedModel` satisfies both: it is a ``str`` (the model's name, so ``.lower()`` works), but not
*exactly* ``str`` — so ``BaseEditor`` takes its ``self.model, self.tok = self.model_name`` branch — and iterating
it yields the model and tokenizer, loaded on first use.

Padding. ``BaseEditor`` sets the tokenizer's padding side only in its name-based branch, which a
:class:`PreloadedModel` skips: left for decoder-only models, except for the locate-then-edit methods of
:data:`RIGHT_PADDING_ALGS` (upstream's list in ``editors/editor.py``), whose subject-token lookups assume right
padding (ROME with left padding computes its key at the wrong position and silently does not edit).
:func:`patch_base_editor` (applied by :func:`easyedit_agrade.register`) makes every ``BaseEditor`` built on a
:class:`PreloadedModel` set the side for its ``alg_name``, whichever way the hparams were made.

Our methods' hyperparameters. The same patch first runs :func:`adapt_hparams` on hyperparameters of our editors
(:class:`~easyedit_agrade.core.editor_hparams.EditorHyperParams`): a plain ``model_name`` becomes a
:class:`PreloadedModel` and ``device: 0`` becomes ``"cpu"`` on upstream EasyEdit without CUDA
(:func:`~easyedit_agrade.integration.device.resolve_device`), so ``BaseEditor.from_hparams(
AGRADEHyperParams.from_hparams("hparams/AGRADE/smollm2-135m"))`` works with the YAML as shipped while the
hyperparameter classes themselves know nothing of EasyEdit's quirks.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator

#: methods EasyEdit pads on the right: upstream's ``editors/editor.py`` list (the PyPI wheel has ROME and MEMIT)
RIGHT_PADDING_ALGS = frozenset({"ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE"})


def padding_side_for(alg_name: Any) -> str:
    """``"right"`` for :data:`RIGHT_PADDING_ALGS`, else ``"left"`` (EasyEdit's metrics for decoder-only models)."""
    return "right" if str(alg_name) in RIGHT_PADDING_ALGS else "left"


class PreloadedModel(str):
    """A model name that EasyEdit's ``BaseEditor`` unpacks into ``(model, tokenizer)``."""

    _model: Any
    _tok: Any
    _source: str
    _dtype: Any

    def __new__(cls, name_or_path: str | os.PathLike[str], model: Any = None, tok: Any = None, *, dtype: Any = None):
        obj = super().__new__(cls, str(name_or_path))
        obj._source = str(name_or_path)
        obj._model, obj._tok, obj._dtype = model, tok, dtype
        return obj

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return ``(model, tokenizer)``; the tokenizer pads on the left, as EasyEdit's
        teacher-forced metrics assume for decoder-only models."""
        if self._model is None or self._tok is None:
            from ..lm import load_model_and_tokenizer

            self._model, self._tok = load_model_and_tokenizer(self._source, dtype=self._dtype)
        self._tok.padding_side = "left"
        return self._model, self._tok

    def relabelled(self, label: str) -> "PreloadedModel":
        """The same model (same source, same loaded objects) under another name: the string EasyEdit's substring
        checks see (e.g. with the architecture appended for methods that branch on ``'llama'``)."""
        obj = str.__new__(PreloadedModel, label)
        obj._source, obj._model, obj._tok, obj._dtype = self._source, self._model, self._tok, self._dtype
        return obj

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return iter(self.load())

    def __reduce__(self):  # pickles/deep-copies as the plain name (never copies the model)
        return (PreloadedModel, (self._source,))

    def __deepcopy__(self, memo: dict) -> "PreloadedModel":
        return self  # a name is immutable; the shared model is intentional

    def __copy__(self) -> "PreloadedModel":
        return self


def as_easyedit_model_name(name_or_path: str | os.PathLike[str], model: Any = None, tok: Any = None) -> PreloadedModel:
    """Wrap a model alias/path (optionally with an already-loaded model and tokenizer) for ``hparams.model_name``."""
    if isinstance(name_or_path, PreloadedModel) and model is None:
        return name_or_path
    return PreloadedModel(name_or_path, model, tok)


def adapt_hparams(hparams: Any) -> Any:
    """Make our editors' hyperparameters (:class:`~easyedit_agrade.core.editor_hparams.EditorHyperParams`) fit
    EasyEdit's ``BaseEditor``, in place: a plain-``str`` ``model_name`` (EasyEdit 0.0.1.dev0 cannot load SmolLM2,
    or any model whose name lacks ``'gpt'``/``'llama'``/…, by name) becomes a :class:`PreloadedModel`, so
    ``BaseEditor`` takes its "(model, tokenizer) given" branch and loads it through :mod:`easyedit_agrade.lm`;
    ``device`` goes through :func:`~easyedit_agrade.integration.device.resolve_device`. Other hyperparameters
    (EasyEdit's own classes) are left alone. Returns ``hparams``."""
    from ..core.editor_hparams import EditorHyperParams
    from .device import resolve_device

    if isinstance(hparams, EditorHyperParams):
        if type(hparams.model_name) is str:
            hparams.model_name = PreloadedModel(hparams.model_name)
        hparams.device = resolve_device(hparams.device)  # device: 0 without CUDA on upstream EasyEdit -> "cpu"
    return hparams


def patch_base_editor(base_editor_cls: Any) -> None:
    """Wrap ``BaseEditor.__init__`` (once): our methods' hyperparameters are adapted first (:func:`adapt_hparams`),
    and an editor whose ``hparams.model_name`` is a :class:`PreloadedModel` pads as EasyEdit's name-based branch
    would for ``hparams.alg_name``."""
    current = base_editor_cls.__init__
    if getattr(current, "_easyedit_agrade", False):
        return

    @functools.wraps(current)
    def __init__(self, hparams, *args, **kwargs):
        adapt_hparams(hparams)
        current(self, hparams, *args, **kwargs)
        tok = getattr(self, "tok", None)
        if isinstance(getattr(hparams, "model_name", None), PreloadedModel) and tok is not None:
            tok.padding_side = padding_side_for(getattr(hparams, "alg_name", None))

    __init__._easyedit_agrade = True  # type: ignore[attr-defined]
    base_editor_cls.__init__ = __init__
