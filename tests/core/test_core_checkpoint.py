"""safetensors + JSON I/O: round trips, atomic writes, optimizer state, training checkpoints."""
from __future__ import annotations

import torch

from easyedit_agrade.core.checkpoint import (latest_checkpoint, load_tensors, load_training_checkpoint,
                                             optimizer_state_from_tensors, optimizer_state_to_tensors,
                                             read_metadata, save_tensors, save_training_checkpoint)


def test_tensors_and_metadata_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.tensor(2.0, dtype=torch.float64)}
    save_tensors(tmp_path / "x.safetensors", t, {"k": [1, "two"], "n": {"x": 1.5}})
    back, meta = load_tensors(tmp_path / "x.safetensors")
    assert meta == {"k": [1, "two"], "n": {"x": 1.5}} == read_metadata(tmp_path / "x.safetensors")
    assert all(torch.equal(t[k], back[k]) for k in t)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp files left


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.Adam([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.2}])
    (p.sum() + q.square().sum()).backward()
    opt.step()
    tensors, meta = optimizer_state_to_tensors(opt.state_dict())
    opt2 = torch.optim.Adam([{"params": [p], "lr": 0.5}, {"params": [q], "lr": 0.5}])
    opt2.load_state_dict(optimizer_state_from_tensors(tensors, meta))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][name]))


def test_training_checkpoints_latest_and_keep(tmp_path):
    for step in (1, 2, 3):
        save_training_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, None, {"note": step},
                                 model_metadata={"m": step})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    path = latest_checkpoint(tmp_path)
    model_state, meta, opt, state = load_training_checkpoint(path)
    assert torch.equal(model_state["w"], torch.full((2,), 3.0)) and meta == {"m": 3}
    assert opt is None and state == {"note": 3, "step": 3}
