"""Question-style preserved keys (``preserved_records``): the records' text is their prompts with the true answers,
written once; C₀ is the weighted sum of the corpus's and the records' statistics; weight 0 / no records is the
corpus path bit for bit; the editor solves with the mixture; bad settings name the field and write nothing."""
from __future__ import annotations

import json

import pytest
import torch

from easyedit_agrade.core import preserved_stats as ps
from easyedit_agrade.hparams import HyperParamsError
from easyedit_agrade.models.agrade import preserved_records as pr

from agrade_helpers import LLAMA_PARAMS, records, tiny_editor, tiny_llama
from test_preserved_term import settings  # noqa: F401  (fixture: a corpus, 192 tokens in windows of 32)

MODULES = [p[: -len(".weight")] for p in LLAMA_PARAMS]
CITIES = ["Lyon", "Porto", "Graz", "Ghent", "Turku", "Brno", "Split", "Cork", "Bergen", "Kassel", "Aarhus", "Basel"]


def zsre_record(i: int) -> dict:
    city = CITIES[i % len(CITIES)]
    return {"subject": f"Person {i}", "src": f"In which city was Person {i} born?", "answers": [city],
            "alt": "Oslo", "rephrase": f"Where was Person {i} born?",
            "loc": f"nq question: who founded the museum of {city}", "loc_ans": f"the mayor of {city}"}


@pytest.fixture
def record_file(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([zsre_record(i) for i in range(40)]), encoding="utf-8")
    return path


def test_record_text_is_the_prompts_with_their_true_answers_written_once(record_file, tmp_path, monkeypatch):
    root = tmp_path / "stats"
    text = pr.record_text_file(f"{record_file}@1:3", root)
    assert text.parent == root / "record_text"
    assert text.read_text(encoding="utf-8").splitlines() == [
        "In which city was Person 1 born? Porto", "nq question: who founded the museum of Porto the mayor of Porto",
        "In which city was Person 2 born? Graz", "nq question: who founded the museum of Graz the mayor of Graz"]
    writes = []
    monkeypatch.setattr(pr, "atomic_write_text", lambda *a: writes.append(a))
    assert pr.record_text_file(f"{record_file}@1:3", root) == text and writes == []  # reused, not rewritten
    other = pr.record_text_file(f"{record_file}@0:3", root)  # another range: another file
    assert other != text and len(writes) == 1


def _mixed(model, tok, settings, **over):
    from easyedit_agrade.models.agrade.agrade_hparams import AGRADEHyperParams

    hp = AGRADEHyperParams(**{**dict(alg_name="AGRADE", model_name="tiny", inner_params=list(LLAMA_PARAMS)),
                              **settings, **over})
    return pr.mixed_second_moments(model, tok, MODULES, hp, progress=False)


def test_mixture_is_the_weighted_sum_and_weight_zero_is_the_corpus(tok, settings, record_file):
    model = tiny_llama(len(tok))
    root = settings["preserved_stats_dir"]
    corpus = ps.load_or_compute_second_moments(model, tok, MODULES, corpus=settings["preserved_corpus"],
                                               n_tokens=192, window=32, root=root, progress=False)
    text = pr.record_text_file(str(record_file), root)
    questions = ps.load_or_compute_second_moments(model, tok, MODULES, corpus=text, n_tokens=192, window=32,
                                                  root=root, progress=False)
    mixed = _mixed(model, tok, settings, preserved_records=str(record_file), preserved_records_weight=0.25)
    for n in MODULES:
        assert not torch.allclose(corpus[n], questions[n])
        torch.testing.assert_close(mixed[n], 0.75 * corpus[n] + 0.25 * questions[n], rtol=0, atol=0)
    for over in (dict(preserved_records=str(record_file), preserved_records_weight=0.0), {}):
        same = _mixed(model, tok, settings, **over)
        assert all(torch.equal(same[n], corpus[n]) for n in MODULES)


def _deltas(ed, recs):
    return ed.compute(ed.cache(ed.encode([r.prompt for r in recs], [r.target_new for r in recs]))).deltas


def test_the_editor_solves_with_the_mixture(tok, settings, record_file):
    recs = records(6)
    base = dict(use_preserved_cov=True, log_mu_init=12.0, **settings)
    corpus_ed = tiny_editor(tok, **base)
    zero_ed = tiny_editor(tok, preserved_records=str(record_file), preserved_records_weight=0.0, **base)
    mixed_ed = tiny_editor(tok, preserved_records=str(record_file), preserved_records_weight=0.5, **base)
    expected = _mixed(mixed_ed.model, tok, settings, preserved_records=str(record_file), preserved_records_weight=0.5)
    assert all(torch.equal(mixed_ed.second_moments[n], expected[n]) for n in MODULES)
    plain, zero, mixed = _deltas(corpus_ed, recs), _deltas(zero_ed, recs), _deltas(mixed_ed, recs)
    for n in plain:
        assert torch.equal(zero[n], plain[n])
        assert not torch.allclose(mixed[n], plain[n])
        # the records' keys see less change than under the corpus-only term: the mixture protects them
        Cq = 2 * expected[n].double() - corpus_ed.second_moments[n].double()
        assert float(torch.trace(mixed[n].T @ Cq @ mixed[n])) < float(torch.trace(plain[n].T @ Cq @ plain[n]))


@pytest.mark.parametrize("over, field", [
    (dict(preserved_records_weight=1.5), "preserved_records_weight"),
    (dict(preserved_records_weight=True), "preserved_records_weight"),
    (dict(preserved_records=""), "preserved_records"),
])
def test_bad_settings_name_the_field(tok, settings, over, field):
    with pytest.raises(HyperParamsError, match=field):
        tiny_editor(tok, use_preserved_cov=True, **settings, **over)


def test_bad_or_missing_records_name_the_field_and_write_nothing(tok, settings, record_file, tmp_path):
    model = tiny_llama(len(tok))
    with pytest.raises(HyperParamsError, match="preserved_records: pool entry"):
        _mixed(model, tok, settings, preserved_records=f"{record_file}@5:2")
    with pytest.raises(FileNotFoundError, match="preserved_records 'nowhere.json@0:10'"):
        _mixed(model, tok, settings, preserved_records="nowhere.json@0:10")
    assert not (tmp_path / "stats").exists()  # refused before any statistics or text were written
    with pytest.raises(ValueError, match="preserved_records .*@0:2.*only .* tokens"):  # too little text for 192
        _mixed(model, tok, settings, preserved_records=f"{record_file}@0:2")
