"""Register into EasyEdit automatically, without importing EasyEdit ourselves.

``import easyedit_agrade`` must stay cheap, yet a user who then does ``from easyeditor import BaseEditor`` expects
``alg_name: AGRADE`` to work. If ``easyeditor`` is already imported we register at once; otherwise a tiny
meta-path finder waits for ``easyeditor`` to finish importing and registers then. Nothing happens when EasyEdit
is not installed.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _safe_register() -> None:
    from .integration.easyedit import register

    try:
        register()
    except Exception as exc:  # never break the user's `import easyeditor`
        warnings.warn(f"easyedit_agrade could not register into EasyEdit: {exc!r}", RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Wraps the loader of the top-level ``easyeditor`` package; registers when its import completes."""

    def __init__(self) -> None:
        self._inner = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "easyeditor" or self._inner is not None:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        try:
            self._inner.exec_module(module)
        finally:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        _safe_register()


def install() -> None:
    """Register now if EasyEdit is loaded, else once it is imported."""
    mod = sys.modules.get("easyeditor")
    if mod is not None:
        _safe_register()
        return
    if any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RegisterAfterImport())
