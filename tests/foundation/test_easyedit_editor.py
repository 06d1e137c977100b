"""EasyEdit's real BaseEditor on the embedded model, on CPU: an EasyEdit baseline edits, our method dispatches."""
from __future__ import annotations

import importlib

import pytest
import torch

from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
from easyedit_agrade.integration.preloaded import PreloadedModel
from easyedit_agrade.paths import REPO_ROOT

REQUESTS = dict(
    prompts=["The capital of France is", "The Eiffel Tower is located in",
             "The mother tongue of Danielle Darrieux is"],
    target_new=["Rome", "London", "English"],
    ground_truth=["Paris", "Paris", "French"],
    rephrase_prompts=["France has its capital at", "The Eiffel Tower can be found in",
                      "Danielle Darrieux's native language is"],
)


@pytest.mark.slow
def test_easyedit_ft_baseline_edits_embedded_model_on_cpu(easyeditor_module, embedded_model):
    model, tok = embedded_model
    from easyedit_agrade.integration.baselines import load_easyedit_hparams

    hp = load_easyedit_hparams(REPO_ROOT / "hparams" / "FT" / "smollm2-135m", model=model, tok=tok)
    edited_names = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    before = {n: model.get_parameter(n).detach().clone() for n in edited_names}
    with cuda_on_cpu():
        editor = easyeditor_module.BaseEditor.from_hparams(hp)
        metrics, edited, weights_copy = editor.batch_edit(keep_original_weight=True, verbose=False, **REQUESTS)
    assert len(metrics) == 3
    for m in metrics:  # EasyEdit's metric structure
        assert set(m) >= {"case_id", "requested_rewrite", "time", "pre", "post"}
        assert set(m["post"]) >= {"rewrite_acc", "rephrase_acc", "locality", "portability"}
    pre = sum(float(m["pre"]["rewrite_acc"][0]) for m in metrics)
    post = sum(float(m["post"]["rewrite_acc"][0]) for m in metrics)
    assert pre == 0.0 and post >= 1.0, (pre, post)  # the counterfactual edits took (measured: 2 of 3)
    assert set(weights_copy) == set(edited_names)
    for n in edited_names:  # BaseEditor restored the weights after evaluating
        assert torch.equal(model.get_parameter(n), before[n])


@pytest.mark.slow
def test_agrade_dispatch_reaches_our_executor(easyeditor_module, embedded_model, monkeypatch):
    """BaseEditor(alg_name="AGRADE").batch_edit calls our executor once with all requests, which edits the model
    with the shipped archive (archives/); BaseEditor then restores the weights (keep_original_weight)."""
    from easyedit_agrade.models.agrade.agrade_hparams import AGRADEHyperParams

    agrade_pkg = importlib.import_module("easyedit_agrade.models.agrade")
    real = agrade_pkg.apply_agrade_to_model
    seen = []

    def spy(model, tok, requests, hparams, *args, **kwargs):
        out = real(model, tok, requests, hparams, *args, **kwargs)
        changed = sorted(n for n in hparams.inner_params if not torch.equal(model.get_parameter(n), before[n]))
        seen.append((len(requests), hparams.alg_name, changed))
        return out

    monkeypatch.setattr(agrade_pkg, "apply_agrade_to_model", spy)
    model, tok = embedded_model
    hp = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams" / "AGRADE" / "smollm2-135m"))
    before = {n: model.get_parameter(n).detach().clone() for n in hp.inner_params}
    hp.model_name = PreloadedModel("smollm2-135m-instruct", model, tok)
    with cuda_on_cpu():
        editor = easyeditor_module.BaseEditor.from_hparams(hp)
        assert editor.alg_name == "AGRADE"
        metrics, _, _ = editor.batch_edit(keep_original_weight=True, verbose=False, **REQUESTS)
    assert seen == [(3, "AGRADE", sorted(hp.inner_params))]  # our executor ran once and edited every module
    assert len(metrics) == 3
    for n in hp.inner_params:
        assert torch.equal(model.get_parameter(n), before[n])
