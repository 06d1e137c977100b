"""Archives that could lie (issue 16 §3): the per-model cache keys on every network-changing hparam and on the
file's identity; archives carry a digest of their tensors (verified), non-finite tensors are refused, every error
names the file; a bf16 copy of the archive's model is reported as "dtype differs". AGRADE and InstructEdit."""
from __future__ import annotations

import json

import pytest
import torch

from agrade_helpers import LLAMA_PARAMS, perturb, records, tiny_llama
from easyedit_agrade.core.checkpoint import DIGEST_KEY, CorruptFileError, file_digest, tensor_digest


def _agrade(tmp_path, tok, name="a.safetensors", seed=1, **over):
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_main import _networks_for, clear_archive_cache
    from easyedit_agrade.models.agrade.archive import build_networks, find_archive, load_networks, save_archive

    model = tiny_llama(len(tok))
    cfg = dict(alg_name="AGRADE", model_name="tiny", inner_params=LLAMA_PARAMS, rank=4, n_blocks=2,
               editor_dtype="float64", batch_size=8, cache_batch_size=2, archive=str(tmp_path / name))
    cfg.update(over)
    hp = AGRADEHyperParams.from_dict(cfg)
    nets = build_networks(model, hp).double()
    perturb(nets, seed=seed, scale=0.1)
    save_archive(tmp_path / name, nets, model, hp)
    clear_archive_cache()
    return dict(model=model, hp=hp, nets=nets, networks_for=_networks_for, find=find_archive, load=load_networks,
                save=save_archive, cls=AGRADEHyperParams)


def _instructedit(tmp_path, tok, name="i.safetensors", seed=1, **over):
    from easyedit_agrade.models.instructedit import InstructEditHyperParams
    from easyedit_agrade.models.instructedit.archive import find_archive, load_networks, save_archive
    from easyedit_agrade.models.instructedit.editor import build_networks
    from easyedit_agrade.models.instructedit.instructedit_main import clear_archive_cache, networks_for

    model = tiny_llama(len(tok))
    cfg = dict(alg_name="InstructEdit", model_name="tiny", inner_params=LLAMA_PARAMS, rank=4, n_blocks=2,
               editor_dtype="float64", use_instruction=False, archive=str(tmp_path / name))
    cfg.update(over)
    hp = InstructEditHyperParams.from_dict(cfg)
    nets = build_networks(model, hp).double()
    perturb(nets, seed=seed, scale=0.1)
    save_archive(tmp_path / name, nets, model, hp)
    clear_archive_cache()
    return dict(model=model, hp=hp, nets=nets, networks_for=networks_for, find=find_archive, load=load_networks,
                save=save_archive, cls=InstructEditHyperParams)


KINDS = {"AGRADE": _agrade, "InstructEdit": _instructedit}


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.mark.parametrize("kind", KINDS)
def test_archive_replaced_at_the_same_path_is_not_served_stale(tmp_path, tok, kind):
    s = KINDS[kind](tmp_path, tok)
    first, path = s["networks_for"](s["model"], s["hp"])
    assert _state_equal(first, s["nets"])
    other = KINDS[kind](tmp_path, tok, seed=7)  # another network for another tiny model object ...
    s["save"](path, other["nets"], s["model"], s["hp"])  # ... re-saved for *this* model at the same path
    again, _ = s["networks_for"](s["model"], s["hp"])
    assert _state_equal(again, other["nets"]) and not _state_equal(again, first)


def test_switching_preset_or_a_switch_does_not_reuse_the_network(tmp_path, tok):
    from easyedit_agrade.models.agrade.archive import ArchiveMismatchError

    s = _agrade(tmp_path, tok)
    s["networks_for"](s["model"], s["hp"])
    for change in ({"preset": "malmen"}, {"use_adjustment": False}, {"use_weight_projection": False}):
        hp = s["cls"].from_dict(dict(s["hp"].to_dict(), **change))
        with pytest.raises(ArchiveMismatchError, match=next(iter(change))):
            s["networks_for"](s["model"], hp)


def test_switching_preset_picks_the_other_shipped_archive(embedded_model):
    """``archive: null``: the AGRADE and the MALMEN-preset archive are both shipped; switching ``preset`` on the same
    model object must give the MALMEN archive, not the cached AGRADE network."""
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_main import _networks_for, clear_archive_cache
    from easyedit_agrade.paths import REPO_ROOT

    model, _tok = embedded_model
    clear_archive_cache()
    hp = AGRADEHyperParams.from_hparams(REPO_ROOT / "hparams/AGRADE/smollm2-135m")
    nets_a, path_a = _networks_for(model, hp)
    hp.preset = "malmen"
    nets_m, path_m = _networks_for(model, hp)
    assert path_a.name.startswith("agrade-") and path_m.name.startswith("malmen-")
    assert not _state_equal(nets_a, nets_m)
    clear_archive_cache()


def _rewrite(path, change):
    """Rewrite a safetensors file with ``change(tensors)`` applied, keeping its header metadata (digest included)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=raw)


def _first_float(tensors):
    return next(k for k, v in sorted(tensors.items()) if v.is_floating_point() and v.numel() > 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", ["scaled", "nan", "truncated"])
def test_damaged_archive_is_refused_naming_the_file(tmp_path, tok, kind, damage):
    s = KINDS[kind](tmp_path, tok)
    path = tmp_path / s["hp"].archive.split("/")[-1]
    assert file_digest(path) is not None
    if damage == "scaled":  # a tensor ×1e6: loads fine without a digest and edits garbage
        _rewrite(path, lambda t: t[_first_float(t)].mul_(1e6))
    elif damage == "nan":
        _rewrite(path, lambda t: t[_first_float(t)].view(-1)[0].fill_(float("nan")))
    else:
        path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CorruptFileError) as info:
        s["networks_for"](s["model"], s["hp"])
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_legacy_archive_without_digest_still_loads(tmp_path, tok, kind):
    import warnings

    s = KINDS[kind](tmp_path, tok)
    path = tmp_path / s["hp"].archive.split("/")[-1]
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        raw = {k: v for k, v in f.metadata().items() if k != DIGEST_KEY}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=raw)
    assert file_digest(path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nets, _ = s["networks_for"](s["model"], s["hp"])
    assert _state_equal(nets, s["nets"])


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_copy_of_the_model_is_reported_as_dtype_differs(tmp_path, tok, kind):
    s = KINDS[kind](tmp_path, tok)
    model = s["model"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype differs: the model's edited weights are bfloat16.*float64"):
        s["find"](model, s["hp"])


#: tensor digests of the shipped archives as they were before the digest was stored (computed from the files of
#: commit 4020a75): re-saving with the digest changed only metadata
SHIPPED_DIGESTS = {
    # saved with its digest (session 5: the preserved-knowledge term, archives/README.md)
    "agrade-preserved-smollm2-135m-instruct.safetensors":
        "fb9403546c10463ddba60a81e7c3d0f9a3caa06a03ff89355b5930882ec1d700",
    "agrade-smollm2-135m-instruct.safetensors": "67633bd1659962c8e98aabce5b698d0cf2490d79c30f2f55cc4d64655ac0cc40",
    "instructedit-smollm2-135m.safetensors": "528ccd45e606c70d61cd89adabdeed4118be2887ba575f0a0f7987027a8c4bad",
    "malmen-smollm2-135m-instruct.safetensors": "681832bccb88cb89dbf6690a054ea5e527741c170c4ef134f7ad2aad45e29a91",
    # the MALMEN preset continued with the AGRADE preserved archive's recipe (session 12, archives/README.md)
    "malmen-preserved-smollm2-135m-instruct.safetensors":
        "88eaf2f2a8fcf673281004ab0c6bb059969a45c727129f52330bd4d93168bd08",
    # EasyEdit's MEND network (session 6, its own EditTrainer; digest added with scripts/add_archive_digests.py)
    "mend-smollm2-135m-instruct.safetensors": "0eeb2e8f061e858caacb9fe6fb997f19afd53bccf91714653632198a5b43044b",
}


def test_shipped_archives_carry_a_verified_digest():
    from easyedit_agrade.core.checkpoint import load_tensors
    from easyedit_agrade.paths import REPO_ROOT

    shipped = sorted((REPO_ROOT / "archives").glob("*.safetensors"))
    assert sorted(p.name for p in shipped) == sorted(SHIPPED_DIGESTS)
    for path in shipped:
        tensors, meta = load_tensors(path)  # verifies the digest and finiteness
        assert file_digest(path) == tensor_digest(tensors) == SHIPPED_DIGESTS[path.name], path.name
        if meta.get("format", "").startswith("easyedit-mend"):
            continue  # EasyEdit's MEND state dict: no model fingerprint (EasyEdit's loader checks the shapes)
        assert json.loads(json.dumps(meta))["fingerprint"]["dtype"] == "float32", path.name


@pytest.mark.parametrize("preset,term,expected", [
    ("agrade", True, "agrade-preserved-smollm2-135m-instruct.safetensors"),
    ("agrade", False, "agrade-smollm2-135m-instruct.safetensors"),
    ("malmen", True, "malmen-preserved-smollm2-135m-instruct.safetensors"),
    ("malmen", False, "malmen-smollm2-135m-instruct.safetensors"),
])
def test_default_yaml_finds_the_shipped_archive_trained_like_it(embedded_model, preset, term, expected):
    """``archive: null`` with the shipped YAML: the preset picks the network (the fingerprint keeps a MALMEN archive
    from serving AGRADE), the preserved-knowledge switch picks the archive trained with or without log μ."""
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.archive import find_archive, has_preserved_term
    from easyedit_agrade.paths import REPO_ROOT

    hp = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams/AGRADE/smollm2-135m"),
                                        overrides={"preset": preset, "use_preserved_cov": term,
                                                   "preserved_change_budget": 0.15 if term else None})
    found = find_archive(embedded_model[0], hp)
    assert found.name == expected and has_preserved_term(found) == term
