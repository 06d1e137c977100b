"""Through EasyEdit's real BaseEditor: registered dispatch, wrapped prompts seen identically by the pre- and
post-edit metrics and by the executor, locality never wrapped, edit and batch_edit."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def test_pre_and_post_metrics_see_the_same_wrapped_prompts(easyeditor_module, embedded_model, tiny_archive,
                                                           tiny_instructions, monkeypatch):
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
    from easyedit_agrade.integration.preloaded import PreloadedModel
    from easyedit_agrade.models.instructedit import InstructEditHyperParams, instructedit_main, wrap_edit_inputs
    from easyedit_agrade.models.instructedit.instructions import is_wrapped

    editor_mod = __import__("easyeditor.editors.editor", fromlist=["compute_edit_quality"])
    real_quality = editor_mod.compute_edit_quality
    seen: list[tuple[str, str, str, str]] = []

    def spy_quality(model, model_name, hparams, tok, record, device, **kw):
        seen.append(("metric", record["prompt"], record.get("rephrase_prompt"),
                     record["locality"]["neighborhood"]["prompt"]))
        return real_quality(model, model_name, hparams, tok, record, device, **kw)

    real_exec = instructedit_main.execute_instructedit
    executed: list[str] = []

    def spy_exec(model, tok, requests, hparams, nets=None):
        executed.extend(instructedit_main.instructed_prompts(requests, hparams))
        return real_exec(model, tok, requests, hparams, nets)

    monkeypatch.setattr(editor_mod, "compute_edit_quality", spy_quality)
    monkeypatch.setattr(instructedit_main, "execute_instructedit", spy_exec)
    monkeypatch.setattr(instructedit_main, "load_instructions", lambda path=None: tiny_instructions)

    model, tok = embedded_model
    hp = InstructEditHyperParams.from_hparams(str(REPO_ROOT / "hparams/InstructEdit/smollm2-135m"))
    assert type(hp.model_name) is str  # the hparams know nothing of EasyEdit; BaseEditor's patch wraps the name
    hp.model_name = PreloadedModel("smollm2-135m-instruct", model, tok)
    hp.archive = str(tiny_archive)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = wrap_edit_inputs(hp, task="counterfact", instructions=tiny_instructions,
                              prompts=["The Eiffel Tower is located in the city of"], target_new=["Rome"],
                              ground_truth=["Paris"], rephrase_prompts=["The Eiffel Tower can be found in"],
                              locality_inputs={"neighborhood": {"prompt": ["The Colosseum is in"],
                                                                "ground_truth": ["Rome"]}})
    with cuda_on_cpu():
        editor = easyeditor_module.BaseEditor.from_hparams(hp)
        assert editor.alg_name == "InstructEdit"
        metrics, edited, weights_copy = editor.edit(keep_original_weight=True, verbose=False, **kwargs)
    assert len(seen) == 2  # pre, then post
    (_, pre_p, pre_r, pre_l), (_, post_p, post_r, post_l) = seen
    assert pre_p == post_p == executed[0] and pre_r == post_r
    assert is_wrapped(pre_p) and is_wrapped(pre_r) and pre_p.endswith("Input: The Eiffel Tower is located in the city of")
    assert pre_l == post_l == "The Colosseum is in"  # locality never wrapped
    m = metrics[0]
    assert set(m) >= {"pre", "post", "requested_rewrite"}
    assert float(m["post"]["rewrite_acc"][0]) > float(m["pre"]["rewrite_acc"][0])
    for n, p in model.named_parameters():  # BaseEditor restored the weights bit-exactly
        assert torch.equal(p, before[n]), n


def test_batch_edit_dispatches(easyeditor_module, embedded_model, tiny_archive, tiny_instructions, monkeypatch):
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
    from easyedit_agrade.integration.preloaded import PreloadedModel
    from easyedit_agrade.models.instructedit import InstructEditHyperParams, instructedit_main, wrap_edit_inputs

    monkeypatch.setattr(instructedit_main, "load_instructions", lambda path=None: tiny_instructions)
    model, tok = embedded_model
    hp = InstructEditHyperParams.from_hparams(str(REPO_ROOT / "hparams/InstructEdit/smollm2-135m"))
    hp.model_name = PreloadedModel("smollm2-135m-instruct", model, tok)
    hp.archive, hp.batch_size = str(tiny_archive), 2
    kwargs = wrap_edit_inputs(hp, task="counterfact", instructions=tiny_instructions,
                              prompts=["The capital of Germany is", "Apple A5 was created by"],
                              target_new=["Paris", "Google"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with cuda_on_cpu():
        editor = easyeditor_module.BaseEditor.from_hparams(hp)
        metrics, _, weights_copy = editor.batch_edit(verbose=False, **kwargs)
    assert len(metrics) == 2 and set(weights_copy) == set(hp.inner_params)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_shipped_archive_is_found_out_of_the_box(embedded_model):
    from easyedit_agrade.models.instructedit import InstructEditHyperParams
    from easyedit_agrade.models.instructedit.archive import ARCHIVES_DIR, find_archive

    shipped = ARCHIVES_DIR / "instructedit-smollm2-135m.safetensors"
    if not shipped.is_file():
        pytest.skip(f"{shipped.name} not shipped yet")
    hp = InstructEditHyperParams.from_hparams(str(REPO_ROOT / "hparams/InstructEdit/smollm2-135m"))
    assert find_archive(embedded_model[0], hp) == shipped


def test_sequential_edits_on_an_already_edited_model(embedded_model, tiny_archive, tiny_instructions, monkeypatch):
    """The archive's fingerprint covers the edited weights' values: the second of two sequential edits (the bench's
    ``batch_size: 1`` mode, BaseEditor's ``sequential_edit=True``) sees weights changed by the first and must not be
    rejected as a model the archive was not trained for (it failed with ArchiveNotFoundError/ArchiveMismatchError)."""
    from easyedit_agrade.core.weights import restore_weights
    from easyedit_agrade.models.instructedit import InstructEditHyperParams, instructedit_main

    monkeypatch.setattr(instructedit_main, "load_instructions", lambda path=None: tiny_instructions)
    model, tok = embedded_model
    hp = InstructEditHyperParams.from_hparams(str(REPO_ROOT / "hparams/InstructEdit/smollm2-135m"))
    hp.archive, hp.batch_size = str(tiny_archive), 1
    requests = [{"prompt": "The capital of Germany is", "target_new": "Paris", "task": "counterfact"},
                {"prompt": "Apple A5 was created by", "target_new": "Google", "task": "counterfact"}]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    originals: dict = {}
    try:
        for req in requests:
            model, copy = instructedit_main.apply_instructedit_to_model(model, tok, [req], hp,
                                                                        return_orig_weights=True)
            for k, v in copy.items():
                originals.setdefault(k, v)
        name = hp.inner_params[0]
        assert not torch.equal(dict(model.named_parameters())[name], before[name])  # both edits applied
    finally:
        restore_weights(model, originals)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
