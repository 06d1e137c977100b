"""Registration into EasyEdit: idempotent, automatic on import in either order, batchable, trainers listed."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

from easyedit_agrade.paths import REPO_ROOT


def test_register_is_idempotent(easyeditor_module):
    from easyedit_agrade.integration.easyedit import METHODS, register

    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    train_dict = importlib.import_module("easyeditor.util.alg_train_dict").ALG_TRAIN_DICT
    batch_editor = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    before = dict(alg_dict)
    assert register() is True
    assert register() is True
    assert dict(alg_dict) == before  # second call changed nothing
    for name in METHODS:
        assert name in alg_dict
        assert name.upper() in train_dict
        assert batch_editor.is_batchable_method(name)
    original = batch_editor.is_batchable_method._easyedit_agrade_original
    assert not getattr(original, "_easyedit_agrade", False)  # wrapped once, not twice
    assert batch_editor.is_batchable_method("MEMIT") and not batch_editor.is_batchable_method("ROME")
    assert train_dict["AGRADE"].class_name == "AGRADETrainer"
    assert train_dict["INSTRUCTEDIT"].class_name == "InstructEditTrainer"


def test_generation_detected(easyeditor_module):
    from easyedit_agrade.integration.easyedit import easyedit_generation

    expected = "upstream" if importlib.util.find_spec("easyeditor.util.device") else "pypi"
    assert easyedit_generation() == expected


@pytest.mark.parametrize("order", ["plugin-first", "easyedit-first"])
def test_autoregister_on_import(easyeditor_module, order):
    imports = ["import easyedit_agrade", "import easyeditor"]
    if order == "easyedit-first":
        imports.reverse()
    code = "\n".join(imports) + textwrap.dedent("""
        import importlib
        alg = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
        print("AGRADE" in alg and "InstructEdit" in alg)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "True"
