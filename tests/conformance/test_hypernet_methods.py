"""One conformance suite for every hypernetwork method in ``easyedit_agrade.registry`` (peft's common-tester pattern).

Each method, with its shipped archive and its shipped YAML on the embedded SmolLM2, must:

1. edit through its EasyEdit executor (``apply_<method>_to_model``): the edited weights change, ``weights_copy`` holds
   exactly the originals, and EasyEdit's own restore gives the model back bit for bit;
2. give EasyEdit's metric keys through ``BaseEditor.edit`` (pre and post ``rewrite_acc``, ``rephrase_acc``; post
   ``locality``), with the model restored afterwards;
3. survive an archive round trip: ``ARCHIVE.load`` → ``ARCHIVE.save`` → ``load`` gives the same tensors, and
   editing with the re-saved archive gives the same ΔW;
4. refuse bad input with a ``ValueError`` that names the problem, leaving every weight untouched.

A method added to the registry is picked up here without a new test file.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from easyedit_agrade.paths import REPO_ROOT, data_file
from easyedit_agrade.registry import METHODS

pytestmark = pytest.mark.usefixtures("shared_data")


def _ids(m):
    return m.alg_name


@pytest.fixture(params=METHODS, ids=_ids)
def method(request):
    return request.param


def hparams_for(entry, **over):
    cls = getattr(importlib.import_module(entry.hparams_module), entry.hparams_class)
    hp = cls.from_hparams(str(REPO_ROOT / "hparams" / entry.alg_name / "smollm2-135m"))
    for k, v in over.items():
        setattr(hp, k, v)
    return hp


def executor_for(entry):
    return getattr(importlib.import_module(entry.package), entry.executor)


def archive_format(entry):
    return importlib.import_module(f"{entry.package}.archive").ARCHIVE


def requests(n=2):
    from easyedit_agrade.dataset import read_records

    # "task" picks InstructEdit's instruction (as the bench passes it); the other methods ignore it
    return [{**r.to_request(), "task": "counterfact"}
            for r in read_records(data_file("counterfact/counterfact-val.json"), limit=n)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, snap):
    now = model.state_dict()
    changed = [k for k, v in snap.items() if not torch.equal(v, now[k])]
    assert not changed, f"weights changed: {changed[:3]}"


def restore(model, weights_copy):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights_copy.items():
            params[k][...] = v


def test_every_method_has_the_parts_the_suite_needs(method):
    pkg = importlib.import_module(method.package)
    assert callable(getattr(pkg, method.executor)) and getattr(pkg, method.trainer_class)
    assert (REPO_ROOT / "hparams" / method.alg_name / "smollm2-135m.yaml").is_file()
    assert hasattr(archive_format(method), "find") and hasattr(archive_format(method), "load")


def test_edit_then_exact_restore(method, embedded_model):
    model, tok = embedded_model
    hp = hparams_for(method)
    snap = snapshot(model)
    weights_copy = {}
    try:
        edited, weights_copy = executor_for(method)(model, tok, requests(2), hp, return_orig_weights=True)
        assert edited is model and weights_copy
        names = {p.removesuffix(".weight") for p in hp.inner_params} | set(hp.inner_params)
        assert set(weights_copy) <= names | {n + ".weight" for n in names}
        assert all(torch.equal(v, snap[k]) for k, v in weights_copy.items())  # the originals, exactly
        assert any(not torch.equal(model.state_dict()[k], snap[k]) for k in weights_copy)  # it edited
    finally:
        restore(model, weights_copy)
    assert_same(model, snap)


@pytest.mark.slow
def test_metric_keys_through_base_editor(method, embedded_model, easyeditor_module):
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu

    model, tok = embedded_model
    hp = hparams_for(method)
    if hasattr(hp, "task"):  # BaseEditor.edit has no per-request task: InstructEdit's instruction from the hparams
        hp.task = "counterfact"
    req = requests(1)[0]
    snap = snapshot(model)
    with cuda_on_cpu():
        editor = easyeditor_module.BaseEditor.from_hparams(hp)
        metrics, _, _ = editor.edit(prompts=[req["prompt"]], ground_truth=[req["ground_truth"]],
                                    target_new=[req["target_new"]], rephrase_prompts=[req["rephrase_prompt"]],
                                    locality_inputs={"neighborhood": {"prompt": [req["locality"]["neighborhood"]
                                                                                 ["prompt"]],
                                                                      "ground_truth": [req["locality"]["neighborhood"]
                                                                                       ["ground_truth"]]}},
                                    keep_original_weight=True, verbose=False)
    m = metrics[0]
    assert {"rewrite_acc", "rephrase_acc"} <= set(m["pre"]), m["pre"].keys()
    assert {"rewrite_acc", "rephrase_acc", "locality"} <= set(m["post"]), m["post"].keys()
    assert m["post"]["locality"], "no locality metric after the edit"
    assert_same(editor.model, {k: v for k, v in snap.items()})


def test_archive_round_trip(method, embedded_model, tmp_path):
    model, tok = embedded_model
    hp = hparams_for(method)
    fmt = archive_format(method)
    path = fmt.find(model, hp)
    nets = fmt.load(path, model, hp)
    resaved = tmp_path / f"{method.alg_name}.safetensors"
    fmt.save(resaved, nets, model, hp, {"note": "conformance round trip"})
    again = fmt.load(resaved, model, hp)
    a, b = nets.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    run = executor_for(method)
    snap = snapshot(model)
    deltas = []
    for archive in (str(path), str(resaved)):
        hp_i = hparams_for(method, archive=archive)
        _, wc = run(model, tok, requests(2), hp_i, return_orig_weights=True)
        deltas.append({k: model.state_dict()[k] - wc[k] for k in wc})
        restore(model, wc)
    assert deltas[0].keys() == deltas[1].keys()
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    assert_same(model, snap)


@pytest.mark.parametrize("bad, needle", [
    ({"target_new": ""}, "target"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "word " * 400}, "max_length|tokens|long"),
])
def test_bad_input_is_refused_and_nothing_changes(method, embedded_model, bad, needle):
    model, tok = embedded_model
    hp = hparams_for(method)
    reqs = requests(2)
    reqs[1] = {**reqs[1], **bad}
    snap = snapshot(model)
    with pytest.raises(ValueError, match=needle):
        executor_for(method)(model, tok, reqs, hp, return_orig_weights=True)
    assert_same(model, snap)
