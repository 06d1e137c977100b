"""The perplexity guard's store (``core.heldout.HELDOUT_STORE``) on tiny models: a later editor on a model with the
same content reuses the windows, the lower pass and the reference NLL and measures exactly what a fresh editor
would; a weight written through ``.data`` (no version bump) below the first edited layer runs the lower pass
again, one above it only the reference; a hook on the model counts as content; a rewritten corpus is tokenised
again; the executor's second call after a restore gives the first call's ΔW and report."""
from __future__ import annotations

import os

import pytest
import torch

from agrade_helpers import records, tiny_agrade_archive, tiny_editor
from easyedit_agrade.core.heldout import HELDOUT_STORE, HeldOutText
from easyedit_agrade.core.tokenize import spread_windows
from easyedit_agrade.core.weights import restore_weights
from easyedit_agrade.models.agrade import apply_agrade_to_model
from easyedit_agrade.models.agrade.editor import AGRADEEditor


@pytest.fixture
def settings(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"Line {i}: the {w} stands by the river, north of the old market square."
                               for i, w in enumerate(["mill", "tower", "chapel", "bridge"] * 25)), encoding="utf-8")
    return dict(preserved_corpus=str(corpus), preserved_tokens=192, preserved_window=32, heldout_windows=4,
                max_heldout_ppl_ratio=1e9)


@pytest.fixture(autouse=True)
def cold_store():
    HELDOUT_STORE.clear()
    yield
    HELDOUT_STORE.clear()


def _again(ed):
    """A new editor on the same model and network (what the next executor call builds)."""
    return AGRADEEditor(ed.model, ed.tok, ed.hparams, ed.nets)


def _fresh(ed, settings):
    """(text, reference) measured from scratch, bypassing the store."""
    windows = spread_windows(ed.tok, settings["preserved_corpus"], n_windows=4, window=32, skip=192)
    text = HeldOutText.from_windows(ed, windows)
    return text, text.nll()


def _counts():
    return dict(HELDOUT_STORE.stats)


def _delta(ed):
    recs = records(4)
    out = ed.edit_deltas([r.prompt for r in recs], [r.target_new for r in recs]).deltas
    return {k: 50.0 * d for k, d in out.items()}


def test_a_later_editor_on_an_unchanged_model_reuses_everything_and_measures_the_same(tok, settings):
    ed = tiny_editor(tok, **settings)
    text, reference = ed.heldout_text()
    before = _counts()
    text2, reference2 = _again(ed).heldout_text()
    after = _counts()
    assert after["lower_reused"] == before["lower_reused"] + 1 and after["lower_runs"] == before["lower_runs"]
    assert after["reference_reused"] == before["reference_reused"] + 1
    fresh_text, fresh_reference = _fresh(ed, settings)
    assert reference2 == reference == fresh_reference
    deltas = _delta(ed)
    assert text2.nll(deltas) == fresh_text.nll(deltas) != reference


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_a_weight_written_through_data_is_seen(tok, settings, where):
    ed = tiny_editor(tok, **settings)
    _, reference = ed.heldout_text()
    layer = 0 if where == "lower" else 2  # the tiny model edits layers 1-2
    weight = ed.model.model.layers[layer].mlp.up_proj.weight
    version = weight._version
    weight.data.add_(0.05 * torch.randn_like(weight))
    assert weight._version == version  # no version bump: only the content tells
    before = _counts()
    text2, reference2 = _again(ed).heldout_text()
    after = _counts()
    ran_lower = after["lower_runs"] - before["lower_runs"]
    assert ran_lower == (1 if where == "lower" else 0)
    assert after["reference_runs"] == before["reference_runs"] + 1
    fresh_text, fresh_reference = _fresh(ed, settings)
    assert reference2 == fresh_reference != reference
    deltas = _delta(ed)
    assert text2.nll(deltas) == fresh_text.nll(deltas)


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_a_forward_hook_counts_as_content(tok, settings, where):
    ed = tiny_editor(tok, **settings)
    _, reference = ed.heldout_text()
    module = ed.model.model.layers[0 if where == "lower" else 2].mlp
    handle = module.register_forward_hook(lambda _m, _a, out: out * 1.5)
    try:
        before = _counts()
        _, reference2 = _again(ed).heldout_text()
        after = _counts()
        assert after["lower_runs"] - before["lower_runs"] == (1 if where == "lower" else 0)
        assert reference2 == _fresh(ed, settings)[1] != reference
    finally:
        handle.remove()
    before = _counts()
    _, reference3 = _again(ed).heldout_text()  # hook gone: the model is the first one again (the store keeps the
    assert reference3 == reference             # latest state per model, so it measures again)
    assert _counts()["reference_runs"] == before["reference_runs"] + 1


def test_a_rewritten_corpus_is_tokenised_again(tok, settings):
    ed = tiny_editor(tok, **settings)
    path = settings["preserved_corpus"]
    kw = dict(n_windows=4, window=32, skip=192)
    first = HELDOUT_STORE.windows(tok, path, **kw)
    assert HELDOUT_STORE.windows(tok, path, **kw) is first
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("river", "canal"))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new version even on a coarse clock
    second = HELDOUT_STORE.windows(tok, path, **kw)
    assert torch.equal(second, spread_windows(tok, path, **kw)) and not torch.equal(second, first)
    assert ed.heldout_text()[1] == _fresh(ed, settings)[1]


def test_the_executors_second_call_after_a_restore_equals_the_first(tmp_path, tok, settings):
    model, hp = tiny_agrade_archive(tmp_path, tok, batch_size=8, **settings)
    recs = records(6)
    requests = [{"prompt": r.prompt, "target_new": r.target_new} for r in recs]
    out = []
    for _ in range(2):
        _, weights_copy = apply_agrade_to_model(model, tok, requests, hp, return_orig_weights=True)
        edited = {n: p.detach().clone() for n, p in model.named_parameters()}
        out.append((edited, weights_copy.report.heldout_ppl_ratio))
        restore_weights(model, weights_copy)
    assert HELDOUT_STORE.stats["lower_reused"] == 1 and HELDOUT_STORE.stats["reference_reused"] == 1
    (first, r1), (second, r2) = out
    assert r1 == r2 and r1 != 1.0
    assert all(torch.equal(first[n], second[n]) for n in first)
