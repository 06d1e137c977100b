"""AGRADE with ``key_positions: target+subject``: the executor caches one more row per request (its subject's
last token), the edit differs from the target-only one, a missing ``subjects`` argument is an error, the hparam
is validated, and archives written before the key existed keep meaning ``target`` (archive-checked)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from agrade_helpers import records, tiny_agrade_archive
from easyedit_agrade.core.checkpoint import read_metadata
from easyedit_agrade.hparams import HyperParamsError
from easyedit_agrade.models.agrade import AGRADEHyperParams, apply_agrade_to_model
from easyedit_agrade.models.agrade.archive import ARCHIVE, load_networks
from easyedit_agrade.models.agrade.editor import AGRADEEditor

SUBJECTS = ["France", "Danielle Darrieux", "Eiffel Tower", "Apple", "Beatles", "Mount Everest"]


def _records(n):
    return [dataclasses.replace(r, subject=SUBJECTS[i]) for i, r in enumerate(records(n))]


def test_subject_rows_are_cached_and_change_the_edit(tmp_path, tok):
    model, hp = tiny_agrade_archive(tmp_path, tok)
    recs = _records(4)
    prompts, targets, subjects = [r.prompt for r in recs], [r.target_new for r in recs], [r.subject for r in recs]
    hp_subj = AGRADEHyperParams.from_dict(dict(hp.to_dict(), key_positions="target+subject"))
    # the archive was trained with target rows: it is refused for target+subject (the key is archive-checked)
    assert any("key_positions" in p for p in ARCHIVE.problems(read_metadata(hp.archive), model, hp_subj,
                                                              tmp_path / "a.safetensors"))
    nets = load_networks(hp.archive, model, hp)
    plain = AGRADEEditor(model, tok, hp, nets).edit_deltas(prompts, targets, subjects=subjects)
    same = AGRADEEditor(model, tok, hp, nets).edit_deltas(prompts, targets)
    assert all(torch.equal(plain.deltas[k], same.deltas[k]) for k in plain.deltas)  # target: subjects unused
    editor = AGRADEEditor(model, tok, hp_subj, nets)
    wider = editor.edit_deltas(prompts, targets, subjects=subjects)
    assert wider.n_tokens == plain.n_tokens + len(recs)
    assert any(not torch.allclose(wider.deltas[k], plain.deltas[k]) for k in plain.deltas)
    with pytest.raises(ValueError, match="needs the requests' subjects"):
        editor.edit_deltas(prompts, targets)


def test_executor_passes_subjects(tmp_path, tok):
    model, hp = tiny_agrade_archive(tmp_path, tok, key_positions="target+subject")
    reqs = [r.to_request() for r in _records(3)]
    assert all(q["subject"] for q in reqs)
    before = {p: t.detach().clone() for p, t in model.named_parameters() if p in hp.inner_params}
    _, copy = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)
    assert all(torch.equal(copy[p], before[p]) for p in hp.inner_params)
    assert any(not torch.equal(dict(model.named_parameters())[p], before[p]) for p in hp.inner_params)


def test_archive_without_the_key_means_target(tmp_path, tok):
    model, hp = tiny_agrade_archive(tmp_path, tok)
    meta = read_metadata(hp.archive)
    assert meta["hparams"]["key_positions"] == "target"
    del meta["hparams"]["key_positions"]  # as in the archives shipped before the key existed
    assert ARCHIVE.problems(meta, model, hp, tmp_path / "a.safetensors") == []
    hp_subj = AGRADEHyperParams.from_dict(dict(hp.to_dict(), key_positions="target+subject"))
    assert ARCHIVE.problems(meta, model, hp_subj, tmp_path / "a.safetensors")


def test_bad_value_names_the_field(tmp_path, tok):
    _, hp = tiny_agrade_archive(tmp_path, tok)
    with pytest.raises(HyperParamsError, match="key_positions"):
        AGRADEHyperParams.from_dict(dict(hp.to_dict(), key_positions="subject"))
