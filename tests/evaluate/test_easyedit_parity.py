"""Our batched EasyEdit-structure metrics equal EasyEdit's own ``compute_edit_quality`` on the same model state.

EasyEdit scores one record per forward pass without padding; we score all probes in padded batches. On a sample of
real records (zsRE, CounterFact, KnowEdit, with portability and multi-probe locality keys) the rewrite/rephrase/
portability accuracies and the locality argmax tokens must be identical, on the unedited model and on a perturbed
("edited") one, and the locality accuracy must equal what ``BaseEditor.edit`` computes from its pre/post outputs.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from easyedit_agrade.evaluate.records import DISTRACT_NEIGHBOR, build_pool
from easyedit_agrade.evaluate.suite import Evaluator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample(shared_data):
    pool = build_pool(shared_data, seed=0)
    records = pool.take(40)
    # cover every probe kind that the sample offers, keep it small (EasyEdit runs one forward per probe list)
    chosen, seen = [], set()
    for r in records:
        kinds = {"rephrase"} if r.rephrase else set()
        kinds |= {f"loc:{k}" for k in r.locality} | {f"port:{k}" for k in r.portability}
        if kinds - seen or len(chosen) < 3:
            chosen.append(r)
            seen |= kinds
    return chosen


def _easyedit_quality(easyeditor_module, model, tok, request):
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu

    evaluate = importlib.import_module("easyeditor.evaluate")
    hparams = SimpleNamespace(max_length=256, device=0)
    with cuda_on_cpu():
        return evaluate.compute_edit_quality(model, "smollm2-135m-instruct", hparams, tok, request, 0)


def _compare(ours: dict, theirs: dict) -> None:
    assert ours["rewrite_acc"] == pytest.approx(theirs["rewrite_acc"])
    if "rephrase_acc" in theirs:
        assert ours["rephrase_acc"] == pytest.approx(theirs["rephrase_acc"])
    assert ours["portability"].keys() == theirs["portability"].keys()
    for key, vals in theirs["portability"].items():
        assert ours["portability"][key] == pytest.approx(list(vals)), key
    mine = {k: v for k, v in ours["locality"].items() if not k.startswith(DISTRACT_NEIGHBOR)}
    assert mine.keys() == theirs["locality"].keys()
    for key, outs in theirs["locality"].items():
        assert [list(o) if isinstance(o, list) else [o] for o in outs] == mine[key], key


def test_parity_with_compute_edit_quality(easyeditor_module, embedded_model, sample):
    model, tok = embedded_model
    tok.padding_side = "left"  # what PreloadedModel / BaseEditor use for decoder-only models
    ev = Evaluator(tok, batch_tokens=512)
    weight = model.model.layers[20].mlp.down_proj.weight
    original = weight.detach().clone()
    pre = ev.score(model, sample)
    theirs_pre = [_easyedit_quality(easyeditor_module, model, tok, r.to_request()) for r in sample]
    for r, theirs in zip(sample, theirs_pre):
        _compare(ev.easyedit_outputs(r, pre), theirs)
    try:
        with torch.no_grad():  # an "edit": a fixed perturbation large enough to change predictions
            g = torch.Generator().manual_seed(0)
            weight.add_(0.5 * original.std() * torch.randn(original.shape, generator=g))
        post = ev.score(model, sample)
        theirs_post = [_easyedit_quality(easyeditor_module, model, tok, r.to_request()) for r in sample]
    finally:
        with torch.no_grad():
            weight.copy_(original)
    changed = False
    for r, t_pre, t_post in zip(sample, theirs_pre, theirs_post):
        ours = ev.easyedit_outputs(r, post)
        _compare(ours, t_post)
        # BaseEditor.edit: locality acc = mean(equal(post_output, pre_output)) per probe
        ours_post = ev.easyedit_post(r, post, pre)
        for key, outs in t_post["locality"].items():
            name = key[: -len("_output")]
            expected = [float(np.mean(np.equal(a, b))) for a, b in zip(outs, t_pre["locality"][key])]
            assert ours_post["locality"][f"{name}_acc"] == pytest.approx(expected)
            changed |= any(v < 1 for v in expected)
        changed |= ours["rewrite_acc"] != ev.easyedit_outputs(r, pre)["rewrite_acc"]
    assert changed, "the perturbation should change some prediction, or the post-edit check is vacuous"
