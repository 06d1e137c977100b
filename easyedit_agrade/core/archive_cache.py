"""Load a trained editor archive once per model object (shared by the AGRADE and InstructEdit executors).

The archive is located and fingerprint-checked the first time a given model object is edited with it; later calls
on the same object reuse that result. The fingerprint covers the *values* of the edited weights, so re-checking it
would reject a model the executor has already edited (sequential editing: ``batch_size: 1``, or
``BaseEditor.edit(..., sequential_edit=True)``).

Both caches are keyed on everything that changes which network applies — the hparams' ``ARCHIVE_KEYS`` (shape,
``preset``, the ``use_*`` switches, …) plus the fields the finder and loader read (``archive``, ``model_name``,
``editor_dtype``) and the device — and on the archive file's identity (resolved path, device, inode, size,
mtime_ns): replacing the file at the same path, or switching a hparam, never reuses a stale network. A cached
per-model entry whose file changed is dropped and the archive is found and checked again.
"""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

#: hparams fields the finders/loaders read besides the class's ARCHIVE_KEYS
LOADER_KEYS = ("archive", "model_name", "inner_params", "rank", "n_blocks", "editor_dtype")


def hparams_key(hparams) -> tuple:
    """The hparams that decide which network applies and how it is built (``ARCHIVE_KEYS`` + :data:`LOADER_KEYS`)."""
    keys = sorted(set(getattr(type(hparams), "ARCHIVE_KEYS", ())) | set(LOADER_KEYS))
    return tuple((k, repr(getattr(hparams, k, None))) for k in keys)


def file_identity(path: str | os.PathLike[str]) -> tuple:
    """(resolved path, st_dev, st_ino, st_size, st_mtime_ns): changes when the file is replaced or rewritten."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ArchiveCache:
    """``networks_for(model, hparams, find, load)`` → ``(nets, path)``, cached as described above."""

    def __init__(self) -> None:
        self._entries: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def networks_for(self, model, hparams, find: Callable, load: Callable, extra_key: tuple = ()):
        """``find(model, hparams)`` locates (and checks) the archive, ``load(path, model, hparams, dtype=)`` builds
        the network; ``extra_key`` adds anything else that changes which network applies."""
        dtype = torch.float64 if hparams.editor_dtype == "float64" else torch.float32
        device = next(model.parameters()).device
        common = (hparams_key(hparams), *extra_key, str(dtype), str(device))
        hkey = ("model", id(model), *common)
        with self._lock:
            hit = self._entries.get(hkey)
        if hit is not None and hit[0]() is model:
            try:
                same_file = file_identity(hit[2]) == hit[3]
            except OSError:
                same_file = False
            if same_file:
                return hit[1], hit[2]
        path = find(model, hparams)
        ident = file_identity(path)
        key = ("file", ident, *common)
        with self._lock:
            nets = self._entries.get(key)
        if nets is None:
            nets = load(path, model, hparams, dtype=dtype).to(device)
        with self._lock:
            self._entries[key] = nets
            self._entries[hkey] = (weakref.ref(model), nets, path, ident)
        return nets, path
