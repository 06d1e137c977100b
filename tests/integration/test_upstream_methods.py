"""The EasyEdit methods only an upstream checkout has (AlphaEdit, UltraEdit, EMMET, PMET, EAMET; issue 13 item 3).

With the PyPI wheel (``make test``): the shipped YAMLs name modules the embedded model has, and loading them is a
clear "not in this EasyEdit generation" error. Against an upstream checkout (``make test-upstream``): EasyEdit's own
classes accept the YAMLs, and two edits of AlphaEdit and of UltraEdit through upstream ``BaseEditor.batch_edit``
change the weights they name, make the edited facts more likely, and are restored bit-exactly.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from easyedit_agrade.integration import upstream_methods as U
from easyedit_agrade.paths import REPO_ROOT

HPARAMS = REPO_ROOT / "hparams"

FACTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English",
     "ground_truth": "French"},
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris"},
]


def _config(method: U.UpstreamMethod) -> dict:
    path = HPARAMS / method.hparams_file()
    assert path.is_file(), f"missing {path}"
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def generation(easyeditor_module):
    from easyedit_agrade.integration.easyedit import easyedit_generation

    return easyedit_generation()


@pytest.mark.parametrize("name", sorted(U.UPSTREAM_METHODS))
def test_yaml_parses_and_names_modules_of_the_embedded_model(name, embedded_model):
    method = U.UPSTREAM_METHODS[name]
    config = _config(method)
    assert config["alg_name"] == method.alg_name and config["model_name"] == "smollm2-135m-instruct"
    params = dict(embedded_model[0].named_parameters())
    names = U.edited_parameters(method, SimpleNamespace(**config))
    assert names and all(n in params for n in names), [n for n in names if n not in params]
    if method.statistics:  # tied embeddings: EasyEdit's lm_head is the input embedding
        assert config["lm_head_module"] == "model.embed_tokens" and config["v_loss_layer"] == 29


def test_ultraedit_batch_is_all_requests_in_divisor_chunks():
    hp = SimpleNamespace(batch_size=100, batch_size_once=10)
    assert U.ultraedit_batch(hp, 16) == (16, 8) and (hp.batch_size, hp.batch_size_once) == (16, 8)
    assert U.ultraedit_batch(SimpleNamespace(batch_size=1, batch_size_once=10), 7) == (7, 7)
    assert U.ultraedit_batch(SimpleNamespace(batch_size=1, batch_size_once=10), 1024) == (1024, 8)


def test_model_name_gets_the_architecture_and_keeps_the_model(embedded_model):
    from easyedit_agrade.integration.preloaded import PreloadedModel

    model, tok = embedded_model
    name = U.architecture_name(PreloadedModel("smollm2-135m-instruct", model, tok), model)
    assert isinstance(name, PreloadedModel) and "llama" in name.lower() and "smollm2-135m-instruct" in name
    got_model, got_tok = name
    assert got_model is model and got_tok is tok


def test_pypi_wheel_reports_the_methods_as_not_in_this_generation(generation):
    if generation == "upstream":
        pytest.skip("an upstream checkout has these methods")
    from easyedit_agrade.hparams import HyperParamsError
    from easyedit_agrade.integration.baselines import load_easyedit_hparams

    assert U.available_upstream_methods() == {}
    for method in U.UPSTREAM_METHODS.values():
        why = U.unavailable_reason(method)
        assert "not in this EasyEdit generation" in why and method.class_name in why
        with pytest.raises(U.NotInThisGeneration, match="not in this EasyEdit generation") as err:
            load_easyedit_hparams(HPARAMS / method.hparams_file())
        assert isinstance(err.value, HyperParamsError) and method.hparams_file() in str(err.value)


@pytest.fixture(scope="module")
def upstream(generation):
    if generation != "upstream":
        pytest.skip("needs an EasyEdit source checkout (make test-upstream EASYEDIT_SRC=...)")
    return generation


def test_upstream_classes_accept_the_yamls(upstream):
    from easyedit_agrade.integration.baselines import load_easyedit_hparams

    assert set(U.available_upstream_methods()) == set(U.UPSTREAM_METHODS)
    for method in U.UPSTREAM_METHODS.values():
        hp = load_easyedit_hparams(HPARAMS / method.hparams_file())
        assert type(hp).__name__ == method.class_name and hp.alg_name == method.alg_name


def _target_logprob(model, tok, facts) -> torch.Tensor:
    from easyedit_agrade.evaluate.scoring import score_pairs

    with torch.no_grad():
        scores = score_pairs(model, tok, [f["prompt"] for f in facts], [f["target_new"] for f in facts])
    return torch.tensor([s.logprob for s in scores])


def _fingerprint(model) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AlphaEdit", "UltraEdit"])
def test_two_edits_change_the_weights_and_are_restored(name, upstream, embedded_model, shared_data, tmp_path):
    from easyedit_agrade.integration.baselines import load_easyedit_hparams

    model, tok = embedded_model
    method = U.UPSTREAM_METHODS[name]
    hparams = load_easyedit_hparams(HPARAMS / method.hparams_file(), model=model, tok=tok)
    if name == "AlphaEdit":  # fewer optimisation steps and a small statistics sample keep the test short
        hparams.v_num_grad_steps = 10
    before_lp = _target_logprob(model, tok, FACTS)
    before = _fingerprint(model)
    edit = U.batch_edit_upstream(method, hparams, model, tok, FACTS, stats_dir=tmp_path / "stats", n_tokens=2048,
                                 preserved_root=tmp_path / "c0")
    assert edit.model is model
    params = dict(model.named_parameters())
    changed = [k for k, v in edit.originals.items() if not torch.equal(v, params[k])]
    assert changed, f"{name} changed none of {sorted(edit.originals)}"
    assert edit.edit_seconds > 0 and len(edit.easyedit_metrics) == len(FACTS)
    after_lp = _target_logprob(model, tok, FACTS)
    assert (after_lp > before_lp).all(), (before_lp, after_lp)
    edit.restore()
    assert torch.equal(_fingerprint(model), before)
    assert all(torch.equal(v, params[k]) for k, v in edit.originals.items())
    if name == "AlphaEdit":
        assert str(tmp_path / "stats") in edit.hparams.P_loc and any("null-space dims" in n for n in edit.notes)
