"""Importing the package is cheap and works without EasyEdit; the CLI answers --help."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from easyedit_agrade.paths import REPO_ROOT


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


def test_import_is_light():
    res = _run("""
        import sys, easyedit_agrade
        heavy = [m for m in ("easyeditor", "triton", "matplotlib", "transformers", "sklearn") if m in sys.modules]
        print(heavy)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_works_without_easyedit():
    res = _run("""
        import sys
        sys.modules["easyeditor"] = None          # makes `import easyeditor` fail, as if not installed
        import easyedit_agrade
        assert easyedit_agrade.register() is False
        from easyedit_agrade import AGRADEHyperParams, InstructEditHyperParams
        hp = AGRADEHyperParams.from_hparams("hparams/AGRADE/smollm2-135m")
        assert hp.alg_name == "AGRADE" and len(hp.inner_params) == 6
        ie = InstructEditHyperParams.from_hparams("hparams/InstructEdit/smollm2-135m")
        print(type(hp).__mro__[-2].__name__, ie.alg_name)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["_StandaloneHyperParams", "InstructEdit"]


def test_cli_help_lists_commands():
    res = subprocess.run([sys.executable, "-m", "easyedit_agrade", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    for command in ("train", "edit", "bench", "demo", "info"):
        assert command in res.stdout


def test_cli_unknown_command_fails_clearly():
    res = subprocess.run([sys.executable, "-m", "easyedit_agrade", "frobnicate"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)
    assert res.returncode == 2
    assert "unknown command 'frobnicate'" in res.stderr


def test_torch_floor_is_2_6_in_setup_cfg_and_readme():
    """Before torch 2.6 ``torch.load`` defaults to ``weights_only=False``, and EasyEdit's MEND executor loads its
    archive with a bare ``torch.load``: the supported floor is 2.6, stated alike in setup.cfg and the README."""
    import configparser
    import re

    import torch
    from packaging.version import Version

    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg", encoding="utf-8")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    torch_reqs = [r for r in reqs if re.match(r"torch\b(?!vision)", r)]
    assert torch_reqs == ["torch>=2.6"], torch_reqs
    row = next(line for line in (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| torch / torchvision |"))
    assert "torch ≥ 2.6" in row and "2.4" not in row, row
    assert Version(torch.__version__.split("+")[0]) >= Version("2.6")
