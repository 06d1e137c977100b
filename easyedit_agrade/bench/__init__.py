"""The benchmark harness (``easyedit-agrade bench``) and the ``edit`` command. Heavy imports happen inside the
functions, so importing this package is cheap."""
from __future__ import annotations

from typing import Sequence


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``easyedit-agrade bench``: see :mod:`easyedit_agrade.bench.runner` (``--help`` lists the options)."""
    from .runner import bench_main as _main

    return _main(argv)


def edit_main(argv: Sequence[str] | None = None) -> int:
    """``easyedit-agrade edit``: see :mod:`easyedit_agrade.bench.edit_cli`."""
    from .edit_cli import edit_main as _main

    return _main(argv)


__all__ = ["bench_main", "edit_main"]
