"""The one method table (``easyedit_agrade.registry``): every dotted path resolves, and registration, the training
CLI, the lazy exports and the bench all list exactly its methods."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

from easyedit_agrade.paths import REPO_ROOT
from easyedit_agrade.registry import METHODS, lazy_exports


@pytest.mark.parametrize("entry", METHODS, ids=lambda m: m.alg_name)
def test_every_path_of_the_table_resolves(entry):
    package = importlib.import_module(entry.package)
    assert callable(getattr(package, entry.executor))
    assert isinstance(getattr(package, entry.trainer_class), type)
    hparams_module = importlib.import_module(entry.hparams_module)
    assert isinstance(getattr(hparams_module, entry.hparams_class), type)
    assert entry.hparams_class in entry.exported_hparams
    for name in entry.exported_hparams:
        assert isinstance(getattr(hparams_module, name), type)
    assert callable(importlib.import_module(entry.trainer_module).train_main)


def test_every_consumer_lists_the_table():
    import easyedit_agrade
    from easyedit_agrade.bench.methods import HPARAMS_CLASSES
    from easyedit_agrade.integration.easyedit import METHODS as REGISTERED
    from easyedit_agrade.training_cli import TRAINERS

    names = [m.alg_name for m in METHODS]
    assert list(REGISTERED) == names and list(TRAINERS) == names and list(HPARAMS_CLASSES) == names
    for m in METHODS:
        assert REGISTERED[m.alg_name] == (m.package, m.executor, m.trainer_class)
        assert TRAINERS[m.alg_name] == m.trainer_module
        assert HPARAMS_CLASSES[m.alg_name] == (m.hparams_module, m.hparams_class)
    for name, module in lazy_exports().items():
        assert easyedit_agrade._LAZY[name] == module
        assert getattr(easyedit_agrade, name) is getattr(importlib.import_module(module), name)


def test_the_table_imports_no_third_party_module():
    res = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        before = set(sys.modules)
        import easyedit_agrade.registry
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        print(sorted(new - set(sys.stdlib_module_names) - {"easyedit_agrade"}))
    """)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
