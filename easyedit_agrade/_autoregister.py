"""Register into EasyEdit automatically, without importing EasyEdit ourselves.

``import easyedit_agrade`` must stay cheap, yet a user who then does ``from easyeditor import BaseEditor`` expects
``alg_name: AGRADE`` to work. If ``easyeditor`` is already imported we register at once; otherwise a tiny
meta-path finder waits for ``easyeditor`` to finish importing and registers then. Nothing happens when EasyEdit
is not installed.

The finder keeps no state between look-ups: every ``find_spec("easyeditor")`` (the import system's, or a caller's
own ``importlib.util.find_spec``, which does not import anything) gets a spec with a fresh wrapping loader, so a
look-up that is never followed by an import cannot use up the registration. Importing only a submodule
(``import easyeditor.editors``) imports the package first and so goes through the same loader. The finder leaves
``sys.meta_path`` once the package has been imported.
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


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``easyeditor``, then registers (one instance per spec handed out)."""

    def __init__(self, inner, finder: "_RegisterAfterImport") -> None:
        self._inner = inner
        self._finder = finder

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._inner, name)

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._inner  # the module shows its real loader, as without us
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)  # on failure the finder stays, for the next attempt
        self._finder.uninstall()
        _safe_register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Hands out specs of the top-level ``easyeditor`` package whose loader registers after the import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "easyeditor" or path is not None:
            return None
        others = [f for f in sys.meta_path if f is not self and hasattr(f, "find_spec")]
        for finder in others:  # the real spec, from the finders after us
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def uninstall(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now if EasyEdit is loaded, else once it is imported."""
    mod = sys.modules.get("easyeditor")
    if mod is not None:
        _safe_register()
        return
    if any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RegisterAfterImport())
