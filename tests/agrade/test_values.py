"""``value_source: optimized`` (models/agrade/values.py): MEMIT's values searched for a whole batch at once and
spread over the edited modules with the preserved-knowledge solve — on a tiny float64 LLaMA."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.hparams import HyperParamsError
from easyedit_agrade.models.agrade import values

from agrade_helpers import tiny_llama

PARAMS = [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]  # L = 1; layer 2 lies above it
MODULES = [p[: -len(".weight")] for p in PARAMS]
# the subject ends each prompt, so its δ reaches the target's prediction through the residual stream (a 3-layer
# model with random attention carries almost nothing from earlier positions)
FACTS = [("The capital city of France", "Rome", "France"),
         ("The mother tongue of Danielle Darrieux", "English", "Danielle Darrieux"),
         ("The home town of The Beatles", "Berlin", "The Beatles"),
         ("The company founded by Apple", "Paris", "Apple")]


def _model(tok):
    """A tiny LLaMA whose (tied) embeddings are large enough for its logits to express a confident prediction
    (at the default init they span ±0.3 over 49k tokens, so no δ can lower a target's NLL much)."""
    model = tiny_llama(len(tok))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50.0)
    return model


def _batches(tok, model, prefixes=()):
    return values.encode_value_batches(tok, [p for p, _, _ in FACTS], [t for _, t, _ in FACTS],
                                       [s for _, _, s in FACTS], list(prefixes), micro_batch=3, device="cpu")


def _search(model, batches, **kw):
    args = dict(steps=40, lr=0.5, weight_decay=1e-3, clamp=4.0, stop_nll=1e-3)
    args.update(kw)
    return values.optimise_values(model, batches, len(FACTS), 1, **args)


def test_memit_layer_update_is_memits_formula_in_the_editor_layout():
    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(5, 24, generator=g, dtype=torch.float64), torch.randn(5, 16, generator=g, dtype=torch.float64)
    A = torch.randn(24, 24, generator=g, dtype=torch.float64)
    C0 = A @ A.T / 24 + 0.1 * torch.eye(24, dtype=torch.float64)
    lam = 3.5
    dW = values.memit_layer_update(K, R, C0, lam)
    # MEMIT: W (out x in), keys as columns: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹
    Kc, Rc = K.T, R.T
    memit = Rc @ Kc.T @ torch.linalg.inv(lam * C0 + Kc @ Kc.T)
    torch.testing.assert_close(dW, memit.T, rtol=1e-9, atol=1e-10)
    # the regulariser's two ends: exact interpolation of the residuals (n < Dh), and no change at all
    torch.testing.assert_close(K @ values.memit_layer_update(K, R, C0, 1e-12), R, rtol=1e-6, atol=1e-6)
    assert values.memit_layer_update(K, R, C0, 1e12).abs().max() < 1e-9


def test_value_search_fits_the_targets_and_finds_the_unedited_hidden_state(tok):
    model = _model(tok)
    batches = _batches(tok, model)
    delta, h, info = _search(model, batches)
    assert info["nll_end"] < 0.2 * info["nll_start"] and info["steps"] <= 40
    # h is layer 1's output at each prompt's subject's last token in an ordinary forward pass
    for vb in batches:
        hs = model(input_ids=vb.mb.input_ids, attention_mask=vb.mb.attention_mask,
                   output_hidden_states=True).hidden_states[2]
        b, pos = vb.subject.nonzero(as_tuple=True)
        torch.testing.assert_close(h[vb.request[b]], hs[b, pos].float(), rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # restored after the search


def test_value_search_clamps_delta_and_stops_converged_requests(tok):
    model = _model(tok)
    batches = _batches(tok, model, prefixes=["It was a cold day. "])
    delta, h, info = _search(model, batches, clamp=0.05, steps=5, stop_nll=1e-6)
    ratio = delta.norm(dim=-1) / h.norm(dim=-1)
    assert bool((ratio <= 0.05 + 1e-6).all()) and bool((ratio > 0.049).all())  # the clamp binds here
    # the report's ‖δ‖/‖h‖ is this ratio's median and 90th percentile
    assert abs(info["delta_ratio_median"] - float(ratio.median())) < 1e-6
    assert abs(info["delta_ratio_q90"] - float(torch.quantile(ratio, 0.9))) < 1e-6
    # every request already below the stopping NLL: no step is taken, δ stays 0
    delta0, _, info0 = _search(model, batches, stop_nll=1e9)
    assert info0["steps"] == 1 and info0["converged"] == len(FACTS) and delta0.abs().max() == 0


def test_spread_values_reaches_z_and_leaves_the_model_unchanged(tok):
    from easyedit_agrade.core.weights import apply_deltas, restore_weights

    model = _model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = _batches(tok, model)
    delta, h, _ = _search(model, batches, steps=10)
    C0 = {n: torch.eye(24, dtype=torch.float64) for n in MODULES}
    deltas = values.spread_values(model, batches, len(FACTS), MODULES, model.model.layers[1], h + delta, C0, 1e-12 * len(FACTS))
    assert set(deltas) == set(MODULES) and all(d.shape == (24, 16) for d in deltas.values())
    met = values.met_share(model, batches, len(FACTS), MODULES, model.model.layers[1], h + delta, h, deltas)
    torch.testing.assert_close(met, torch.ones_like(met), rtol=0, atol=1e-4)  # every value placed ...
    none = values.met_share(model, batches, len(FACTS), MODULES, model.model.layers[1], h + delta, h, {})
    torch.testing.assert_close(none, torch.zeros_like(none), rtol=0, atol=1e-5)  # ... and none without ΔW
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    saved = apply_deltas(model, {n: d for n, d in deltas.items()})
    try:
        for vb in batches:  # with a vanishing C0 weight the last module fits the rest exactly: layer 1 emits z
            hs = model(input_ids=vb.mb.input_ids, attention_mask=vb.mb.attention_mask,
                       output_hidden_states=True).hidden_states[2]
            b, pos = vb.subject.nonzero(as_tuple=True)
            torch.testing.assert_close(hs[b, pos].float(), (h + delta)[vb.request[b]], rtol=1e-4, atol=1e-4)
    finally:
        restore_weights(model, saved)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _remaining(model, batches, deltas, z, h):
    """‖z − h′‖ / ‖z − h‖ per request: the share of each value the ΔW leave unmet at layer 1's output."""
    return 1 - values.met_share(model, batches, len(FACTS), MODULES, model.model.layers[1], z, h, deltas)


def test_spread_sweeps_move_the_unmet_residual_into_the_modules(tok):
    model = _model(tok)
    batches = _batches(tok, model)
    delta, h, _ = _search(model, batches, steps=10)
    g = torch.Generator().manual_seed(1)
    C0 = {}
    for n in MODULES:
        A = torch.randn(24, 24, generator=g, dtype=torch.float64)
        C0[n] = A @ A.T / 24
    one = values.spread_values(model, batches, len(FACTS), MODULES, model.model.layers[1], h + delta, C0, 5e-4 * len(FACTS))
    six = values.spread_values(model, batches, len(FACTS), MODULES, model.model.layers[1], h + delta, C0, 5e-4 * len(FACTS),
                               sweeps=6)
    left_one, left_six = _remaining(model, batches, one, h + delta, h), _remaining(model, batches, six, h + delta, h)
    assert float(left_one.mean()) > 0.3  # the weight leaves a good part of every value unmet after one pass ...
    assert float(left_six.mean()) < 0.75 * float(left_one.mean())  # ... and the sweeps place more of it (0.45 → 0.30)
    # one module alone is solved exactly by its first pass (its output change enters layer 1's output linearly):
    # a re-solve with its own change added back to the target is a fixed point, not a second, stacked update
    last = MODULES[-1:]
    a = values.spread_values(model, batches, len(FACTS), last, model.model.layers[1], h + delta, C0, 0.05 * len(FACTS))
    b = values.spread_values(model, batches, len(FACTS), last, model.model.layers[1], h + delta, C0, 0.05 * len(FACTS), sweeps=4)
    torch.testing.assert_close(b[last[0]], a[last[0]], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="sweeps"):
        values.spread_values(model, batches, len(FACTS), last, model.model.layers[1], h + delta, C0, 0.05 * len(FACTS), sweeps=0)


def test_a_subject_missing_from_its_prompt_is_named(tok):
    model = _model(tok)
    with pytest.raises(ValueError, match=r"request 2: .*subject 'Paris'"):
        values.encode_value_batches(tok, [p for p, _, _ in FACTS], [t for _, t, _ in FACTS],
                                    ["France", "Danielle Darrieux", "Paris", "Apple"], [], micro_batch=2,
                                    device="cpu")


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f" The {w} stands by the river north of the market . It was built in {1800 + i} "
                                f"by the town council . " for i, w in enumerate(["mill", "tower", "chapel"] * 20)),
                      encoding="utf-8")
    return corpus


def _hparams(tmp_path, **over):
    from easyedit_agrade.models.agrade import AGRADEHyperParams

    cfg = dict(alg_name="AGRADE", model_name="tiny", inner_params=PARAMS, rank=4, n_blocks=2, editor_dtype="float64",
               batch_size=8, cache_batch_size=2, archive=None, value_source="optimized", value_steps=30,
               value_prefixes=1, value_preserved_weight=0.5, preserved_corpus=str(_corpus(tmp_path)),
               preserved_tokens=192, preserved_window=32, preserved_stats_dir=str(tmp_path / "stats"), max_length=32)
    cfg.update(over)
    return AGRADEHyperParams.from_dict(cfg)


def _nll(model, tok, prompt, target):
    ids = tok(prompt + " " + target, return_tensors="pt").input_ids
    n = len(tok(prompt).input_ids)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, n - 1:-1].log_softmax(-1)
    return float(-logp.gather(1, ids[0, n:, None]).mean())


def test_executor_edits_with_optimized_values_without_an_archive_and_restores_exactly(tok, tmp_path):
    from easyedit_agrade.core.weights import restore_weights
    from easyedit_agrade.models.agrade.agrade_main import apply_agrade_to_model

    model = _model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    requests = [{"prompt": p, "target_new": t, "subject": s} for p, t, s in FACTS]
    nll0 = [_nll(model, tok, p, t) for p, t, _ in FACTS]
    # the tiny model's weights are ~0.02, so any real edit is many times ‖W‖: the size guard is off here
    hp = _hparams(tmp_path, max_delta_ratio=None)
    model, weights_copy = apply_agrade_to_model(model, tok, requests, hp, return_orig_weights=True)
    assert sorted(weights_copy) == sorted(PARAMS)
    (search,) = weights_copy.report.to_dict()["value_search"]  # what the value search did, in the call's report
    assert search["n_requests"] == len(FACTS) and 1 <= search["steps"] <= 30
    assert search["nll_end"] < search["nll_start"] and 0 <= search["converged"] <= len(FACTS)
    assert 0.2 < search["met_q10"] <= search["met_median"] <= 1.0 + 1e-6  # the share of the values the ΔW place
    nll1 = [_nll(model, tok, p, t) for p, t, _ in FACTS]
    assert sum(nll1) < 0.5 * sum(nll0), (nll0, nll1)
    restore_weights(model, weights_copy)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_solve_that_places_little_of_the_values_warns(tok, tmp_path):
    from easyedit_agrade.core.weights import restore_weights
    from easyedit_agrade.models.agrade.agrade_main import apply_agrade_to_model

    model = _model(tok)
    requests = [{"prompt": p, "target_new": t, "subject": s} for p, t, s in FACTS]
    hp = _hparams(tmp_path, max_delta_ratio=None, value_preserved_weight=1e4)  # C₀ outweighs the edits
    with pytest.warns(RuntimeWarning, match=r"placed a median 0\.\d\d of the 4 values at layer 1's output"):
        model, weights_copy = apply_agrade_to_model(model, tok, requests, hp, return_orig_weights=True)
    (search,) = weights_copy.report.to_dict()["value_search"]
    assert search["met_median"] < 0.5
    restore_weights(model, weights_copy)


def test_preserved_keys_is_a_constant_weight_and_matches_the_per_edit_weight_at_equal_lambda(tok, tmp_path):
    """value_preserved_keys = λ and value_preserved_weight = λ/n solve the same system for n edits: identical
    weights after the edit. The weight per edit grows with n, the count of keys does not; both set: the smaller."""
    from easyedit_agrade.core.weights import restore_weights
    from easyedit_agrade.models.agrade.agrade_main import apply_agrade_to_model

    per_edit = _hparams(tmp_path, max_delta_ratio=None, value_preserved_weight=0.5)
    constant = _hparams(tmp_path, max_delta_ratio=None, value_preserved_weight=None,
                        value_preserved_keys=0.5 * len(FACTS))
    assert per_edit.value_c0_weight(len(FACTS)) == constant.value_c0_weight(len(FACTS)) == 2.0
    assert per_edit.value_c0_weight(400) == 200.0 and constant.value_c0_weight(400) == 2.0
    capped = _hparams(tmp_path, value_preserved_weight=0.5, value_preserved_keys=8.0)
    assert capped.value_c0_weight(4) == 2.0 and capped.value_c0_weight(400) == 8.0
    requests = [{"prompt": p, "target_new": t, "subject": s} for p, t, s in FACTS]
    edited = []
    for hp in (per_edit, constant, _hparams(tmp_path, max_delta_ratio=None, value_preserved_weight=None,
                                            value_preserved_keys=8.0)):
        model = _model(tok)
        model, weights_copy = apply_agrade_to_model(model, tok, requests, hp, return_orig_weights=True)
        edited.append({n: model.get_parameter(n).detach().clone() for n in PARAMS})
        restore_weights(model, weights_copy)
    assert all(torch.equal(edited[0][n], edited[1][n]) for n in PARAMS)
    assert not any(torch.allclose(edited[0][n], edited[2][n]) for n in PARAMS)  # a larger λ: a different edit


def test_executor_refuses_requests_without_subjects_and_leaves_the_model_untouched(tok, tmp_path):
    from easyedit_agrade.models.agrade.agrade_main import apply_agrade_to_model

    model = _model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    requests = [{"prompt": p, "target_new": t, "subject": s} for p, t, s in FACTS]
    requests[1] = {"prompt": FACTS[1][0], "target_new": FACTS[1][1]}
    with pytest.raises(ValueError, match="request 1: value_source: optimized needs every request's subject"):
        apply_agrade_to_model(model, tok, requests, _hparams(tmp_path))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("over, field", [
    (dict(value_source="gradient"), "value_source"),
    (dict(value_steps=0), "value_steps"),
    (dict(value_prefixes=-1), "value_prefixes"),
    (dict(value_lr=0.0), "value_lr"),
    (dict(value_clamp=float("inf")), "value_clamp"),
    (dict(value_preserved_weight=-1.0), "value_preserved_weight"),
    (dict(value_preserved_weight=None, value_preserved_keys=0.0), "value_preserved_keys"),
    (dict(value_preserved_weight=None, value_preserved_keys="many"), "value_preserved_keys"),
    (dict(value_preserved_weight=None), "set value_preserved_weight .* value_preserved_keys .* both are null"),
    (dict(value_weight_decay=-1e-3), "value_weight_decay"),
    (dict(value_sweeps=0), "value_sweeps"),
    (dict(value_sweeps=True), "value_sweeps"),
    (dict(edit_rounds=2), "edit_rounds"),
])
def test_bad_value_settings_name_the_field(tmp_path, over, field):
    with pytest.raises(HyperParamsError, match=field):
        _hparams(tmp_path, **over)


def test_value_layer_must_lie_below_the_last_decoder_layer(tok):
    model = _model(tok)
    batches = _batches(tok, model)
    with pytest.raises(ValueError, match="below the model's last decoder layer"):
        values.optimise_values(model, batches, len(FACTS), 2, steps=1, lr=0.5, weight_decay=0.0, clamp=4.0,
                               stop_nll=0.05)


def test_context_prefixes_are_sentences_of_the_corpus(tmp_path):
    got = values.context_prefixes(_corpus(tmp_path), 3, seed=0)
    assert len(got) == 3 and all(p.endswith(". ") and len(p.split()) >= 5 for p in got)
    assert got == values.context_prefixes(_corpus(tmp_path), 3, seed=0)
    with pytest.raises(ValueError, match="usable sentences"):
        values.context_prefixes(_corpus(tmp_path), 10_000)


# --- network_stage: the value edit, then a trained network's edit on the value-edited model -----------------------

def _stage_yamls(tmp_path, tok, **outer):
    """(model, outer hparams loaded from ``values/v.yaml``, stage hparams as saved in ``nets/stage.yaml``): a tiny
    AGRADE archive on the LLaMA's layers 1–2 (layer 1 is also a value module) and a value YAML naming it by a path
    relative to its own folder."""
    from easyedit_agrade.models.agrade import AGRADEHyperParams

    from agrade_helpers import tiny_agrade_archive

    model, stage = tiny_agrade_archive(tmp_path, tok, max_row_zscore=None, max_key_norm_ratio=None,
                                       max_delta_ratio=None)
    with torch.no_grad():  # _model's confident logits; the archive's fingerprint covers the edited modules only
        model.model.embed_tokens.weight.mul_(50.0)
    (tmp_path / "nets").mkdir()
    stage.to_yaml(tmp_path / "nets" / "stage.yaml")
    (tmp_path / "values").mkdir()
    cfg = dict(_hparams(tmp_path, max_delta_ratio=None).to_dict(), network_stage="../nets/stage", **outer)
    AGRADEHyperParams.from_dict(cfg).to_yaml(tmp_path / "values" / "v.yaml")
    return model, AGRADEHyperParams.from_hparams(tmp_path / "values" / "v"), stage


def test_network_stage_is_the_networks_edit_of_the_value_edited_model_added_to_the_value_edit(tok, tmp_path):
    from easyedit_agrade.core.weights import apply_deltas, restore_weights
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_main import apply_agrade_to_model
    from easyedit_agrade.models.agrade.archive import build_networks, load_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor

    model, hp, stage = _stage_yamls(tmp_path, tok, network_stage_eta_factor=0.5)
    assert hp.network_stage == str(tmp_path / "values" / ".." / "nets" / "stage")
    stage_hp = hp.network_stage_hparams()
    assert stage_hp.eta_factor == 0.5 and stage_hp.inner_params == stage.inner_params
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts, targets, subjects = ([f[i] for f in FACTS] for i in range(3))
    # reference: the value edit alone, written into the weights; then the network's edit of that model
    nets = load_networks(stage.archive, model, stage_hp, dtype=torch.float64)  # fingerprint of the unedited model
    alone = AGRADEHyperParams.from_dict(dict(hp.to_dict(), network_stage=None))
    first = AGRADEEditor(model, tok, alone, build_networks(model, alone)).edit_deltas(prompts, targets,
                                                                                       subjects=subjects)
    saved = apply_deltas(model, first.deltas)
    with torch.enable_grad():
        second = AGRADEEditor(model, tok, stage_hp, nets).edit_deltas(prompts, targets, subjects=subjects)
    restore_weights(model, saved)
    with torch.enable_grad():
        on_unedited = AGRADEEditor(model, tok, stage_hp, nets).edit_deltas(prompts, targets, subjects=subjects)
    shared = "model.layers.1.mlp.down_proj"
    assert set(first.deltas) == {"model.layers.0.mlp.down_proj", shared}
    assert set(second.deltas) == {shared, "model.layers.2.mlp.down_proj"}
    assert not torch.allclose(second.deltas[shared], on_unedited.deltas[shared], rtol=1e-3)  # it sees the edit

    model, weights_copy = apply_agrade_to_model(model, tok, [dict(prompt=p, target_new=t, subject=s)
                                                             for p, t, s in FACTS], hp, return_orig_weights=True)
    assert sorted(weights_copy) == sorted({*PARAMS, *stage.inner_params})
    for module in {*first.deltas, *second.deltas}:
        want = first.deltas.get(module, 0) + second.deltas.get(module, 0)
        got = model.get_parameter(module + ".weight").detach() - before[module + ".weight"]
        torch.testing.assert_close(got, want.T, rtol=1e-6, atol=1e-9)  # editor layout (in, out) → weight (out, in)
    (search,) = weights_copy.report.to_dict()["value_search"]
    assert search["network_stage"]["modules"] == 2 and search["network_stage"]["eta_factor"] == 0.5
    restore_weights(model, weights_copy)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_eta_factor_scales_the_network_edit_and_one_is_bit_identical(tok):
    from agrade_helpers import records, tiny_editor

    recs = records(4)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    base = tiny_editor(tok)
    with torch.enable_grad():
        d1 = base.edit_deltas(prompts, targets).deltas
        same = tiny_editor(tok, eta_factor=1.0).edit_deltas(prompts, targets).deltas
        half = tiny_editor(tok, eta_factor=0.5).edit_deltas(prompts, targets).deltas
    assert all(torch.equal(d1[k], same[k]) for k in d1)
    for k in d1:  # eqs 1–2, 4 and 5 are linear in η: half the step, half the ΔW
        torch.testing.assert_close(half[k], 0.5 * d1[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("over, match", [
    (dict(value_source="hypernet", network_stage="x"), "network_stage .* needs value_source: optimized"),
    (dict(network_stage_eta_factor=0.0), "network_stage_eta_factor"),
    (dict(eta_factor=float("nan")), "eta_factor"),
    (dict(eta_factor=True), "eta_factor"),
])
def test_bad_network_stage_settings_name_the_field(tmp_path, over, match):
    with pytest.raises(HyperParamsError, match=match):
        _hparams(tmp_path, **over)


def test_a_missing_or_value_network_stage_is_an_error_naming_the_field(tmp_path):
    missing = _hparams(tmp_path, network_stage=str(tmp_path / "nowhere"))
    with pytest.raises(HyperParamsError, match=r"network_stage: .*nowhere\.yaml does not exist"):
        missing.network_stage_hparams()
    _hparams(tmp_path).to_yaml(tmp_path / "values.yaml")  # a value edit cannot be the stage
    with pytest.raises(HyperParamsError, match="must be a trained network's edit"):
        _hparams(tmp_path, network_stage=str(tmp_path / "values")).network_stage_hparams()
