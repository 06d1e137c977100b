"""What EasyEdit's MEND (its trainer and its executor) needs to run on the embedded SmolLM2 on a CPU.

Four gaps, each closed here and nowhere else:

* **Call convention by model name.** EasyEdit's ``MEND.forward``/``MEND.edit`` choose how to call the model by a
  substring of ``config.model_name`` (``'gpt'``, ``'llama'``, ``'baichuan'``, ``'chatglm2'``, ``'internlm'``: call
  with ``input_ids``/``attention_mask`` only). Any other name falls through to ``model(**batch)``, which hands the
  *target* labels (a different length) to the causal LM's own loss and fails. :class:`ArchitectureTaggedName`
  keeps the name's value (a path still loads, ``split('/')`` still works) but its ``lower()`` adds the model's
  architecture, so ``'llama' in name.lower()`` holds for SmolLM2 (``model_type: llama``).
* **``higher`` vs. transformers' layer slicing.** MEND runs the edited model through ``higher``'s monkey-patched
  copy; transformers (4.5x) loops ``for layer in self.layers[: config.num_hidden_layers]``, and slicing a patched
  ``ModuleList`` rebuilds its class, which ``higher``'s patched classes cannot do (``TypeError: ... missing 1
  required positional argument: 'root'``). :func:`module_list_full_slices` makes a slice that covers the whole
  list return the list itself (same modules, same order) while MEND runs.
* **Archives as safetensors.** EasyEdit's MEND archive is a pickle (``torch.save({"model": state_dict, ...})``,
  whose state dict carries the transformers config object). We ship the hypernetwork as safetensors
  (:func:`save_mend_archive`) and hand the executor an in-memory ``{"model": ...}`` built from it
  (:func:`mend_archive_buffer`), loaded with ``torch.load``'s weights-only unpickler and only the model's own
  config class allowed (:func:`allow_model_config`), never a pickle from disk.
* **The trainer's own checkpoint.** ``BaseTrainer.run`` re-loads its best checkpoint with a bare ``torch.load``;
  since torch 2.6 that is weights-only and rejects the config object the checkpoint holds. The file is the one this
  process has just written; :func:`allow_model_config` permits exactly that config class while the trainer runs.

:func:`patch_mend_executor` (applied by :func:`easyedit_agrade.register`, which also re-binds ``ALG_DICT["MEND"]``
with :func:`rebind_mend_entry`) wraps EasyEdit's ``MendRewriteExecutor.apply_to_model`` with the first two (and
re-initialises the singleton executor when it is handed another model or archive) and ``init_model`` with the
first and the third. The trainer (:mod:`.mend_training`) uses the first, second and fourth.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
from pathlib import Path
from typing import Any, Iterator, Mapping

#: substrings of ``model_name`` for which EasyEdit's MEND calls a decoder-only LM with input_ids/attention_mask
DECODER_NAME_KEYS = ("gpt", "llama", "baichuan", "chatglm2", "internlm")
#: ``format`` entry of a shipped MEND archive's safetensors metadata
ARCHIVE_FORMAT = "easyedit-mend-state-dict/1"
SAFETENSORS_SUFFIX = ".safetensors"


class ArchitectureTaggedName(str):
    """A model name (or path) whose ``lower()`` also names the architecture EasyEdit's MEND dispatches on."""

    architecture: str

    def __new__(cls, name: str, architecture: str):
        obj = super().__new__(cls, str(name))
        obj.architecture = str(architecture)
        return obj

    def lower(self) -> str:  # type: ignore[override]
        return f"{str.lower(self)} [{self.architecture.lower()}]"

    def __deepcopy__(self, memo: dict) -> "ArchitectureTaggedName":
        return self

    def __copy__(self) -> "ArchitectureTaggedName":
        return self

    def __reduce__(self):
        return (ArchitectureTaggedName, (str(self), self.architecture))


def mend_dispatch_name(name: Any, model_config: Any) -> Any:
    """``name`` unchanged if EasyEdit's MEND already recognises it, else tagged with the model's architecture.

    A decoder-only model whose ``model_type`` is none of :data:`DECODER_NAME_KEYS` is tagged ``llama``: EasyEdit's
    decoder branches are identical (``input_ids``/``attention_mask`` only). Encoder-decoder models are left alone
    (EasyEdit's ``model(**batch)`` branch is the one meant for them).
    """
    text = str(name).lower()
    if any(key in text for key in DECODER_NAME_KEYS):
        return name
    if getattr(model_config, "is_encoder_decoder", False):
        return name
    model_type = str(getattr(model_config, "model_type", "") or "")
    arch = model_type if any(key in model_type.lower() for key in DECODER_NAME_KEYS) else "llama"
    return ArchitectureTaggedName(str(name), arch)


@contextlib.contextmanager
def module_list_full_slices() -> Iterator[None]:
    """While active, ``module_list[a:b]`` covering every entry returns ``module_list`` itself (other indices as
    usual). Iterating either yields the same modules in the same order; only the rebuilt container is skipped."""
    import torch

    original = torch.nn.ModuleList.__getitem__

    def __getitem__(self, idx):
        if isinstance(idx, slice) and range(len(self))[idx] == range(len(self)):
            return self
        return original(self, idx)

    torch.nn.ModuleList.__getitem__ = __getitem__
    try:
        yield
    finally:
        torch.nn.ModuleList.__getitem__ = original


@contextlib.contextmanager
def allow_model_config(model_config: Any) -> Iterator[None]:
    """While active, ``torch.load``'s weights-only unpickler also accepts ``type(model_config)`` (nothing else)."""
    import torch

    with torch.serialization.safe_globals([type(model_config)]):
        yield


def _mend_tensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of a MEND state dict (``MEND.state_dict()`` adds the non-tensor ``model_config``)."""
    import torch

    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def save_mend_archive(state_dict: Mapping[str, Any], path: str | Path, *, inner_params: list[str],
                      metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a trained MEND hypernetwork (``MEND.state_dict()``, model weights already excluded) as safetensors
    (the project's checkpoint I/O: atomic, with a SHA-256 of the tensors); the metadata records the format, the
    inner params it was trained for and ``metadata``."""
    from ..core.checkpoint import save_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**dict(metadata or {}), "format": ARCHIVE_FORMAT, "inner_params": list(inner_params)}
    save_tensors(path, _mend_tensors(state_dict), meta)
    return path


def read_mend_archive(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, metadata)`` of a safetensors MEND archive (digest and finiteness checked); a clear error for a
    file of another format."""
    from ..core.checkpoint import load_tensors

    tensors, meta = load_tensors(path)
    if meta.get("format") != ARCHIVE_FORMAT:
        raise ValueError(f"{path}: not a MEND archive of format {ARCHIVE_FORMAT!r} "
                         f"(metadata format: {meta.get('format')!r})")
    return tensors, meta


def resolve_archive_path(archive: str | Path) -> Path:
    """An ``archive:`` value as given, or relative to the repository root (where the shipped hparams point)."""
    path = Path(archive).expanduser()
    if path.is_absolute() or path.exists():
        return path
    from ..paths import REPO_ROOT

    return REPO_ROOT / path


def mend_archive_buffer(path: str | Path, model_config: Any, inner_params: list[str]) -> io.BytesIO:
    """The ``{"model": state_dict}`` EasyEdit's MEND executor ``torch.load``s, built in memory from a safetensors
    archive, with ``model_config`` (the live model's config, as ``MEND.state_dict`` stores it).

    Raises ``ValueError`` if the archive was trained for other inner params than ``inner_params``."""
    import torch

    tensors, meta = read_mend_archive(path)
    trained_for = meta.get("inner_params", [])
    if list(trained_for) != list(inner_params):
        raise ValueError(f"{path}: MEND archive trained for inner_params {trained_for}, hparams ask for "
                         f"{list(inner_params)}")
    buffer = io.BytesIO()
    torch.save({"model": {**tensors, "model_config": model_config}}, buffer)
    buffer.seek(0)
    return buffer


def patch_mend_executor(executor_cls: Any) -> None:
    """Wrap ``MendRewriteExecutor`` (once): ``apply_to_model`` and MEND see an architecture-tagged ``model_name``
    (:func:`mend_dispatch_name`) and run under :func:`module_list_full_slices`, and the executor (a singleton in
    ``ALG_DICT``) re-initialises when it is handed another model or archive than it holds; ``init_model`` loads a
    ``.safetensors`` ``archive`` (as given or relative to the repository root) through :func:`mend_archive_buffer`.
    EasyEdit ``.pt`` archives are passed on unchanged. The caller's hparams object is not modified."""
    current = getattr(executor_cls, "init_model", None)
    if current is None or getattr(current, "_easyedit_agrade", False):
        return
    apply_current = executor_cls.apply_to_model

    @functools.wraps(apply_current)
    def apply_to_model(self, model, tok, requests, hparams, *args, **kwargs):
        hparams = copy.copy(hparams)  # the executor also picks its weight-update layout by model_name
        hparams.model_name = mend_dispatch_name(hparams.model_name, model.config)
        # EasyEdit's executor is a process-wide singleton that keeps the first model and archive it saw
        loaded_for = (id(model), str(getattr(hparams, "archive", None)))
        if getattr(self, "is_init", False) and getattr(self, "_easyedit_agrade_loaded_for", None) != loaded_for:
            self.reset_model()
        self._easyedit_agrade_loaded_for = loaded_for
        with module_list_full_slices():
            return apply_current(self, model, tok, requests, hparams, *args, **kwargs)

    @functools.wraps(current)
    def init_model(self, model, tok, params, *args, **kwargs):
        params = copy.copy(params)
        params.model_name = mend_dispatch_name(params.model_name, model.config)
        archive = getattr(params, "archive", None)
        if archive is None or not str(archive).endswith(SAFETENSORS_SUFFIX):
            return current(self, model, tok, params, *args, **kwargs)
        params.archive = mend_archive_buffer(resolve_archive_path(archive), model.config, list(params.inner_params))
        with allow_model_config(model.config):
            return current(self, model, tok, params, *args, **kwargs)

    init_model._easyedit_agrade = True  # type: ignore[attr-defined]
    apply_to_model._easyedit_agrade_original = apply_current  # type: ignore[attr-defined]
    executor_cls.init_model = init_model
    executor_cls.apply_to_model = apply_to_model


def rebind_mend_entry(alg_dict: dict, executor_cls: Any, key: str = "MEND") -> None:
    """EasyEdit's ``ALG_DICT`` holds ``MendRewriteExecutor().apply_to_model`` bound at import time, i.e. the
    unpatched function: re-bind that entry (same executor instance) to the patched ``apply_to_model``."""
    entry = alg_dict.get(key)
    patched = executor_cls.apply_to_model
    original = getattr(patched, "_easyedit_agrade_original", None)
    if original is None or getattr(entry, "__func__", None) is not original:
        return
    if type(entry.__self__) is not executor_cls:  # e.g. the multimodal executor subclass
        return
    alg_dict[key] = patched.__get__(entry.__self__, executor_cls)
