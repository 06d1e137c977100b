"""Model-name wrapping and device resolution live in the integration layer, not in the hyperparameter classes."""
from __future__ import annotations

import dataclasses

from easyedit_agrade.integration.preloaded import PreloadedModel, adapt_hparams, patch_base_editor
from easyedit_agrade.models.agrade import AGRADEHyperParams
from easyedit_agrade.models.instructedit import InstructEditHyperParams
from easyedit_agrade.paths import REPO_ROOT


def _shipped(cls, alg):
    return cls.from_hparams(REPO_ROOT / f"hparams/{alg}/smollm2-135m")


def test_hparams_keep_the_plain_name_and_adapt_wraps_it():
    for cls, alg in ((AGRADEHyperParams, "AGRADE"), (InstructEditHyperParams, "InstructEdit")):
        hp = _shipped(cls, alg)
        assert type(hp.model_name) is str and hp.model_name == "smollm2-135m-instruct"
        assert adapt_hparams(hp) is hp
        assert isinstance(hp.model_name, PreloadedModel) and str(hp.model_name) == "smollm2-135m-instruct"
        assert hp.to_dict()["model_name"] == "smollm2-135m-instruct" and type(hp.to_dict()["model_name"]) is str


def test_adapt_keeps_a_given_preloaded_model_and_leaves_other_hparams_alone():
    hp = _shipped(AGRADEHyperParams, "AGRADE")
    given = PreloadedModel("tiny", object(), object())
    hp.model_name = given
    assert adapt_hparams(hp).model_name is given

    @dataclasses.dataclass
    class Foreign:  # EasyEdit's own hparams classes are not ours: nothing is changed
        model_name: str = "gpt2-xl"
        device: int = 0

    foreign = Foreign()
    adapt_hparams(foreign)
    assert type(foreign.model_name) is str and foreign.device == 0


def test_patched_base_editor_adapts_before_its_own_init():
    seen = []

    class FakeBaseEditor:
        def __init__(self, hparams):
            seen.append(type(hparams.model_name))
            self.tok = None

    patch_base_editor(FakeBaseEditor)
    patch_base_editor(FakeBaseEditor)  # once only
    FakeBaseEditor(_shipped(InstructEditHyperParams, "InstructEdit"))
    assert seen == [PreloadedModel]
