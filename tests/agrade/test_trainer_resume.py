"""Trainer: deterministic, checkpoints, and resume == uninterrupted run (bit-identical)."""
from __future__ import annotations

import torch

from agrade_helpers import LLAMA_PARAMS, records, tiny_llama, training_config
from easyedit_agrade.models.agrade import AGRADETrainer
from easyedit_agrade.models.agrade.archive import load_networks


def _run(tmp, tok, steps, resume=False):
    cfg = training_config(LLAMA_PARAMS, n_edits=2, max_steps=4, val_every=2, checkpoint_every=1, val_size=3,
                          seed=3)
    recs = records(6)
    tr = AGRADETrainer(cfg, train_set=recs, val_set=recs, model=tiny_llama(len(tok)), tok=tok, progress=False,
                       out_dir=tmp, resume=resume, max_steps=steps, log=lambda s: None)
    tr.run()
    return tr


def test_resume_equals_uninterrupted(tmp_path, tok):
    full = _run(tmp_path / "full", tok, 4)
    _run(tmp_path / "split", tok, 2)
    resumed = _run(tmp_path / "split", tok, 4, resume=True)
    assert resumed.step == full.step == 4
    a, b = full.nets.state_dict(), resumed.nets.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda hist: [{k: v for k, v in h["val"].items() if k != "edit_time_s"} for h in hist]  # noqa: E731
    assert strip(full.state["history"]) == strip(resumed.state["history"])
    # the exported best network loads as an archive for the same model
    nets = load_networks(tmp_path / "full" / "best.safetensors", full.model, full.config, dtype=torch.float64)
    assert not nets.training


def test_data_order_is_a_function_of_seed_and_step(tmp_path, tok):
    cfg = training_config(LLAMA_PARAMS, n_edits=2, seed=5)
    recs = records(6)
    t1 = AGRADETrainer(cfg, train_set=recs, val_set=recs, model=tiny_llama(len(tok)), tok=tok, progress=False,
                       out_dir=tmp_path)
    assert [t1.batch_indices(s) for s in range(5)] == [t1.batch_indices(s) for s in range(5)]
    assert sorted(i for s in range(3) for i in t1.batch_indices(s)) == list(range(6))  # one epoch = a permutation


def test_resume_falls_back_from_a_truncated_latest_checkpoint_and_says_which(tmp_path, tok):
    import pytest

    _run(tmp_path, tok, 2)  # checkpoints step-1 and step-2
    damaged = tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-16])
    with pytest.warns(RuntimeWarning, match=r"step-00000002 is damaged.*newest intact checkpoint step-00000001"):
        resumed = _run(tmp_path, tok, 3, resume=True)
    assert resumed.step == 3


def test_resume_on_a_folder_without_checkpoints_says_so(tmp_path, tok):
    import pytest

    with pytest.warns(RuntimeWarning, match="nothing to resume"):
        tr = _run(tmp_path / "fresh", tok, 1, resume=True)
    assert tr.step == 1
