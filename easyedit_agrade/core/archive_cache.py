"""Load a trained editor archive once per model object (shared by the AGRADE and InstructEdit executors).

The archive is located and fingerprint-checked the first time a given model object is edited with it; later calls
on the same object reuse that result. The fingerprint covers the *values* of the edited weights, so re-checking it
would reject a model the executor has already edited (sequential editing: ``batch_size: 1``, or
``BaseEditor.edit(..., sequential_edit=True)``). Loaded networks are also shared between model objects per
(archive path, mtime, dtype, device).
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import torch


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
        the network; ``extra_key`` adds hparams that change which network applies."""
        dtype = torch.float64 if hparams.editor_dtype == "float64" else torch.float32
        device = next(model.parameters()).device
        hkey = ("model", id(model), str(hparams.archive), tuple(hparams.inner_params), hparams.rank,
                hparams.n_blocks, *extra_key, str(dtype), str(device))
        with self._lock:
            hit = self._entries.get(hkey)
            if hit is not None and hit[0]() is model:
                return hit[1], hit[2]
        path = find(model, hparams)
        key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns, str(dtype), str(device))
        with self._lock:
            nets = self._entries.get(key)
            if nets is None:
                nets = load(path, model, hparams, dtype=dtype).to(device)
                self._entries[key] = nets
            self._entries[hkey] = (weakref.ref(model), nets, path)
        return nets, path
