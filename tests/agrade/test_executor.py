"""apply_agrade_to_model: EasyEdit's contract, bit-exact restore, no drift, chunking, archive checks."""
from __future__ import annotations

import pytest
import torch

from agrade_helpers import LLAMA_PARAMS, perturb, records, tiny_agrade_archive, tiny_llama
from easyedit_agrade.models.agrade import AGRADEHyperParams, apply_agrade_to_model
from easyedit_agrade.models.agrade.agrade_main import clear_archive_cache
from easyedit_agrade.models.agrade.archive import (ArchiveMismatchError, ArchiveNotFoundError, build_networks,
                                                   find_archive, save_archive)


def _setup(tmp_path, tok, kind="llama", **over):
    return tiny_agrade_archive(tmp_path, tok, kind, **over)


def _weights(model, params):
    sd = dict(model.named_parameters())
    return {p: sd[p].detach().clone() for p in params}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_edit_restore_bit_exact_and_no_drift(tmp_path, tok, kind):
    model, hp = _setup(tmp_path, tok, kind)
    reqs = [r.to_request() for r in records(4)]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    m, copy = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)
    assert m is model and set(copy) == set(hp.inner_params)
    after1 = _weights(model, hp.inner_params)
    assert any(not torch.equal(after1[p], before[p]) for p in hp.inner_params)
    with torch.no_grad():
        for k, v in copy.items():
            dict(model.named_parameters())[k][...] = v  # EasyEdit's own restore
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # a second call on the restored model gives the very same edit (frozen normaliser, eval-mode network)
    _, copy2 = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)
    after2 = _weights(model, hp.inner_params)
    assert all(torch.equal(after1[p], after2[p]) for p in hp.inner_params)
    # sequential editing of the already-edited model is allowed (the archive was checked for this model object)
    apply_agrade_to_model(model, tok, reqs[:1], hp)
    with torch.no_grad():
        for k, v in copy.items():
            dict(model.named_parameters())[k][...] = v
    _, empty = apply_agrade_to_model(model, tok, reqs, hp, copy=True, return_orig_weights=False)
    assert empty == {}


def test_chunking_any_number_of_requests(tmp_path, tok):
    model, hp = _setup(tmp_path, tok, batch_size=3)
    reqs = [r.to_request() for r in records(7)]
    before = _weights(model, hp.inner_params)
    _, copy = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)
    assert all(torch.equal(copy[p], before[p]) for p in hp.inner_params)  # originals, not an intermediate


def test_archive_fingerprint_mismatch_says_how_to_retrain(tmp_path, tok):
    model, hp = _setup(tmp_path, tok)
    with torch.no_grad():
        dict(model.named_parameters())[hp.inner_params[0]].add_(1e-3)
    with pytest.raises(ArchiveMismatchError, match="easyedit-agrade train"):
        apply_agrade_to_model(model, tok, [records(1)[0].to_request()], hp)
    hp2 = AGRADEHyperParams.from_dict(dict(hp.to_dict(), rank=8))
    with torch.no_grad():
        dict(model.named_parameters())[hp.inner_params[0]].sub_(1e-3)
    with pytest.raises(ArchiveMismatchError, match="rank"):
        find_archive(model, hp2)


def test_missing_archive(tmp_path, tok):
    model, hp = _setup(tmp_path, tok)
    hp_none = AGRADEHyperParams.from_dict(dict(hp.to_dict(), archive=None))
    with pytest.raises(ArchiveNotFoundError, match="easyedit-agrade train"):
        find_archive(model, hp_none, folder=tmp_path / "empty")
    hp_bad = AGRADEHyperParams.from_dict(dict(hp.to_dict(), archive=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ArchiveNotFoundError):
        apply_agrade_to_model(model, tok, [records(1)[0].to_request()], hp_bad)


def test_bf16_model_auto_rounds_once_hook_on_request(tmp_path, tok):
    """bf16 LM. ``apply_mode: auto`` (the executor's default): weights = round(w32 + ΔW), cast once, no hook —
    so EasyEdit's ``param[...] = v`` restore is exact and leaves nothing behind. ``apply_mode: hook``: weights
    untouched, the fp32 ΔW acts through a hook that ``restore_weights`` removes (EasyEdit's restore would not)."""
    from easyedit_agrade.core.weights import get_module, has_delta_hooks, restore_weights

    model = tiny_llama(len(tok), dtype=torch.bfloat16)
    hp = AGRADEHyperParams.from_dict(dict(alg_name="AGRADE", model_name="tiny", inner_params=LLAMA_PARAMS, rank=4,
                                          n_blocks=2, eta_init=0.5, editor_dtype="float32", cache_batch_size=2,
                                          archive=str(tmp_path / "b.safetensors")))
    nets = build_networks(model, hp)
    perturb(nets, scale=0.1)
    nets.train()
    for s in nets.slots:
        nets.observe(s.name, torch.randn(20, s.key_size), torch.randn(20, s.value_size))
    save_archive(tmp_path / "b.safetensors", nets, model, hp)
    clear_archive_cache()
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    before = _weights(model, hp.inner_params)
    reqs = [r.to_request() for r in records(3)]

    hook_hp = AGRADEHyperParams.from_dict({**hp.to_dict(), "apply_mode": "hook"})
    with pytest.warns(UserWarning, match="restore_weights"):
        _, copy = apply_agrade_to_model(model, tok, reqs, hook_hp, return_orig_weights=True)
    assert all(torch.equal(before[p], dict(model.named_parameters())[p]) for p in hp.inner_params)  # bf16 untouched
    deltas = {}
    for p in hp.inner_params:  # the fp32 ΔW acts through a forward hook on each edited module
        hook = getattr(get_module(model, p[: -len(".weight")]), "_easyedit_agrade_delta_hook", None)
        assert hook is not None and hook[1].dtype == torch.float32 and float(hook[1].abs().sum()) > 0
        deltas[p] = hook[1].clone()
    restore_weights(model, copy)
    assert not has_delta_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, y0)

    _, copy = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)  # auto
    assert not has_delta_hooks(model)
    for p in hp.inner_params:  # nn.Linear stores ΔWᵀ; one round-to-nearest of the fp32 sum
        want = (before[p].float() + deltas[p].T).to(torch.bfloat16)
        assert torch.equal(dict(model.named_parameters())[p], want)
    with torch.no_grad():
        for k, v in copy.items():
            dict(model.named_parameters())[k][...] = v  # EasyEdit's own restore
    assert not has_delta_hooks(model)
    assert all(torch.equal(before[p], dict(model.named_parameters())[p]) for p in hp.inner_params)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, y0)
