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
        torch.testing.assert_close(two.deltas[k], first.deltas[k] + second.deltas[k], rtol=1e-9, atol=1e-12)


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
        forward_only = ed.target_accuracy(ed.encode(prompts, targets))  # the check after a last round
        assert forward_only == boosted.n_correct / boosted.n_targets
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
    from easyedit_agrade.models.agrade.archive import load_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor

    model, hp = tiny_agrade_archive(tmp_path, tok, edit_rounds=2, rounds_stop_accuracy=None)
    recs = records(4)
    before = {p: t.detach().clone() for p, t in model.named_parameters() if p in hp.inner_params}
    expected = AGRADEEditor(model, tok, hp, load_networks(hp.archive, model, hp)).edit_deltas(
        [r.prompt for r in recs], [r.target_new for r in recs], subjects=[r.subject for r in recs])
    _, copy = apply_agrade_to_model(model, tok, [r.to_request() for r in recs], hp, return_orig_weights=True)
    assert all(torch.equal(copy[p], before[p]) for p in hp.inner_params)
    params = dict(model.named_parameters())
    for p in hp.inner_params:
        module = p[: -len(".weight")]
        want = before[p] + expected.deltas[module].T.to(before[p].dtype)  # editor layout → nn.Linear layout
        torch.testing.assert_close(params[p].detach(), want, rtol=1e-6, atol=1e-9)


def test_rounds_keep_earlier_hook_edits_across_chunks(tmp_path, tok):
    """apply_mode: hook with several chunks: chunk 1's ΔW hook must survive chunk 2's rounds (the rounds add the
    running sum through their own temporary hooks, never by writing and restoring the weights)."""
    from easyedit_agrade.core.weights import has_delta_hooks, restore_weights

    reqs = [r.to_request() for r in records(4)]
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    outputs = {}
    for mode in ("inplace", "hook"):
        model, hp = tiny_agrade_archive(tmp_path / mode, tok, edit_rounds=2, rounds_stop_accuracy=None,
                                        batch_size=2, apply_mode=mode)
        _, copy = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)
        with torch.no_grad():
            outputs[mode] = model(input_ids=ids).logits
        if mode == "hook":
            assert has_delta_hooks(model)
        restore_weights(model, copy)
    torch.testing.assert_close(outputs["hook"], outputs["inplace"], rtol=1e-5, atol=1e-6)


def test_a_failing_round_leaves_model_and_hooks_untouched(tok, monkeypatch):
    from easyedit_agrade.core.weights import has_delta_hooks

    prompts, targets = _batch()
    ed = tiny_editor(tok, edit_rounds=3, rounds_stop_accuracy=None)
    first = tiny_editor(tok).edit_deltas(prompts, targets)
    apply_deltas(ed.model, first.deltas, mode="hook")  # an earlier edit held in hooks
    before = _weights(ed)
    calls = []
    real = ed.compute

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in round 2")
        return real(*a, **k)

    monkeypatch.setattr(ed, "compute", failing)
    with pytest.raises(RuntimeError, match="boom in round 2"):
        ed.edit_deltas(prompts, targets)
    assert all(torch.equal(before[k], v) for k, v in _weights(ed).items())
    assert has_delta_hooks(ed.model) and not ed.later_round
    assert all(not m._forward_hooks or len(m._forward_hooks) == 1 for m in ed.model.modules()
               if getattr(m, "weight", None) is not None and m.weight.dim() == 2)


def test_largest_step_within_solves_the_budget_quadratic():
    from easyedit_agrade.models.agrade.editor import largest_step_within, output_energy

    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    C0, P, D = A @ A.T / 8, torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g,
                                                                                             dtype=torch.float64)
    a, full = output_energy(C0, P), output_energy(C0, P + D)
    limit = (a + full) / 2 if full > a else a * 1.01
    t = largest_step_within(C0, P, D, limit)
    assert 0 <= t <= 1
    assert output_energy(C0, P + t * D) <= limit * (1 + 1e-9)
    if 0 < t < 1:  # on the boundary: a slightly larger step is over
        torch.testing.assert_close(torch.tensor(output_energy(C0, P + t * D)), torch.tensor(limit), rtol=1e-9, atol=0)
    assert largest_step_within(C0, P, D, a * 0.5) == 0.0  # the earlier rounds alone are over
    assert largest_step_within(C0, P, D, full * 10 + a * 10) == 1.0


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


def test_rounds_yaml_is_the_default_with_guarded_rounds():
    """hparams/AGRADE/smollm2-135m-rounds.yaml stays the shipped YAML except for the rounds and the perplexity guard
    that ends them."""
    from easyedit_agrade.paths import REPO_ROOT

    default = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams/AGRADE/smollm2-135m")).to_dict()
    rounds = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams/AGRADE/smollm2-135m-rounds")).to_dict()
    assert {k for k in default if default[k] != rounds[k]} == {"edit_rounds", "max_heldout_ppl_ratio"}
    assert (default["edit_rounds"], rounds["edit_rounds"]) == (1, 6)
    assert default["max_heldout_ppl_ratio"] is None and 1 < rounds["max_heldout_ppl_ratio"] <= 1.3


def _scripted_accuracy(ed, accuracies, after_last=None):
    """The editor's cache passes report these accuracies in turn (the real H and ∇G are cached and solved), and
    the forward-only check after a last round reports ``after_last``."""
    real, seq = ed.cache, iter(accuracies)

    def cache(*args, **kwargs):
        c = real(*args, **kwargs)
        c.n_correct = round(next(seq) * c.n_targets)
        return c

    ed.cache = cache
    if after_last is not None:
        ed.target_accuracy = lambda *args, **kwargs: after_last


def test_a_later_round_that_lowers_accuracy_is_undone_and_ends_the_rounds(tok):
    prompts, targets = _batch()
    ed = tiny_editor(tok, edit_rounds=4, rounds_stop_accuracy=None)
    n_targets = ed.cache(ed.encode(prompts, targets), keep_hidden=False).n_targets
    acc = [k / n_targets for k in (1, 5, 3, 9)]  # round 2 made it worse (5 -> 3 correct)
    _scripted_accuracy(ed, acc)
    undone = ed.edit_deltas(prompts, targets)
    assert [(r["solved"], r.get("undone", False)) for r in undone.rounds] == [(True, False), (True, True),
                                                                               (False, False)]
    assert [r["accuracy_before"] for r in undone.rounds] == pytest.approx(acc[:3])
    one = tiny_editor(tok).edit_deltas(prompts, targets)  # the same model and network, one round
    assert all(torch.equal(undone.deltas[k], one.deltas[k]) for k in one.deltas)  # round 2's ΔW is gone, bit for bit

    ed = tiny_editor(tok, edit_rounds=4, rounds_stop_accuracy=None)
    _scripted_accuracy(ed, [k / n_targets for k in (1, 5, 6, 9)], after_last=10 / n_targets)  # rising: all kept
    kept = ed.edit_deltas(prompts, targets)
    assert [r["solved"] for r in kept.rounds] == [True] * 4 and not any(r.get("undone") for r in kept.rounds)
    assert kept.rounds[-1]["accuracy_after"] == 10 / n_targets
    plain = tiny_editor(tok, edit_rounds=4, rounds_stop_accuracy=None).edit_deltas(prompts, targets)
    assert all(torch.equal(kept.deltas[k], plain.deltas[k]) for k in plain.deltas)  # the scripted pass changes nothing else


def test_a_last_round_that_lowers_accuracy_is_undone_by_a_forward_pass(tok):
    prompts, targets = _batch()
    ed = tiny_editor(tok, edit_rounds=3, rounds_stop_accuracy=None)
    n_targets = ed.cache(ed.encode(prompts, targets), keep_hidden=False).n_targets
    _scripted_accuracy(ed, [k / n_targets for k in (1, 5, 6)], after_last=4 / n_targets)  # round 3: 6 -> 4
    result = ed.edit_deltas(prompts, targets)
    assert [(r["solved"], r.get("undone", False)) for r in result.rounds] == [(True, False), (True, False),
                                                                               (True, True)]
    two = tiny_editor(tok, edit_rounds=2, rounds_stop_accuracy=None)
    _scripted_accuracy(two, [k / n_targets for k in (1, 5)], after_last=6 / n_targets)
    kept_two = two.edit_deltas(prompts, targets)
    assert all(torch.equal(result.deltas[k], kept_two.deltas[k]) for k in kept_two.deltas)


def test_round_one_is_kept_even_when_the_next_pass_is_worse(tok):
    prompts, targets = _batch()
    ed = tiny_editor(tok, edit_rounds=3, rounds_stop_accuracy=None)
    n_targets = ed.cache(ed.encode(prompts, targets), keep_hidden=False).n_targets
    _scripted_accuracy(ed, [k / n_targets for k in (4, 2, 3)], after_last=3 / n_targets)
    result = ed.edit_deltas(prompts, targets)
    assert [r["solved"] for r in result.rounds] == [True, True, True] and not any(r.get("undone") for r in result.rounds)


@pytest.mark.parametrize("rounds", [1, 2])
def test_the_report_path_solves_as_the_executor(tok, rounds):
    """``evaluate_records`` (the scaling report, calibration, the trainer's validation) edits through the same
    dispatch as the executor's ``edit_deltas``: the same ΔW (its norm, to the last bit) for one round and for the
    summed rounds, and the model restored exactly afterwards."""
    from easyedit_agrade.models.agrade.agrade_eval import evaluate_records

    recs = records(6)
    ed = tiny_editor(tok, edit_rounds=rounds, rounds_stop_accuracy=None)
    before = _weights(ed)
    out = evaluate_records(ed, recs, pre=False)
    assert all(torch.equal(before[k], p) for k, p in ed.model.named_parameters())
    ref = ed.edit_deltas([r.prompt for r in recs], [r.target_new for r in recs], subjects=[r.subject for r in recs])
    assert len(ref.rounds) == (0 if rounds == 1 else 2)
    assert out["delta_norm"] == float(sum(float(d.norm()) ** 2 for d in ref.deltas.values()) ** 0.5)
    if rounds == 1:  # and the one-pass solve the report used before it shared the executor's dispatch
        old = ed.compute(ed.cache(ed.encode([r.prompt for r in recs], [r.target_new for r in recs])))
        assert all(torch.equal(old.deltas[k], ref.deltas[k]) for k in ref.deltas)
