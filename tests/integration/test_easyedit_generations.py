"""What a user of either EasyEdit generation runs (issue 16 §5): the shipped YAMLs as they are (``device: 0``,
no CUDA here), EasyEdit's ``BaseEditor`` with ``locality_inputs``/``portability_inputs``, AGRADE and InstructEdit
with their shipped archives, and the single-edit path upstream's examples use (``editor.edit``).

Upstream, nothing runs under ``cuda_on_cpu()`` (``device: 0`` resolves to ``cpu``); the PyPI wheel needs it."""
from __future__ import annotations

import contextlib

import pytest
import torch

from easyedit_agrade.core.edit_report import last_report
from easyedit_agrade.paths import REPO_ROOT

pytestmark = pytest.mark.slow

FACTS = dict(
    prompts=["The mother tongue of Danielle Darrieux is", "The Eiffel Tower is located in the city of"],
    target_new=["English", "Rome"],
    ground_truth=["French", "Paris"],
    rephrase_prompts=["Danielle Darrieux's native language is", "The Eiffel Tower can be found in"],
    locality_inputs={"neighborhood": {"prompt": ["The mother tongue of Thomas Joannes Stieltjes is",
                                                 "The Colosseum is in"],
                                      "ground_truth": ["Dutch", "Rome"]}},
    portability_inputs={"one_hop": {"prompt": ["Danielle Darrieux's first language is",
                                               "The city where the Eiffel Tower stands is"],
                                    "ground_truth": ["English", "Rome"]}},
)


@pytest.fixture(scope="module")
def generation(easyeditor_module):
    from easyedit_agrade.integration.easyedit import easyedit_generation

    return easyedit_generation()


def _cpu_layer(generation):
    """Upstream needs nothing; the PyPI wheel hard-codes cuda:{device} (documented: cuda_on_cpu)."""
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu

    return contextlib.nullcontext() if generation == "upstream" else cuda_on_cpu()


def _batch_kwargs(generation, facts):
    """The PyPI wheel's ``batch_edit`` has no ``locality_inputs``/``portability_inputs`` keywords: it passes its
    ``locality_prompts`` and ``locality_ground_truth`` arguments on, positionally, as those two dicts."""
    if generation == "upstream":
        return dict(facts)
    out = dict(facts)
    out["locality_prompts"] = out.pop("locality_inputs")
    out["locality_ground_truth"] = out.pop("portability_inputs")
    return out


def _restore(model, before):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not torch.equal(p, before[n]):
                p.copy_(before[n])


def _acc(metrics, stage, key="rewrite_acc"):
    vals = [float(torch.as_tensor(m[stage][key], dtype=torch.float64).mean()) for m in metrics]
    return sum(vals) / len(vals)


def test_shipped_yaml_device_resolves_for_this_machine(generation):
    """The device as ``BaseEditor`` gets it: its patched ``__init__`` runs ``adapt_hparams`` first."""
    from easyedit_agrade.integration.preloaded import adapt_hparams
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.instructedit import InstructEditHyperParams

    for cls, alg in ((AGRADEHyperParams, "AGRADE"), (InstructEditHyperParams, "InstructEdit")):
        hp = adapt_hparams(cls.from_hparams(REPO_ROOT / f"hparams/{alg}/smollm2-135m"))
        if torch.cuda.is_available():
            assert hp.device == 0
        else:  # upstream understands "cpu"; the wheel formats cuda:{device} and keeps the index for cuda_on_cpu
            assert hp.device == ("cpu" if generation == "upstream" else 0), (alg, hp.device)


def test_agrade_batch_edit_with_locality_and_portability(easyeditor_module, embedded_model, generation):
    from easyedit_agrade.integration.preloaded import PreloadedModel
    from easyedit_agrade.models.agrade import AGRADEHyperParams

    model, tok = embedded_model
    hp = AGRADEHyperParams.from_hparams(REPO_ROOT / "hparams/AGRADE/smollm2-135m")  # the YAML as shipped
    hp.model_name = PreloadedModel("smollm2-135m-instruct", model, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with _cpu_layer(generation):
            editor = easyeditor_module.BaseEditor.from_hparams(hp)
            metrics, _m, weights_copy = editor.batch_edit(keep_original_weight=True, verbose=False,
                                                            **_batch_kwargs(generation, FACTS))
    finally:
        _restore(model, before)
    assert len(metrics) == 2
    for m in metrics:  # both dicts reached EasyEdit's metrics (the wheel's batch_edit reports outputs, not _acc)
        assert any(k.startswith("neighborhood_") for k in m["post"]["locality"]), m["post"]["locality"]
        assert "one_hop_acc" in m["post"]["portability"], m["post"]["portability"]
    assert _acc(metrics, "pre") < 0.5 and _acc(metrics, "post") == 1.0, (_acc(metrics, "pre"), _acc(metrics, "post"))
    report = last_report(model)
    assert report is not None and report.n_requests == 2 and max(report.delta_ratio.values()) < 10


def test_single_edit_with_editor_edit_and_batch_size_1(easyeditor_module, embedded_model, generation):
    """Upstream's examples call ``editor.edit()``, which (upstream) asserts ``hparams.batch_size == 1`` and (the
    wheel) sets it to 1: documented — set ``batch_size: 1`` for single edits — and it edits."""
    from easyedit_agrade.integration.preloaded import PreloadedModel
    from easyedit_agrade.models.agrade import AGRADEHyperParams

    model, tok = embedded_model
    hp = AGRADEHyperParams.from_hparams(REPO_ROOT / "hparams/AGRADE/smollm2-135m")
    hp.model_name = PreloadedModel("smollm2-135m-instruct", model, tok)
    hp.batch_size = 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    single = {k: (v[:1] if isinstance(v, list) else {n: {f: x[:1] for f, x in d.items()} for n, d in v.items()})
              for k, v in FACTS.items()}
    try:
        with _cpu_layer(generation):
            editor = easyeditor_module.BaseEditor.from_hparams(hp)
            metrics, _m, _c = editor.edit(keep_original_weight=True, verbose=False, **single)
    finally:
        _restore(model, before)
    assert len(metrics) == 1 and _acc(metrics, "post") == 1.0, metrics[0]["post"]


def test_instructedit_edit_with_the_shipped_archive(easyeditor_module, embedded_model, generation):
    from easyedit_agrade.integration.preloaded import PreloadedModel
    from easyedit_agrade.models.instructedit import InstructEditHyperParams, wrap_edit_inputs

    model, tok = embedded_model
    hp = InstructEditHyperParams.from_hparams(REPO_ROOT / "hparams/InstructEdit/smollm2-135m")
    hp.model_name = PreloadedModel("smollm2-135m-instruct", model, tok)
    kwargs = wrap_edit_inputs(hp, task="counterfact", **{k: v for k, v in FACTS.items()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with _cpu_layer(generation):
            editor = easyeditor_module.BaseEditor.from_hparams(hp)
            metrics, _m, _c = editor.edit(keep_original_weight=True, verbose=False, **kwargs)
    finally:
        _restore(model, before)
    assert len(metrics) == 2
    for m in metrics:
        assert "neighborhood_acc" in m["post"]["locality"] and "one_hop_acc" in m["post"]["portability"]
    assert _acc(metrics, "post") > _acc(metrics, "pre"), (_acc(metrics, "pre"), _acc(metrics, "post"))
