"""End to end through EasyEdit's real BaseEditor on the embedded SmolLM2 with the shipped AGRADE archive
(archives/, in git): the edits take effect and EasyEdit restores the weights exactly (slow: loads the 135M model)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("easyeditor")

HPARAMS = "hparams/AGRADE/smollm2-135m"


def _data():
    from easyedit_agrade.dataset import read_counterfact_mend
    from easyedit_agrade.paths import data_file

    try:
        return read_counterfact_mend(data_file("counterfact/counterfact-val.json"), limit=4)
    except FileNotFoundError as exc:
        pytest.skip(f"shared CounterFact data absent: {exc}")


@pytest.fixture(scope="module")
def editor_and_hparams():
    import easyedit_agrade
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
    from easyedit_agrade.models.agrade import AGRADEHyperParams

    easyedit_agrade.register()
    hp = AGRADEHyperParams.from_hparams(HPARAMS)  # model_name resolves without editing the YAML
    assert hp.archive is None  # the YAML names no archive: the shipped one must be found
    with cuda_on_cpu():
        editor = importlib.import_module("easyeditor").BaseEditor.from_hparams(hp)
    return editor, hp


@pytest.mark.slow
def test_batch_edit_through_base_editor(editor_and_hparams):
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
    from easyedit_agrade.tools.agrade_demo import locality_kwargs, summarize_easyedit_metrics

    editor, hp = editor_and_hparams
    recs = _data()
    before = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
    with cuda_on_cpu():
        metrics, model, weights_copy = editor.batch_edit(
            prompts=[r.prompt for r in recs], target_new=[r.target_new for r in recs],
            ground_truth=[r.ground_truth for r in recs], rephrase_prompts=[r.rephrase_prompt for r in recs],
            keep_original_weight=True, verbose=False, **locality_kwargs(recs))
    assert len(metrics) == len(recs)
    assert set(weights_copy) == set(hp.inner_params)
    after = editor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # EasyEdit restored our weights_copy exactly
    s = summarize_easyedit_metrics(metrics)
    assert s["es"] > s["pre_es"] + 0.25, s  # the trained archive edits (measured: ES 0 -> 1, GS 0 -> 0.375 on these 4)
    assert 0.0 <= s["ls"] <= 1.0


@pytest.mark.slow
def test_single_edit_through_base_editor(editor_and_hparams):
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu

    editor, hp = editor_and_hparams
    r = _data()[0]
    before = {n: editor.model.get_parameter(n).detach().clone() for n in hp.inner_params}
    with cuda_on_cpu():
        metrics, model, weights_copy = editor.edit(prompts=[r.prompt], target_new=[r.target_new],
                                                   ground_truth=[r.ground_truth], keep_original_weight=True,
                                                   verbose=False)
    assert metrics and "post" in metrics[0]
    assert set(weights_copy) == set(hp.inner_params)
    pre, post = (float(metrics[0][k]["rewrite_acc"][0]) for k in ("pre", "post"))
    assert post > pre, (pre, post)  # the edit took effect
    assert all(torch.equal(editor.model.get_parameter(n), before[n]) for n in hp.inner_params)


@pytest.mark.slow
def test_shipped_archive_found_without_editing_yaml(editor_and_hparams):
    editor, hp = editor_and_hparams
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.archive import find_archive

    path = find_archive(editor.model, AGRADEHyperParams.from_hparams(HPARAMS))
    assert path.parent.name == "archives" and path.is_relative_to(Path(__file__).resolve().parents[2])


@pytest.mark.slow
def test_value_optimised_yaml_edits_through_base_editor():
    """hparams/AGRADE/smollm2-135m-values.yaml (``value_source: optimized``, layers 3–7, then the shipped network on
    layers 24–29 as its ``network_stage``) through EasyEdit's ``batch_edit`` with the requests' subjects: the edits
    take effect, both stages' weights are in the restore copy, and EasyEdit restores exactly."""
    import easyedit_agrade
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.tools.agrade_demo import locality_kwargs, summarize_easyedit_metrics

    easyedit_agrade.register()
    hp = AGRADEHyperParams.from_hparams("hparams/AGRADE/smollm2-135m-values")
    assert hp.value_source == "optimized" and hp.archive is None
    recs = _data()
    with cuda_on_cpu():
        editor = importlib.import_module("easyeditor").BaseEditor.from_hparams(hp)
        before = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
        metrics, model, weights_copy = editor.batch_edit(
            prompts=[r.prompt for r in recs], target_new=[r.target_new for r in recs],
            ground_truth=[r.ground_truth for r in recs], rephrase_prompts=[r.rephrase_prompt for r in recs],
            subject=[r.subject for r in recs], keep_original_weight=True, verbose=False, **locality_kwargs(recs))
    assert set(weights_copy) == set(hp.inner_params) | set(hp.network_stage_hparams().inner_params)
    after = editor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    s = summarize_easyedit_metrics(metrics)
    assert s["es"] > s["pre_es"] + 0.5, s
