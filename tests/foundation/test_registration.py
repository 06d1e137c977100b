"""Registration into EasyEdit: idempotent, automatic on import in every order, batchable, trainers listed."""
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


# What every import-order subprocess checks after its imports: both methods are in EasyEdit's dicts, and
# ``BaseEditor.from_hparams(...).batch_edit(...)`` dispatches to our executor — on a tiny model without an archive,
# so reaching our executor shows as *our* ArchiveNotFoundError (an unregistered method is EasyEdit's KeyError).
_CHECK_DISPATCH = """
import importlib, json, types
from transformers import LlamaConfig, LlamaForCausalLM
from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
from easyedit_agrade.integration.preloaded import PreloadedModel
from easyedit_agrade.models.agrade import AGRADEHyperParams
from easyedit_agrade.models.instructedit import InstructEditHyperParams

alg = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
train = importlib.import_module("easyeditor.util.alg_train_dict").ALG_TRAIN_DICT
batch = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
editor_mod = importlib.import_module("easyeditor.editors.editor")
out = {"dicts": all(k in alg and k in editor_mod.ALG_DICT for k in ("AGRADE", "InstructEdit"))
                and {"AGRADE", "INSTRUCTEDIT"} <= set(train)
                and batch.is_batchable_method("AGRADE") and batch.is_batchable_method("InstructEdit")}
from easyedit_agrade.lm import load_tokenizer
tok = load_tokenizer()  # a real tokenizer: upstream's batch_edit tokenises targets before it calls the executor
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2)).eval()
params = ["model.layers.1.mlp.down_proj.weight"]
for cls in (AGRADEHyperParams, InstructEditHyperParams):
    hp = cls.from_dict(dict(alg_name=cls.ALG_NAME, model_name=PreloadedModel("tiny", model, tok),
                            inner_params=params, archive="/nonexistent/archive.safetensors",
                            **({"task": "zsre"} if cls is InstructEditHyperParams else {})))
    try:
        with cuda_on_cpu():
            editor_mod.BaseEditor.from_hparams(hp).batch_edit(prompts=["a b"], target_new=["c"])
        out[cls.ALG_NAME] = "no error"
    except Exception as exc:
        out[cls.ALG_NAME] = type(exc).__module__ + "." + type(exc).__name__
        out[cls.ALG_NAME + " message"] = str(exc)[:500]
print("RESULT " + json.dumps(out))
"""

IMPORT_ORDERS = {
    "plugin-then-easyeditor": "import easyedit_agrade\nfrom easyeditor import BaseEditor",
    # the order of the report: our hparams class (which looks EasyEdit up with find_spec) before EasyEdit
    "plugin-hparams-then-easyeditor": ("import easyedit_agrade\n"
                                       "from easyedit_agrade import AGRADEHyperParams, cuda_on_cpu\n"
                                       "from easyeditor import BaseEditor"),
    "easyeditor-then-plugin": "from easyeditor import BaseEditor\nimport easyedit_agrade",
    "find-spec-first": ("import importlib.util\nimport easyedit_agrade\n"
                        "assert importlib.util.find_spec('easyeditor') is not None\n"
                        "assert importlib.util.find_spec('easyeditor') is not None\n"
                        "import easyeditor"),
    "submodule-only": "import easyedit_agrade\nfrom easyeditor.editors.editor import BaseEditor",
    "easyeditor-submodule-then-plugin-hparams": ("import easyeditor.util.hparams\n"
                                                 "from easyedit_agrade.models.agrade import AGRADEHyperParams"),
}


@pytest.mark.parametrize("order", sorted(IMPORT_ORDERS))
def test_import_order_registers_and_from_hparams_reaches_executor(easyeditor_module, order):
    code = IMPORT_ORDERS[order] + "\n" + _CHECK_DISPATCH
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    import json

    result = json.loads(line[len("RESULT "):])
    assert result["dicts"], result
    assert result["AGRADE"] == "easyedit_agrade.models.agrade.archive.ArchiveNotFoundError", result
    assert result["InstructEdit"] == "easyedit_agrade.models.instructedit.archive.ArchiveNotFoundError", result


def test_find_spec_does_not_use_up_the_registration(easyeditor_module):
    """The finder hands out a fresh loader per look-up and leaves ``sys.meta_path`` after the import."""
    code = textwrap.dedent("""
        import importlib, importlib.util, sys
        import easyedit_agrade
        from easyedit_agrade._autoregister import _RegisterAfterImport
        assert any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path)
        spec = importlib.util.find_spec("easyeditor")
        import easyeditor
        assert not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path)
        assert type(easyeditor.__loader__).__name__ == "SourceFileLoader", easyeditor.__loader__
        print("AGRADE" in importlib.import_module("easyeditor.util.alg_dict").ALG_DICT)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "True"
