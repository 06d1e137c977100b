"""AGRADE's preserved-knowledge term on tiny models: the key statistics (C₀ against an independent reference,
cache keyed and reused, clear errors), the editor's in-memory and streamed paths agree, the term off is the
paper's eq 3 exactly, μ → −∞ recovers it, and the null space leaves C₀-dominant keys unchanged."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.core import preserved_stats as ps
from easyedit_agrade.core.weights import get_module
from easyedit_agrade.kernels import factorize

from agrade_helpers import LLAMA_PARAMS, records, tiny_editor, tiny_llama

MODULES = [p[: -len(".weight")] for p in LLAMA_PARAMS]


@pytest.fixture
def settings(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"Line {i}: the {w} stands by the river, north of the old market square."
                               for i, w in enumerate(["mill", "tower", "chapel", "bridge"] * 25)), encoding="utf-8")
    return dict(preserved_corpus=str(corpus), preserved_tokens=192, preserved_window=32,
                preserved_stats_dir=str(tmp_path / "stats"))


def _load(model, tok, settings, **kw):
    return ps.load_or_compute_second_moments(model, tok, MODULES, corpus=settings["preserved_corpus"],
                                             n_tokens=settings["preserved_tokens"],
                                             window=settings["preserved_window"],
                                             root=settings["preserved_stats_dir"], progress=False, **kw)


def test_second_moments_match_an_independent_reference(tok, settings):
    model = tiny_llama(len(tok))
    stats = _load(model, tok, settings)
    windows = ps.text_windows(tok, settings["preserved_corpus"], n_windows=6, window=32)
    rows = {n: [] for n in MODULES}
    hooks = [get_module(model, n).register_forward_hook(lambda m, i, o, n=n: rows[n].append(i[0].reshape(-1, i[0].shape[-1])))
             for n in MODULES]
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    for n in MODULES:
        K = torch.cat(rows[n]).double()
        assert K.shape[0] == 192
        torch.testing.assert_close(stats[n].double(), K.T @ K / K.shape[0], rtol=1e-5, atol=1e-7)


def test_statistics_cache_is_keyed_by_model_and_reused(tok, settings, monkeypatch):
    a, b = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    first = _load(a, tok, settings)
    path_a = ps.stats_file(a, ps.resolve_corpus(settings["preserved_corpus"]), 192, 32, settings["preserved_stats_dir"])
    assert path_a.is_file()
    calls = []
    real = ps.key_second_moments
    monkeypatch.setattr(ps, "key_second_moments", lambda *x, **k: calls.append(1) or real(*x, **k))
    again = _load(tiny_llama(len(tok), seed=0), tok, settings)  # equal weights, another object: the file is reused
    assert calls == [] and all(torch.equal(first[n], again[n]) for n in MODULES)
    other = _load(b, tok, settings)  # other weights: another file, computed
    assert calls == [1] and not torch.equal(first[MODULES[0]], other[MODULES[0]])
    assert ps.stats_file(b, ps.resolve_corpus(settings["preserved_corpus"]), 192, 32,
                         settings["preserved_stats_dir"]) != path_a


def test_missing_corpus_and_the_perplexity_text_are_refused(tok, settings, tmp_path):
    model = tiny_llama(len(tok))
    with pytest.raises(FileNotFoundError, match="preserved_corpus 'nowhere/none.txt' not found"):
        _load(model, tok, dict(settings, preserved_corpus="nowhere/none.txt"))
    test_text = tmp_path / "wiki.test.tokens"
    test_text.write_text("held-out text " * 100, encoding="utf-8")
    with pytest.raises(ValueError, match="held-out perplexity text"):
        _load(model, tok, dict(settings, preserved_corpus=str(test_text)))
    assert not (tmp_path / "stats").exists()  # nothing written on a refusal


def _deltas(ed, recs):
    return ed.compute(ed.cache(ed.encode([r.prompt for r in recs], [r.target_new for r in recs]))).deltas


@pytest.mark.parametrize("null_space", [False, True])
def test_streamed_spilled_equals_in_memory_with_the_term(tok, settings, tmp_path, null_space):
    recs = records(6)
    common = dict(settings, use_preserved_cov=True, log_mu_init=1.0, null_space=null_space, null_space_threshold=0.05)
    mem = tiny_editor(tok, solver="dual", **common)
    ref = _deltas(mem, recs)
    spill = tiny_editor(tok, cache_spill=True, cache_spill_dir=str(tmp_path), cache_batch_size=2, **common)
    cache = spill.cache(spill.encode([r.prompt for r in recs], [r.target_new for r in recs], micro_batch=2))
    assert spill.use_streamed(cache)
    out = spill.compute(cache)
    cache.close()
    for n, d in ref.items():
        torch.testing.assert_close(out.deltas[n], d, rtol=1e-8, atol=1e-10)


def test_term_off_is_the_papers_eq3_bit_for_bit(tok, settings):
    recs = records(6)
    ed = tiny_editor(tok, **settings)  # statistics settings present, both switches off
    assert ed.preserved is None and not (ps.Path(settings["preserved_stats_dir"])).exists()
    cache = ed.cache(ed.encode([r.prompt for r in recs], [r.target_new for r in recs]))
    out = ed.compute(cache)
    G_prev = None
    for n in ed.stack.module_names:  # eq 1, 2, 4 and the plain ridge of eq 3, by hand
        H, grad = cache.get(n)
        G = ed.module_G(n, H, grad, G_prev)
        expected = factorize(H, ed.nets.log_lambda(n).detach()).solve_delta(G)
        assert torch.equal(out.deltas[n], expected)
        G_prev = G


def test_mu_to_minus_infinity_recovers_eq3(tok, settings):
    recs = records(6)
    plain = _deltas(tiny_editor(tok), recs)
    limit = _deltas(tiny_editor(tok, use_preserved_cov=True, log_mu_init=-800.0, **settings), recs)
    strong_ed = tiny_editor(tok, use_preserved_cov=True, log_mu_init=15.0, **settings)  # tiny keys: C₀ ~ 1e-4
    strong = _deltas(strong_ed, recs)
    stats = _load(strong_ed.model, tok, settings)
    for n in plain:
        torch.testing.assert_close(limit[n], plain[n], rtol=1e-8, atol=1e-10)
        # a strong e^μ C₀ shrinks the change seen by ordinary-text keys, E‖kΔW‖² = tr(ΔWᵀ C₀ ΔW)
        C0 = stats[n].double()
        assert float(torch.trace(strong[n].T @ C0 @ strong[n])) < 0.1 * float(torch.trace(plain[n].T @ C0 @ plain[n]))


def test_null_space_edit_leaves_dominant_text_keys_unchanged(tok, settings):
    recs = records(6)
    ed = tiny_editor(tok, null_space=True, null_space_threshold=0.05, **settings)
    deltas = _deltas(ed, recs)
    stats = _load(ed.model, tok, settings)
    for n, d in deltas.items():
        s, U = torch.linalg.eigh(stats[n].double())
        dominant = U[:, s > 0.05 * s.max()]
        assert dominant.shape[1] > 0
        assert float((dominant.T @ d).norm()) < 1e-8 * float(d.norm())


def test_bad_switch_combinations_name_the_field(tok, settings):
    from easyedit_agrade.hparams import HyperParamsError

    with pytest.raises(HyperParamsError, match="use_regularization"):
        tiny_editor(tok, use_preserved_cov=True, use_regularization=False, **settings)
    with pytest.raises(HyperParamsError, match="null_space_threshold"):
        tiny_editor(tok, null_space=True, null_space_threshold=1.5, **settings)


def test_output_change_guard_refuses_before_touching_the_model(tok, settings):
    from easyedit_agrade.models.agrade.editor import PreservedChangeError

    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    ok = tiny_editor(tok, max_preserved_change=1e9, **settings)
    assert ok.preserved is None and ok.second_moments is not None  # the guard alone loads statistics, no term
    result = ok.edit_deltas(prompts, targets)
    stats = _load(ok.model, tok, settings)
    for n, d in result.deltas.items():  # tr(ΔWᵀC₀ΔW) / tr(WᵀC₀W), W in the editor layout (input @ W)
        W = get_module(ok.model, n).weight.detach().double().T
        C0 = stats[n].double()
        assert result.preserved_change[n] == pytest.approx(float(torch.trace(d.T @ C0 @ d) / torch.trace(W.T @ C0 @ W)),
                                                           rel=1e-6)
    strict = tiny_editor(tok, max_preserved_change=1e-3 * min(result.preserved_change.values()), **settings)
    before = {k: v.clone() for k, v in strict.model.state_dict().items()}
    with pytest.raises(PreservedChangeError, match="max_preserved_change"):
        strict.edit_deltas(prompts, targets)
    assert all(torch.equal(before[k], v) for k, v in strict.model.state_dict().items())


def test_init_from_an_archive_without_mu_then_train_mu(tok, settings, tmp_path):
    """``init_archive``: a network trained without the term continues with it — same weights, μ at log_mu_init,
    and a training step moves μ (its Adam group receives the analytic gradient)."""
    from easyedit_agrade.models.agrade import AGRADETrainer
    from easyedit_agrade.models.agrade.archive import save_archive

    from agrade_helpers import perturb, training_config

    recs = records(4)
    model = tiny_llama(len(tok))
    plain = AGRADETrainer(training_config(LLAMA_PARAMS), train_set=recs, val_set=recs, model=model, tok=tok,
                          progress=False, out_dir=str(tmp_path / "a"))
    perturb(plain.nets)
    save_archive(tmp_path / "plain.safetensors", plain.nets, model, plain.config)
    cfg = training_config(LLAMA_PARAMS, use_preserved_cov=True, log_mu_init=3.0, mu_lr=0.1,
                          init_archive=str(tmp_path / "plain.safetensors"), **settings)
    cont = AGRADETrainer(cfg, train_set=recs, val_set=recs, model=model, tok=tok, progress=False,
                         out_dir=str(tmp_path / "b"))
    for k, v in plain.nets.state_dict().items():
        torch.testing.assert_close(cont.nets.state_dict()[k], v.to(torch.float64))
    mu = cont.nets.log_mu_params
    assert mu is not None and all(float(p.detach().sub(3.0).abs().max()) == 0 for p in mu.values())
    assert [g["name"] for g in cont.opt.param_groups][-1] == "mu"
    cont.train_step(recs)
    assert all(float(p.detach().sub(3.0).abs().max()) > 0 for p in mu.values())


def test_preserved_change_budget_raises_mu_until_within_budget(tok, settings, tmp_path):
    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    common = dict(settings, use_preserved_cov=True, log_mu_init=2.0)
    free = tiny_editor(tok, **common).edit_deltas(prompts, targets)
    assert set(free.mu_shift.values()) == {0.0}
    budget = 0.01 * min(free.preserved_change.values())
    tight = tiny_editor(tok, preserved_change_budget=budget, **common).edit_deltas(prompts, targets)
    assert all(v > 0 for v in tight.mu_shift.values())
    assert all(c <= budget for c in tight.preserved_change.values())
    # each shift is the smallest whole step that meets the budget: one step less would not
    ed = tiny_editor(tok, **dict(common, log_mu_init=2.0 + min(tight.mu_shift.values()) - 1))
    assert any(c > budget for c in ed.edit_deltas(prompts, targets).preserved_change.values())
    # the streamed path takes the same steps
    spill = tiny_editor(tok, preserved_change_budget=budget, cache_spill=True, cache_spill_dir=str(tmp_path),
                        **common)
    streamed = spill.edit_deltas(prompts, targets)
    assert streamed.mu_shift == tight.mu_shift
    for n, d in tight.deltas.items():
        torch.testing.assert_close(streamed.deltas[n], d, rtol=1e-6, atol=1e-9)


def test_budget_bounds_the_sum_of_edit_rounds(tok, settings):
    """With ``edit_rounds`` the budget is on the batch's summed ΔW (relative to the weights before round 1), so
    three rounds change ordinary-text outputs no more than one round may."""
    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    common = dict(settings, use_preserved_cov=True, log_mu_init=2.0)
    budget = 0.5 * min(tiny_editor(tok, **common).edit_deltas(prompts, targets).preserved_change.values())
    one = tiny_editor(tok, preserved_change_budget=budget, **common).edit_deltas(prompts, targets)
    three = tiny_editor(tok, preserved_change_budget=budget, edit_rounds=3, rounds_stop_accuracy=None,
                        **common).edit_deltas(prompts, targets)
    assert [r["solved"] for r in three.rounds] == [True, True, True]
    assert all(c <= budget for c in three.preserved_change.values())
    assert any(not torch.equal(three.deltas[k], one.deltas[k]) for k in one.deltas)  # later rounds still move


def test_stats_verb_names_a_missing_corpus(capsys):
    from easyedit_agrade.cli import main
    from easyedit_agrade.paths import REPO_ROOT

    rc = main(["stats", str(REPO_ROOT / "hparams/AGRADE/smollm2-135m.yaml"), "--set", "preserved_corpus=nowhere/none.txt"])
    assert rc == 2 and "preserved_corpus 'nowhere/none.txt' not found" in capsys.readouterr().err


def test_archive_null_prefers_the_archive_trained_like_the_hparams(tok, settings, tmp_path):
    from easyedit_agrade.models.agrade.archive import build_networks, find_archive, has_preserved_term, save_archive

    from agrade_helpers import training_config

    model = tiny_llama(len(tok))
    plain_cfg = training_config(LLAMA_PARAMS)
    term_cfg = training_config(LLAMA_PARAMS, use_preserved_cov=True, **settings)
    folder = tmp_path / "archives"
    save_archive(folder / "a-with-term.safetensors", build_networks(model, term_cfg), model, term_cfg)
    save_archive(folder / "b-plain.safetensors", build_networks(model, plain_cfg), model, plain_cfg)
    assert has_preserved_term(folder / "a-with-term.safetensors") and not has_preserved_term(folder / "b-plain.safetensors")
    assert find_archive(model, term_cfg, folder).name == "a-with-term.safetensors"
    assert find_archive(model, plain_cfg, folder).name == "b-plain.safetensors"
