"""easyedit-agrade: AGRADE and InstructEdit knowledge editors for EasyEdit.

``import easyedit_agrade`` is cheap: EasyEdit, triton and matplotlib are imported only where used. The methods
register into EasyEdit automatically when EasyEdit is (or later gets) imported; :func:`register` does it
explicitly.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from .registry import lazy_exports

__version__ = "0.1.0"


def register(force: bool = False) -> bool:
    """Register AGRADE and InstructEdit into EasyEdit (idempotent); False when EasyEdit is not importable."""
    from .integration.easyedit import register as _register

    return _register(force=force)


# public name -> module that defines it (imported on first attribute access); the methods' names come from the
# one method table (registry.py)
_LAZY = {
    **lazy_exports(),
    "cuda_on_cpu": "easyedit_agrade.integration.cpu_compat",
    "as_easyedit_model_name": "easyedit_agrade.integration.preloaded",
    "PreloadedModel": "easyedit_agrade.integration.preloaded",
    "load_model_and_tokenizer": "easyedit_agrade.lm",
    "ensure_embedded_model": "easyedit_agrade.lm",
    "EMBEDDED_MODEL": "easyedit_agrade.lm",
    "batch_edit_all_chunks": "easyedit_agrade.integration.easyedit",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'easyedit_agrade' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["__version__", "register", *_LAZY]

if os.environ.get("EASYEDIT_AGRADE_NO_AUTOREGISTER", "") in ("", "0"):
    from ._autoregister import install as _install_autoregister

    _install_autoregister()
