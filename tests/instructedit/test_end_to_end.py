"""A tiny end-to-end train + edit on the embedded model: the edit changes the answer; restore is bit-exact;
training resumes from its checkpoint."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def _hparams(archive, **kw):
    from easyedit_agrade.models.instructedit import InstructEditHyperParams

    hp = InstructEditHyperParams.from_hparams(str(REPO_ROOT / "hparams/InstructEdit/smollm2-135m"))
    hp.archive = str(archive)
    for k, v in kw.items():
        setattr(hp, k, v)
    return hp


@torch.no_grad()
def _answer(model, tok, prompt, target):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    logits = model(ids).logits[0, -1]
    first = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    return int(logits.argmax()), float(torch.log_softmax(logits.float(), -1)[first]), first


def test_tiny_train_then_edit_changes_answer_and_restores(embedded_model, tiny_archive, tiny_instructions,
                                                          monkeypatch):
    from easyedit_agrade.models.instructedit import instructedit_main as main
    from easyedit_agrade.models.instructedit.instructions import wrap_requests

    monkeypatch.setattr(main, "load_instructions", lambda path=None: tiny_instructions)
    model, tok = embedded_model
    hp = _hparams(tiny_archive, task="counterfact")
    req = {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}
    wrapped = wrap_requests([req], "counterfact", instructions=tiny_instructions, index=0)[0]["prompt"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pred0, lp0, first = _answer(model, tok, wrapped, "Rome")
    assert pred0 != first  # the unedited model does not say Rome
    edited, copies = main.apply_instructedit_to_model(model, tok, [req], hp, return_orig_weights=True)
    assert edited is model and set(copies) == set(hp.inner_params)
    pred1, lp1, _ = _answer(model, tok, wrapped, "Rome")
    assert req == {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}  # not mutated
    from easyedit_agrade.core.weights import restore_weights

    restore_weights(model, copies)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert lp1 > lp0 + 1.0, (lp0, lp1)
    assert pred1 == first, tok.decode([pred1])  # the edit changed the model's answer to the new target


def test_unwrapped_prompt_without_task_is_a_clear_error(embedded_model, tiny_archive):
    from easyedit_agrade.models.instructedit.instructedit_main import apply_instructedit_to_model

    model, tok = embedded_model
    with pytest.raises(ValueError, match=r"needs the task"):
        apply_instructedit_to_model(model, tok, [{"prompt": "p", "target_new": "t"}], _hparams(tiny_archive))
    with pytest.raises(ValueError, match=r"field 'target_new'"):
        apply_instructedit_to_model(model, tok, [{"prompt": "p"}], _hparams(tiny_archive, task="zsre"))


def test_archive_mismatch_and_resume(embedded_model, tiny_archive, tiny_instructions, tiny_task_records):
    from easyedit_agrade.models.instructedit.archive import ArchiveMismatchError, find_archive

    model, tok = embedded_model
    with pytest.raises(ArchiveMismatchError, match=r"use_instruction"):
        find_archive(model, _hparams(tiny_archive, use_instruction=False))
    with pytest.raises(ArchiveMismatchError, match=r"rank"):
        find_archive(model, _hparams(tiny_archive, rank=64))
    # resume: the checkpoint folder of the tiny run continues to the requested step
    from easyedit_agrade.models.instructedit.instructedit_trainer import InstructEditTrainer, load_training_config

    cfg = load_training_config(str(REPO_ROOT / "hparams/TRAINING/InstructEdit/smollm2-135m.yaml"),
                               {"max_steps": 4, "n_edits": 1, "accumulate": 1, "val_every": 0, "checkpoint_every": 0,
                                "train_lower_dtype": None, "edit_lr": 1e-3, "lr": 1e-3,
                                "tasks": ["counterfact", "convsent"]})
    tr = InstructEditTrainer(cfg, tiny_task_records, {}, model=model, tok=tok, out_dir=str(tiny_archive.parent),
                             resume=True, log=lambda s: None, instructions=tiny_instructions)
    assert tr.load_checkpoint() and tr.step == 3
    tr.resume = False
    assert tr.run()["step"] == 4
