"""InstructEdit trainer on a tiny float64 LLaMA: a resumed run equals an uninterrupted one (bit-identical), and the
run's end (validation of the last step, checkpoint, last.safetensors) also happens when the wall-time budget stops it."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agrade"))

from agrade_helpers import LLAMA_PARAMS, tiny_llama, tok  # noqa: E402,F401  (tok: session fixture)
from easyedit_agrade.core.checkpoint import load_json, load_tensors  # noqa: E402


def _config(**over):
    from easyedit_agrade.models.instructedit.instructedit_hparams import InstructEditTrainingHyperParams

    cfg = dict(alg_name="InstructEdit", model_name="tiny-test-model", inner_params=list(LLAMA_PARAMS), rank=4,
               n_blocks=2, editor_dtype="float64", cache_batch_size=4, n_edits=2, accumulate=2, max_steps=5,
               val_every=2, checkpoint_every=3, val_per_task=2, lr=1e-2, lr_lr=1e-2, edit_lr=1e-2, max_length=32,
               tasks=["counterfact", "convsent"], seed=1)
    cfg.update(over)
    return InstructEditTrainingHyperParams.from_dict(cfg)


def _run(out, tok, records, instructions, steps, resume=False, **over):
    from easyedit_agrade.models.instructedit.instructedit_trainer import InstructEditTrainer

    val = {"counterfact": records["counterfact"][:2], "convsent": records["convsent"][:1]}
    tr = InstructEditTrainer(_config(**over), records, val, model=tiny_llama(len(tok)), tok=tok, out_dir=str(out),
                             resume=resume, max_steps=steps, log=lambda s: None, instructions=instructions)
    tr.run()
    return tr


def _without_wall(history):
    return [{k: v for k, v in h.items() if k != "wall_s"} for h in history]


def test_resume_equals_uninterrupted(tmp_path, tok, tiny_task_records, tiny_instructions):
    full = _run(tmp_path / "full", tok, tiny_task_records, tiny_instructions, 5)
    half = _run(tmp_path / "split", tok, tiny_task_records, tiny_instructions, 2)
    assert half.step == 2 and (tmp_path / "split" / "checkpoints" / "step-00000002").is_dir()  # the run's end
    resumed = _run(tmp_path / "split", tok, tiny_task_records, tiny_instructions, 5, resume=True)
    assert resumed.step == full.step == 5
    a, b = full.nets.state_dict(), resumed.nets.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # validations at 2, 4 and (the run's end) 5; the same best
    assert [h["step"] for h in full.state["history"]] == [2, 4, 5]
    assert _without_wall(full.state["history"]) == _without_wall(resumed.state["history"])
    assert (full.state["best"], full.state["best_step"]) == (resumed.state["best"], resumed.state["best_step"])
    for name in ("best.safetensors", "last.safetensors"):
        ta, _ = load_tensors(tmp_path / "full" / name)
        tb, _ = load_tensors(tmp_path / "split" / name)
        assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert load_json(tmp_path / "split" / "checkpoints" / "latest.json")["step"] == 5


def test_wall_time_budget_still_ends_the_run(tmp_path, tok, tiny_task_records, tiny_instructions):
    tr = _run(tmp_path, tok, tiny_task_records, tiny_instructions, 5, max_wall_s=0.0)
    assert tr.step == 0
    assert [h["step"] for h in tr.state["history"]] == [0]  # the unedited-start network validated once
    assert (tmp_path / "last.safetensors").is_file() and (tmp_path / "best.json").is_file()
    assert load_json(tmp_path / "checkpoints" / "latest.json")["step"] == 0
