"""Atomic writes: a file or a folder is built under a temporary name beside its destination, then renamed over it.

A reader never sees a half-written file, and a writer killed mid-write leaves the previous version intact (and at
most a hidden temporary, ``.<name>.<random>.tmp`` / ``.<name>.partial-<random>``, which the next write ignores).

* :func:`atomic_path` — a context manager that yields a temporary path for any writer (``json.dump``,
  safetensors' ``save_file``, …); on success the file is ``fsync``-ed and ``os.replace``-d onto the destination,
  on an exception it is removed and the destination is untouched.
* :func:`atomic_write_text` — a text file (UTF-8) in one call.
* :func:`atomic_dir` — the same for a folder (an HF model directory, a training checkpoint).

Plain standard library: importing this module stays cheap.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary file path beside ``path``; on a clean exit it replaces ``path``.

    The temporary is created empty with the permissions an ordinary ``open(path, "w")`` would give (``0o666``
    less the umask). On an exception (or a ``KeyboardInterrupt``) it is deleted and ``path`` keeps its old
    content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - a 32-bit collision
            continue
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(target: str | os.PathLike[str], *, replace_existing: bool = False,
               accept_existing: Callable[[Path], bool] | None = None,
               check_before_rename: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on a clean exit it is renamed to ``target``.

    ``replace_existing``: an existing ``target`` is replaced (a training checkpoint being rewritten, an earlier
    save). It is first moved aside to a hidden sibling and deleted only once the new folder is in place; if the
    rename fails it is moved back, so the previous version is never lost (should even that
    fail, it is kept in the hidden ``.<name>.old-<random>/previous``, never deleted). Otherwise the rename
    fails on a non-empty ``target`` and the error is raised, unless ``accept_existing(target)`` says the folder
    already there will do (a concurrent writer finished first). ``check_before_rename()`` runs after the body and
    before anything is moved (e.g. re-checking that ``target`` is still ours to replace); an exception from it
    leaves ``target`` untouched. The temporary folder is always removed (a failed or interrupted build leaves
    ``target`` as it was).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    aside: Path | None = None
    try:
        yield tmp
        if check_before_rename is not None:
            check_before_rename()
        if replace_existing and target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, aside / "previous")
        try:
            os.replace(tmp, target)
        except OSError:
            if aside is not None:  # put the previous version back
                os.replace(aside / "previous", target)
                raise
            if accept_existing is None or not accept_existing(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        # the previous version is dropped once ``target`` holds the new one or it was put back, never otherwise
        if aside is not None and (target.exists() or not (aside / "previous").exists()):
            shutil.rmtree(aside, ignore_errors=True)
