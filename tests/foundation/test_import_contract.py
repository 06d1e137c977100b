"""The import-layers contract in setup.cfg (``[importlinter:*]``) holds, and it does catch a violation.

``lint-imports`` (import-linter) reads import statements, also those inside functions; it does not see
``importlib.import_module("...")`` calls, so EasyEdit's boundary gets a scan of those calls as well.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from easyedit_agrade.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "easyedit_agrade"
CONFIG = REPO_ROOT / "setup.cfg"
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run lint-imports with the repository's contract on the ``easyedit_agrade`` package found under ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT_IMPORTS, "--config", str(CONFIG), "--no-cache"],
                          capture_output=True, text=True, cwd=root, env=env, timeout=600)


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(PACKAGE, tmp_path / "easyedit_agrade", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "easyedit_agrade"


def easyeditor_import_module_calls(package: Path) -> list[str]:
    """``file:line`` of every ``import_module("easyeditor...")`` / ``__import__("easyeditor...")`` call outside
    ``integration/`` (the imports lint-imports cannot see)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] == "integration":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            target = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(target, str) \
                    and target.split(".")[0] == "easyeditor":
                found.append(f"{rel}:{node.lineno}")
    return found


def test_import_contract_is_kept():
    res = _lint_imports(REPO_ROOT)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "0 broken" in res.stdout


def test_no_importlib_easyeditor_import_outside_integration():
    assert easyeditor_import_module_calls(PACKAGE) == []


@pytest.mark.parametrize("module, line, broken", [
    # a kernel reaching up into a method: the layers contract
    ("kernels/reference.py", "from easyedit_agrade.models.agrade import agrade_main", "Layers"),
    # the editing core importing EasyEdit directly: only integration may
    ("core/weights.py", "import easyeditor.editors", "Only integration imports easyeditor"),
    # evaluate knowing a method
    ("evaluate/metrics.py", "from ..models.instructedit import instructedit_eval", "know no method"),
])
def test_contract_catches_a_violation(tmp_path, module, line, broken):
    """The same contract on a copy of the package with one forbidden import added fails and names it."""
    copy = _copy_package(tmp_path)
    target = copy / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n\ndef _violation():\n    {line}\n", encoding="utf-8")
    res = _lint_imports(tmp_path)
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]
    out = " ".join(res.stdout.split())  # lint-imports wraps long lines
    assert f"{broken}" in out and "BROKEN" in out
    assert f"easyedit_agrade.{module[:-3].replace('/', '.')} ->" in out


def test_importlib_scan_catches_a_call(tmp_path):
    copy = _copy_package(tmp_path)
    target = copy / "tools" / "demo.py"
    target.write_text(target.read_text(encoding="utf-8")
                      + '\n\ndef _violation():\n    import importlib\n    return importlib.import_module("easyeditor")\n',
                      encoding="utf-8")
    found = easyeditor_import_module_calls(copy)
    assert len(found) == 1 and found[0].startswith("tools/demo.py:")
