"""Whether EasyEdit is importable, and its ``HyperParams`` base class — what :mod:`easyedit_agrade.hparams` needs
from EasyEdit to give our hyperparameter dataclasses EasyEdit's base (so ``isinstance`` checks in EasyEdit hold).

A leaf: imports nothing of this package (the method hparams reach it through ``hparams.hyperparams_base``; the
import contract in setup.cfg names that one edge). ``easyeditor`` is imported only when a function runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

DISABLE_EASYEDIT_ENV = "EASYEDIT_AGRADE_NO_EASYEDIT"


def easyedit_available() -> bool:
    """True when ``easyeditor`` can be imported (and has not been disabled through the environment)."""
    if os.environ.get(DISABLE_EASYEDIT_ENV, "") not in ("", "0"):
        return False
    if "easyeditor" in sys.modules:
        return sys.modules["easyeditor"] is not None
    return importlib.util.find_spec("easyeditor") is not None


def easyedit_hyperparams_class() -> type | None:
    """EasyEdit's ``easyeditor.util.hparams.HyperParams``; None when EasyEdit is unavailable or fails to import
    (a broken EasyEdit install must not break our own code paths)."""
    if not easyedit_available():
        return None
    try:
        return importlib.import_module("easyeditor.util.hparams").HyperParams
    except Exception:
        return None
