"""AGRADE's ``edit_rounds``: one round is the plain edit; two rounds equal a reference built by hand (edit, apply,
edit the edited model again, sum); the model is restored exactly; a round is skipped once the cache pass's
target-token accuracy reaches ``rounds_stop_accuracy`` (and that accuracy is the model's own argmax accuracy);
the executor applies the summed ΔW; bad values name the field."""
from __future__ import annotations

import pytest
import torch

from agrade_helpers import records, tiny_agrade_archive, tiny_editor
from easyedit_agrade.core.weights import apply_deltas, restore_weights
from easyedit_agrade.hparams import HyperParamsError
from easyedit_agrade.models.agrade import AGRADEHyperParams, apply_agrade_to_model


def _batch(n=6):
    recs = records(n)
    return [r.prompt for r in recs], [r.target_new for r in recs]


def _weights(editor):
    return {n: p.detach().clone() for n, p in editor.model.named_parameters()}


def test_one_round_is_the_plain_edit(tok):
    prompts, targets = _batch()
    ed = tiny_editor(tok)
    assert ed.hparams.edit_rounds == 1
    result = ed.edit_deltas(prompts, targets)
    plain = ed.compute(ed.cache(ed.encode(prompts, targets), keep_hidden=False), keep_modules=False)
    assert result.rounds == []
    assert all(torch.equal(result.deltas[k], plain.deltas[k]) for k in plain.deltas)


def test_two_rounds_equal_edit_apply_edit_again(tok):
    prompts, targets = _batch()
    ed = tiny_editor(tok, edit_rounds=2, rounds_stop_accuracy=None)
    before = _weights(ed)
    two = ed.edit_deltas(prompts, targets)
    after = _weights(ed)
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored exactly
    assert [r["solved"] for r in two.rounds] == [True, True]

    ref = tiny_editor(tok)  # same seed: the same model and network
    first = ref.edit_deltas(prompts, targets)
    copy = apply_deltas(ref.model, first.deltas, mode="inplace")
    second = ref.edit_deltas(prompts, targets)  # the residual edit, on the edited model
    restore_weights(ref.model, copy)
    for k in first.deltas:
        assert second.deltas[k].abs().max() > 0
        torch.testing.assert_close(two.deltas[k], first.deltas[k] + second.deltas[k], rtol=1e-12, atol=1e-14)


def _manual_accuracy(ed, prompts, targets):
    correct = total = 0
    with torch.no_grad():
        for mb in ed.encode(prompts, targets):
            logits = ed.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            pred = logits.argmax(-1)[mb.predict_mask]
            correct += int((pred == mb.labels[mb.predict_mask]).sum())
            total += int(mb.predict_mask.sum())
    return correct, total


def _boost_first_target(ed, prompts, targets):
    """Make the first target token of the first request the argmax everywhere (a hook on the LM head adds 1e4
    to its logit): a tiny random model predicts no target, so this gives the accuracy something to count."""
    mb = ed.encode(prompts[:1], targets[:1])[0]
    token = int(mb.labels[mb.predict_mask][0])

    def hook(_mod, _inp, out):
        out = out.clone()
        out[..., token] += 1e4
        return out

    return ed.model.get_output_embeddings().register_forward_hook(hook)


def test_cache_pass_counts_the_models_own_target_accuracy(tok):
    prompts, targets = _batch()
    ed = tiny_editor(tok)
    cache = ed.cache(ed.encode(prompts, targets), keep_hidden=False)
    assert (cache.n_correct, cache.n_targets) == _manual_accuracy(ed, prompts, targets)
    assert cache.n_targets == cache.n_rows(ed.stack.module_names[0]) > 0  # one row per target token
    handle = _boost_first_target(ed, prompts, targets)
    try:
        boosted = ed.cache(ed.encode(prompts, targets), keep_hidden=False)
        assert (boosted.n_correct, boosted.n_targets) == _manual_accuracy(ed, prompts, targets)
    finally:
        handle.remove()
    assert boosted.n_correct > cache.n_correct


def test_round_skipped_once_accuracy_reached(tok):
    prompts, targets = _batch()
    free = tiny_editor(tok, edit_rounds=3, rounds_stop_accuracy=None)
    handle = _boost_first_target(free, prompts, targets)
    try:
        every = free.edit_deltas(prompts, targets)
    finally:
        handle.remove()
    accuracy = every.rounds[0]["accuracy_before"]
    assert accuracy > 0 and [r["solved"] for r in every.rounds] == [True, True, True]

    stopping = tiny_editor(tok, edit_rounds=3, rounds_stop_accuracy=accuracy / 2)
    one = tiny_editor(tok)
    handles = [_boost_first_target(e, prompts, targets) for e in (stopping, one)]
    try:
        stopped = stopping.edit_deltas(prompts, targets)
        single = one.edit_deltas(prompts, targets)
    finally:
        for h in handles:
            h.remove()
    # round 1 is always solved; round 2's cache pass finds the accuracy reached and solves nothing
    assert [r["solved"] for r in stopped.rounds] == [True, False]
    assert stopped.rounds[1]["accuracy_before"] >= accuracy / 2
    assert all(torch.equal(stopped.deltas[k], single.deltas[k]) for k in single.deltas)
    assert any(not torch.equal(every.deltas[k], single.deltas[k]) for k in single.deltas)


def test_executor_applies_the_summed_rounds(tmp_path, tok):
    model, hp = tiny_agrade_archive(tmp_path, tok, edit_rounds=2, rounds_stop_accuracy=None)
    reqs = [r.to_request() for r in records(4)]
    before = {p: t.detach().clone() for p, t in model.named_parameters() if p in hp.inner_params}
    _, copy = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)
    assert all(torch.equal(copy[p], before[p]) for p in hp.inner_params)
    edited = {p: t.detach().clone() for p, t in model.named_parameters() if p in hp.inner_params}
    for p, t in model.named_parameters():
        if p in hp.inner_params:
            t.data.copy_(before[p])
    hp1 = AGRADEHyperParams.from_dict(dict(hp.to_dict(), edit_rounds=1))
    apply_agrade_to_model(model, tok, reqs, hp1)
    one = {p: t.detach().clone() for p, t in model.named_parameters() if p in hp.inner_params}
    # the second round moved the weights further than the one-round edit
    assert all(not torch.allclose(edited[p], one[p]) for p in hp.inner_params)


@pytest.mark.parametrize("field,value", [("edit_rounds", 0), ("edit_rounds", 1.5), ("edit_rounds", True),
                                         ("rounds_stop_accuracy", 0.0), ("rounds_stop_accuracy", 1.5)])
def test_bad_values_name_the_field(tmp_path, tok, field, value):
    _, hp = tiny_agrade_archive(tmp_path, tok)
    with pytest.raises(HyperParamsError, match=field):
        AGRADEHyperParams.from_dict(dict(hp.to_dict(), **{field: value}))


def test_streamed_rounds_equal_in_memory_rounds(tok, tmp_path):
    """The streamed / spilled path (the one data-parallel editing takes) runs the same rounds."""
    prompts, targets = _batch()
    mem = tiny_editor(tok, edit_rounds=2, rounds_stop_accuracy=None).edit_deltas(prompts, targets)
    spill = tiny_editor(tok, edit_rounds=2, rounds_stop_accuracy=None, cache_spill=True,
                        cache_spill_dir=str(tmp_path)).edit_deltas(prompts, targets)
    assert [r["accuracy_before"] for r in spill.rounds] == [r["accuracy_before"] for r in mem.rounds]
    for k, d in mem.deltas.items():
        torch.testing.assert_close(spill.deltas[k], d, rtol=1e-6, atol=1e-9)
    assert list(tmp_path.iterdir()) == []  # every round's spill folder was removed


def test_rounds_yaml_is_the_default_with_two_rounds():
    """hparams/AGRADE/smollm2-135m-rounds.yaml stays the shipped YAML except for the settings chosen for rounds."""
    from easyedit_agrade.paths import REPO_ROOT

    default = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams/AGRADE/smollm2-135m")).to_dict()
    rounds = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams/AGRADE/smollm2-135m-rounds")).to_dict()
    assert {k for k in default if default[k] != rounds[k]} == {"edit_rounds", "preserved_change_budget"}
    assert (default["edit_rounds"], rounds["edit_rounds"]) == (1, 2)
    assert rounds["preserved_change_budget"] < default["preserved_change_budget"]
