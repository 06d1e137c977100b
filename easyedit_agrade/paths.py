"""Where the project finds shared data and where it caches converted models.

Both locations can be overridden by environment variables so that tests, CI and
users on other machines never depend on a machine-specific path.
"""
from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "EASYEDIT_AGRADE_SHARED"
CACHE_ENV = "EASYEDIT_AGRADE_CACHE"

#: the repository root when running from a source checkout (``<root>/easyedit_agrade/paths.py``)
REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """Folder with ``papers/`` and ``data/``: ``$EASYEDIT_AGRADE_SHARED`` or ``<repo root>/../shared``."""
    override = os.environ.get(SHARED_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return (REPO_ROOT.parent / "shared").resolve()


def data_dir() -> Path:
    """``<shared>/data`` — the real knowledge-editing datasets (never copied into this repository)."""
    return shared_dir() / "data"


def data_file(relative: str) -> Path:
    """A file under :func:`data_dir`, with an error naming the override variable when it is absent."""
    path = data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"dataset file {relative!r} not found at {path}; set {SHARED_ENV} to the folder that holds data/"
        )
    return path


def cache_dir() -> Path:
    """Cache root: ``$EASYEDIT_AGRADE_CACHE``, else ``$XDG_CACHE_HOME/easyedit-agrade``, else ``~/.cache/easyedit-agrade``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "easyedit-agrade").resolve()


def repo_relative(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the repository root when it lies inside it (for reports and JSON committed to the
    repository: no machine paths), else as given."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(path)
