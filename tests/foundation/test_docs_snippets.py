"""The README's and the docs' Python blocks run as written: each one verbatim in a fresh interpreter, with the
repository root as the working directory (as a user who copies it would). A block that only works in the test
process's state (say, because something called ``register()`` before) is a defect.

A block preceded by the line ``<!-- sketch: not run -->`` is an API outline (undefined names) and is not run;
the README may have none.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from easyedit_agrade.paths import REPO_ROOT

SKETCH = "<!-- sketch: not run -->"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """``(line number, code, is_sketch)`` of every ```python block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").splitlines()
        sketch = bool(before) and before[-1].strip() == SKETCH
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), sketch))
    return out


def _documents() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _runnable() -> list[tuple[str, str]]:
    return [(f"{p.relative_to(REPO_ROOT)}:{line}", code) for p in _documents()
            for line, code, sketch in python_blocks(p) if not sketch]


def test_blocks_are_found_and_readme_has_no_sketch():
    readme = python_blocks(REPO_ROOT / "README.md")
    assert readme and not any(sketch for _, _, sketch in readme)
    names = [name for name, _ in _runnable()]
    assert any(n.startswith("README.md:") for n in names)
    assert any(n.startswith("docs/agrade.md:") for n in names) and any(n.startswith("docs/instructedit.md:")
                                                                         for n in names)


def test_block_parser_sees_sketch_marker(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text(f"text\n\n```python\nprint(1)\n```\n\n{SKETCH}\n```python\nundefined_name\n```\n"
                   "```bash\nls\n```\n")
    assert python_blocks(doc) == [(3, "print(1)\n", False), (8, "undefined_name\n", True)]


@pytest.mark.slow
@pytest.mark.parametrize("where, code", _runnable(), ids=[name for name, _ in _runnable()])
def test_block_runs_verbatim_in_a_fresh_interpreter(where, code):
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert res.returncode == 0, f"{where} failed:\n{res.stderr[-4000:]}"
