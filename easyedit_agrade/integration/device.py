"""EasyEdit's ``device`` field on a machine without CUDA.

The shipped YAMLs say ``device: 0`` (a CUDA index, EasyEdit's convention). Without CUDA:

* an **upstream** EasyEdit checkout resolves every device through ``easyeditor.util.device.normalize_device``,
  which maps an index to ``cuda:<index>`` (``RuntimeError: Found no NVIDIA driver``) and understands ``"cpu"``:
  :func:`resolve_device` turns the index into ``"cpu"``, so the YAMLs work unchanged;
* the **PyPI wheel** formats ``f"cuda:{device}"`` itself (``"cpu"`` would become ``"cuda:cpu"``): the index is
  kept and its CUDA calls are run under :func:`~easyedit_agrade.integration.cpu_compat.cuda_on_cpu`.

With CUDA available nothing changes. Applied to our hyperparameters when a ``BaseEditor`` is built
(:func:`~easyedit_agrade.integration.preloaded.adapt_hparams`) and by
:func:`~easyedit_agrade.integration.baselines.load_easyedit_hparams`.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

LOG = logging.getLogger(__name__)


def _upstream_loaded() -> bool:
    """True when an upstream EasyEdit (with ``normalize_device``) is imported or importable."""
    from .easyedit_hparams_base import easyedit_available

    if not easyedit_available():
        return False
    try:
        return hasattr(importlib.import_module("easyeditor.util.device"), "normalize_device")
    except Exception:  # no EasyEdit, the PyPI wheel (no util.device), or a broken install
        return False


def resolve_device(device: Any) -> Any:
    """``"cpu"`` for a CUDA index (int or digit string) when CUDA is unavailable and EasyEdit is the upstream
    generation; ``device`` unchanged otherwise."""
    is_index = (isinstance(device, int) and not isinstance(device, bool)) or (
        isinstance(device, str) and device.strip().isdigit())
    if not is_index:
        return device
    import torch

    if torch.cuda.is_available() or not _upstream_loaded():
        return device
    LOG.info("device %r: no CUDA on this machine, using the CPU (upstream EasyEdit)", device)
    return "cpu"
