"""Both executors are all or nothing: every request is checked before a weight moves, a failure in a later chunk
takes the earlier chunks out again (bit-exact), and a request longer than ``max_length`` is an error naming it."""
from __future__ import annotations

import pytest
import torch

from agrade_helpers import LLAMA_PARAMS, perturb, records, tiny_llama

LONG_TARGET = " ".join(["tomato"] * 60)
LONG_PROMPT = "In a long and winding story about " + " and ".join(f"city number {i}" for i in range(20)) + " the"


def _archive(tmp_path, model, alg):
    """hparams for a tiny LLaMA and a perturbed network saved as its archive (batch_size 1: one chunk per request)."""
    if alg == "AGRADE":
        from easyedit_agrade.models.agrade import AGRADEHyperParams as HP
        from easyedit_agrade.models.agrade.agrade_main import clear_archive_cache
        from easyedit_agrade.models.agrade.archive import build_networks, save_archive
        extra = dict(eta_init=0.5, editor_dtype="float64", cache_batch_size=2)
    else:
        from easyedit_agrade.models.instructedit import InstructEditHyperParams as HP
        from easyedit_agrade.models.instructedit.archive import build_networks, save_archive
        from easyedit_agrade.models.instructedit.instructedit_main import clear_archive_cache
        extra = dict(edit_lr=0.5, use_instruction=False, editor_dtype="float64", cache_batch_size=2)
    path = tmp_path / f"{alg}.safetensors"
    hp = HP.from_dict(dict(alg_name=alg, model_name="tiny", inner_params=LLAMA_PARAMS, rank=4, n_blocks=2,
                           batch_size=1, max_length=40, archive=str(path), **extra))
    nets = build_networks(model, hp).double()
    perturb(nets, scale=0.1)
    nets.train()
    for s in nets.slots:
        nets.observe(s.name, torch.randn(20, s.key_size, dtype=torch.float64),
                     torch.randn(20, s.value_size, dtype=torch.float64))
    save_archive(path, nets, model, hp)
    clear_archive_cache()
    return hp


def _apply(alg):
    if alg == "AGRADE":
        from easyedit_agrade.models.agrade.agrade_main import apply_agrade_to_model
        return apply_agrade_to_model
    from easyedit_agrade.models.instructedit.instructedit_main import apply_instructedit_to_model
    return apply_instructedit_to_model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model, before):
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"weights changed: {changed}"


@pytest.mark.parametrize("alg", ["AGRADE", "InstructEdit"])
def test_first_request_edits_the_model(tmp_path, tok, alg):
    """The premise of the tests below: one valid request really changes the weights."""
    model = tiny_llama(len(tok))
    hp = _archive(tmp_path, model, alg)
    before = _snapshot(model)
    _apply(alg)(model, tok, [records(1)[0].to_request()], hp)
    assert any(not torch.equal(before[p], model.state_dict()[p]) for p in LLAMA_PARAMS)


@pytest.mark.parametrize("alg", ["AGRADE", "InstructEdit"])
def test_invalid_second_request_moves_no_weight(tmp_path, tok, alg):
    model = tiny_llama(len(tok))
    hp = _archive(tmp_path, model, alg)
    reqs = [records(1)[0].to_request(), {"prompt": "The capital of Peru is", "target_new": LONG_TARGET}]
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"request 1 .*max_length=40"):
        _apply(alg)(model, tok, reqs, hp, return_orig_weights=True)
    _assert_bit_identical(model, before)


@pytest.mark.parametrize("alg", ["AGRADE", "InstructEdit"])
def test_long_prompt_is_an_error_not_cut(tmp_path, tok, alg):
    model = tiny_llama(len(tok))
    hp = _archive(tmp_path, model, alg)
    assert len(tok(LONG_PROMPT)["input_ids"]) > 40
    reqs = [r.to_request() for r in records(3)]
    reqs[2]["prompt"] = LONG_PROMPT
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"request 2 \('In a long.*'\) is \d+ tokens .*more than max_length=40"):
        _apply(alg)(model, tok, reqs, hp)
    _assert_bit_identical(model, before)


@pytest.mark.parametrize("alg", ["AGRADE", "InstructEdit"])
def test_failure_in_a_later_chunk_restores_exactly(tmp_path, tok, alg, monkeypatch):
    """The second chunk fails after the first one was written (an injected fault in the ΔW computation, the same
    place a non-finite ΔW or an out-of-memory error would come from): the call restores before it raises."""
    if alg == "AGRADE":
        from easyedit_agrade.models.agrade.editor import AGRADEEditor as Editor
    else:
        from easyedit_agrade.models.instructedit.editor import InstructEditEditor as Editor
    real = Editor.edit_deltas
    calls = []

    def edit_deltas(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in chunk 2")
        return real(self, *args, **kwargs)

    model = tiny_llama(len(tok))
    hp = _archive(tmp_path, model, alg)
    monkeypatch.setattr(Editor, "edit_deltas", edit_deltas)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="injected failure in chunk 2"):
        _apply(alg)(model, tok, [r.to_request() for r in records(3)], hp, return_orig_weights=True)
    assert len(calls) == 2
    _assert_bit_identical(model, before)


def test_long_prompt_through_batch_edit_leaves_model_unedited(tmp_path, tok, easyeditor_module):
    """Through EasyEdit's ``batch_edit`` the error comes from the executor, before any weight moves (EasyEdit has
    no restore for an exception in its own post-edit metrics)."""
    import importlib

    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
    from easyedit_agrade.integration.preloaded import PreloadedModel

    model = tiny_llama(len(tok))
    hp = _archive(tmp_path, model, "AGRADE")
    hp.model_name = PreloadedModel("tiny", model, tok)
    before = _snapshot(model)
    editor_mod = importlib.import_module("easyeditor.editors.editor")
    with cuda_on_cpu():
        editor = editor_mod.BaseEditor.from_hparams(hp)
        # batch_size 1: batch_edit edits, evaluates and restores the first chunk, then calls the executor with the
        # long request alone (so it is request 0 of that call; the message quotes its prompt)
        with pytest.raises(ValueError, match=r"request 0 \('In a long and winding.*max_length=40"):
            editor.batch_edit(prompts=["The capital of France is", LONG_PROMPT], target_new=["Rome", "Oslo"])
    _assert_bit_identical(model, before)


def test_batch_edit_all_chunks_returns_every_chunk(tmp_path, tok, easyeditor_module):
    """EasyEdit's ``batch_edit`` with ``batch_size`` 1 returns one chunk's metrics (the last); our helper, used by
    the demos, returns all of them in order and leaves the model as ``batch_edit`` leaves it (restored)."""
    import importlib

    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
    from easyedit_agrade.integration.easyedit import batch_edit_all_chunks, easyedit_generation
    from easyedit_agrade.integration.preloaded import PreloadedModel

    model = tiny_llama(len(tok))
    hp = _archive(tmp_path, model, "AGRADE")
    hp.model_name = PreloadedModel("tiny", model, tok)
    facts = records(3)
    kwargs = dict(prompts=[r.prompt for r in facts], target_new=[r.target_new for r in facts],
                  rephrase_prompts=[r.rephrase_prompt for r in facts])
    before = _snapshot(model)
    editor_mod = importlib.import_module("easyeditor.editors.editor")
    with cuda_on_cpu():
        editor = editor_mod.BaseEditor.from_hparams(hp)
        if easyedit_generation() == "pypi":
            plain, _, _ = editor.batch_edit(**kwargs)
            assert len(plain) == 1 and plain[0]["requested_rewrite"]["prompt"] == facts[2].prompt
        metrics, _, _ = batch_edit_all_chunks(editor, **kwargs)
    assert [m["case_id"] for m in metrics] == [0, 1, 2]
    assert [m["requested_rewrite"]["prompt"] for m in metrics] == [r.prompt for r in facts]
    assert [m["requested_rewrite"]["rephrase_prompt"] for m in metrics] == [r.rephrase_prompt for r in facts]
    assert all("post" in m and "pre" in m for m in metrics)
    assert hp.batch_size == 1
    _assert_bit_identical(model, before)


def test_make_editor_does_not_change_the_callers_hparams(tmp_path, tok, easyeditor_module):
    """The bench and ``edit`` build their editor from a copy: EasyEdit writes into the hparams it gets."""
    import dataclasses

    from easyedit_agrade.bench.methods import make_editor

    model = tiny_llama(len(tok))
    hp = _archive(tmp_path, model, "AGRADE")
    before, name = dataclasses.asdict(hp), hp.model_name
    editor = make_editor(hp, model, tok, "tiny")
    assert editor.hparams is not hp and editor.model is model
    assert hp.model_name is name and dataclasses.asdict(hp) == before
    editor.hparams.batch_size = 1  # what BaseEditor.edit does
    assert hp.batch_size == before["batch_size"]
