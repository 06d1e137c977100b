"""AGRADE's perplexity guard (``max_heldout_ppl_ratio``) on tiny models: the held-out NLL (lower layers run once,
ΔW through hooks) equals the full model's perplexity with the ΔW written into the weights; the held-out windows
are spread over the text after the statistics' tokens; a limit never reached is bit-identical to no guard; a round
over the limit is scaled to the largest bisection step within (the next step up is over) with a warning and no later round; a batch
with no step within is not edited; the executor's report holds the call's ratio against the model it was given;
bad values name the field."""
from __future__ import annotations

import math

import pytest
import torch

from agrade_helpers import records, tiny_agrade_archive, tiny_editor
from easyedit_agrade.core.heldout import HeldOutText, largest_step_within_perplexity
from easyedit_agrade.core.tokenize import spread_windows, text_windows
from easyedit_agrade.core.weights import apply_deltas, restore_weights
from easyedit_agrade.evaluate.scoring import perplexity
from easyedit_agrade.hparams import HyperParamsError
from easyedit_agrade.models.agrade import AGRADEHyperParams, apply_agrade_to_model


@pytest.fixture
def settings(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"Line {i}: the {w} stands by the river, north of the old market square."
                               for i, w in enumerate(["mill", "tower", "chapel", "bridge"] * 25)), encoding="utf-8")
    return dict(preserved_corpus=str(corpus), preserved_tokens=192, preserved_window=32, heldout_windows=4)


def _batch(n=6):
    recs = records(n)
    return [r.prompt for r in recs], [r.target_new for r in recs]


def test_heldout_windows_are_spread_over_the_text_after_the_statistics_tokens(tok, settings):
    path = settings["preserved_corpus"]
    ids = tok(open(path, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    slots = (len(ids) - 192) // 32
    assert slots >= 16  # the corpus leaves room to spread 4 windows
    spread = spread_windows(tok, path, n_windows=4, window=32, skip=192)
    starts = [192 + (i * slots // 4) * 32 for i in range(4)]
    assert starts[0] == 192 and starts[-1] > 192 + slots * 32 // 2  # from right after C₀'s tokens to the end
    assert torch.equal(spread, torch.tensor([ids[s:s + 32] for s in starts]))
    # the first window is the one right after the statistics' tokens, as a contiguous read would give
    assert torch.equal(spread[0], text_windows(tok, path, n_windows=1, window=32, skip=192)[0])
    with pytest.raises(ValueError, match="after the first 192"):
        spread_windows(tok, path, n_windows=slots + 1, window=32, skip=192)
    both = text_windows(tok, path, n_windows=10, window=32)
    assert torch.equal(text_windows(tok, path, n_windows=4, window=32, skip=192), both[6:])


def _full_model_nll(model, windows):
    """Mean next-token NLL of the whole model (fp64 logits), independent of the editor's layer split."""
    with torch.no_grad():
        logits = model(input_ids=windows, attention_mask=torch.ones_like(windows)).logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def test_heldout_nll_is_the_full_models_nll_with_the_delta_written(tok, settings):
    prompts, targets = _batch()
    ed = tiny_editor(tok, **settings)
    text, reference = ed.heldout_text()
    windows = spread_windows(tok, settings["preserved_corpus"], n_windows=4, window=32, skip=192)
    assert reference == pytest.approx(_full_model_nll(ed.model, windows), rel=1e-12)
    assert reference == pytest.approx(math.log(perplexity(ed.model, windows)), rel=1e-6)  # perplexity(): fp32 CE
    deltas = {k: 300.0 * d for k, d in ed.edit_deltas(prompts, targets).deltas.items()}  # a visible change
    copy = apply_deltas(ed.model, deltas, mode="inplace")
    try:
        edited = _full_model_nll(ed.model, windows)
    finally:
        restore_weights(ed.model, copy)
    assert abs(edited - reference) > 1e-4  # nats: far above the 1e-10 agreement below
    assert text.nll(deltas) == pytest.approx(edited, rel=1e-10)


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_limit_never_reached_is_the_unguarded_edit_bit_for_bit(tok, settings, rounds):
    prompts, targets = _batch()
    plain = tiny_editor(tok, edit_rounds=rounds, rounds_stop_accuracy=None, **settings).edit_deltas(prompts, targets)
    guarded = tiny_editor(tok, edit_rounds=rounds, rounds_stop_accuracy=None, max_heldout_ppl_ratio=1e9,
                          **settings).edit_deltas(prompts, targets)
    assert [r["step"] for r in guarded.rounds] == [1.0] * rounds
    assert all(r["heldout_ppl_ratio"] > 0 for r in guarded.rounds)
    for k, d in plain.deltas.items():
        assert torch.equal(guarded.deltas[k], d)


def test_a_round_over_the_limit_is_scaled_to_the_largest_step_within(tok, settings):
    prompts, targets = _batch()
    free = tiny_editor(tok, edit_rounds=2, rounds_stop_accuracy=None, **settings)
    text, reference = free.heldout_text()
    one = free.edit_deltas(prompts, targets)
    first = free._edit_round(free.encode(prompts, targets), None)[0].deltas  # round 1 alone
    full = math.exp(text.nll(first) - reference)
    assert full > 1.0, "the tiny edit must raise held-out perplexity for this test to bite"
    limit = 1.0 + 0.5 * (full - 1.0)
    steps = 6
    ed = tiny_editor(tok, edit_rounds=2, rounds_stop_accuracy=None, max_heldout_ppl_ratio=limit,
                     heldout_search_steps=steps, **settings)
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="scaled round 1's ΔW by .*later rounds were not solved"):
        guarded = ed.edit_deltas(prompts, targets)
    assert all(torch.equal(before[k], v) for k, v in ed.model.state_dict().items())  # nothing written
    assert len(guarded.rounds) == 1  # a scaled round is the last
    step, ratio = guarded.rounds[0]["step"], guarded.rounds[0]["heldout_ppl_ratio"]
    assert 0.0 < step < 1.0 and (step * 2 ** steps).is_integer()
    assert ratio <= limit
    assert ratio == pytest.approx(math.exp(text.nll(guarded.deltas) - reference), rel=1e-10)
    up = {k: (step + 2.0 ** -steps) * d for k, d in first.items()}
    assert math.exp(text.nll(up) - reference) > limit  # the next step of the search grid is over the limit
    for k, d in first.items():
        torch.testing.assert_close(guarded.deltas[k], step * d, rtol=1e-12, atol=0)
    assert any(not torch.equal(one.deltas[k], guarded.deltas[k]) for k in first)


def test_a_batch_with_no_step_within_is_not_edited(tok, settings, monkeypatch):
    prompts, targets = _batch()
    ed = tiny_editor(tok, max_heldout_ppl_ratio=1.3, heldout_search_steps=3, **settings)
    _, reference = ed.heldout_text()
    calls = []

    def over_unless_empty(self, deltas=None):  # any nonzero ΔW "doubles" perplexity
        calls.append(deltas)
        nonzero = any(float(d.abs().max()) > 0 for d in (deltas or {}).values())
        return reference + (math.log(2.0) if nonzero else 0.0)

    monkeypatch.setattr(HeldOutText, "nll", over_unless_empty)
    with pytest.warns(RuntimeWarning, match="NOT edited"):
        result = ed.edit_deltas(prompts, targets)
    assert result.rounds[0]["step"] == 0.0 and result.rounds[0]["heldout_ppl_ratio"] == pytest.approx(1.0)
    assert all(float(d.abs().max()) == 0 for d in result.deltas.values())
    assert len(calls) == 1 + 3 + 1  # t = 1, three bisection steps, then base alone


def test_step_search_on_a_known_curve():
    curve = lambda deltas: 0.0 if not deltas else float(deltas["m"]) ** 2  # noqa: E731  (NLL rises as t²)
    step, ratio = largest_step_within_perplexity(curve, 0.0, {}, {"m": torch.tensor(1.0)}, math.exp(0.26), 4)
    assert step == 0.5 and ratio == pytest.approx(math.exp(0.25))  # 0.5625² = 0.316 > 0.26
    step, _ = largest_step_within_perplexity(curve, 0.0, {}, {"m": torch.tensor(1.0)}, math.exp(0.33), 4)
    assert step == 0.5625  # 0.5625² = 0.316 ≤ 0.33 < 0.625²
    step, ratio = largest_step_within_perplexity(curve, 0.0, {"m": torch.tensor(0.2)}, {"m": torch.tensor(1.0)},
                                                 math.exp(2.0), 4)
    assert step == 1.0 and ratio == pytest.approx(math.exp(1.44))  # base + delta = 1.2 fits at once
    with pytest.raises(ValueError, match="search_steps"):
        largest_step_within_perplexity(curve, 0.0, {}, {}, 2.0, -1)


def test_executor_reports_the_calls_ratio_against_the_model_it_was_given(tmp_path, tok, settings):
    model, hp = tiny_agrade_archive(tmp_path, tok, batch_size=3, max_heldout_ppl_ratio=1e9, **settings)
    windows = spread_windows(tok, settings["preserved_corpus"], n_windows=4, window=32, skip=192)
    before = _full_model_nll(model, windows)
    recs = records(6)
    requests = [{"prompt": r.prompt, "target_new": r.target_new} for r in recs]
    _, weights_copy = apply_agrade_to_model(model, tok, requests, hp, return_orig_weights=True)
    report = weights_copy.report
    assert report.chunks == 2 and report.guard_steps == [[1.0], [1.0]]
    after = _full_model_nll(model, windows)
    assert report.heldout_ppl_ratio == pytest.approx(math.exp(after - before), rel=1e-9)
    assert report.to_dict()["heldout_ppl_ratio"] == report.heldout_ppl_ratio
    restore_weights(model, weights_copy)


@pytest.mark.parametrize("field, value, match", [
    ("max_heldout_ppl_ratio", 1.0, "max_heldout_ppl_ratio must be > 1"),
    ("heldout_windows", 0, "heldout_windows must be an integer >= 1"),
    ("heldout_search_steps", 21, "heldout_search_steps must be an integer in"),
    ("heldout_search_steps", True, "'heldout_search_steps': expected an integer"),
])
def test_bad_guard_values_name_the_field(field, value, match):
    cfg = dict(alg_name="AGRADE", model_name="m", inner_params=["model.layers.1.mlp.down_proj.weight"])
    with pytest.raises(HyperParamsError, match=match):
        AGRADEHyperParams.from_dict(dict(cfg, **{field: value}))


def test_the_guard_is_off_while_training(tok, settings):
    ed = tiny_editor(tok, max_heldout_ppl_ratio=1.01, **settings)
    assert ed.heldout_guard_on()
    ed.nets.train()
    assert not ed.heldout_guard_on()


def test_report_counts_an_undone_round_as_step_zero_and_keeps_the_last_kept_ratio():
    from easyedit_agrade.core.edit_report import EditReport
    from easyedit_agrade.models.agrade.guards import note_heldout

    report = EditReport("AGRADE")
    note_heldout([{"solved": True, "step": 1.0, "heldout_ppl_ratio": 1.1},
                  {"solved": True, "step": 0.5, "heldout_ppl_ratio": 1.25, "undone": True}], report)
    assert report.guard_steps == [[1.0, 0.0]] and report.heldout_ppl_ratio == 1.1
    note_heldout([{"solved": True, "step": 1.0, "heldout_ppl_ratio": 1.05}, {"solved": False}], report)
    assert report.guard_steps == [[1.0, 0.0], [1.0]] and report.heldout_ppl_ratio == 1.05

