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


# -- integrity: digest, finiteness, named files (issue 16 §3), resume fallback (issue 16 §4) --------------------
import json  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

from easyedit_agrade.core.checkpoint import (DIGEST_KEY, META_KEY, CorruptFileError,  # noqa: E402
                                             file_digest, tensor_digest)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_digest_is_stored_and_a_flipped_bit_is_refused_with_the_file_named(tmp_path):
    t = {"a": torch.randn(4, 3), "b": torch.arange(6)}
    path = tmp_path / "x.safetensors"
    save_tensors(path, t, {"k": 1})
    assert file_digest(path) == tensor_digest(t)
    _flip_last_byte(path)  # inside the last tensor's bytes
    with pytest.raises(CorruptFileError, match="SHA-256") as info:
        load_tensors(path)
    assert str(path) in str(info.value)


def test_digest_is_canonical_and_sensitive():
    a = {"x": torch.ones(2, 2), "y": torch.zeros(3, dtype=torch.bfloat16), "s": torch.tensor(1.0)}
    assert tensor_digest(a) == tensor_digest(dict(reversed(list(a.items()))))
    assert tensor_digest(a) != tensor_digest({**a, "x": torch.ones(4)})  # same bytes, other shape
    assert tensor_digest(a) != tensor_digest({**a, "x": torch.ones(2, 2, dtype=torch.float64)})
    assert tensor_digest(a) != tensor_digest({**a, "y": torch.tensor([0.0, 0.0, 1e-3], dtype=torch.bfloat16)})


def test_non_finite_tensor_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_tensors(path, {"w": torch.tensor([1.0, float("nan")]), "n": torch.arange(2)})
    with pytest.raises(CorruptFileError, match=r"non-finite.*'w'") as info:
        load_tensors(path)
    assert str(path) in str(info.value)


def test_truncated_file_error_names_the_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_tensors(path, {"w": torch.randn(64, 64)}, {"k": 1})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=str(path)):
        load_tensors(path)


def test_file_without_digest_loads_quietly_but_is_checked_for_finiteness(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"w": torch.ones(3)}, str(path), metadata={META_KEY: json.dumps({"k": 2})})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors, meta = load_tensors(path)
    assert meta == {"k": 2} and torch.equal(tensors["w"], torch.ones(3)) and file_digest(path) is None
    save_file({"w": torch.tensor([float("inf")])}, str(path), metadata={META_KEY: "{}"})
    with pytest.raises(CorruptFileError, match="non-finite"):
        load_tensors(path)
    assert DIGEST_KEY != META_KEY


def test_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    for step in (1, 2):
        save_training_checkpoint(tmp_path, step, {"w": torch.full((256,), float(step))}, None, {})
    damaged = tmp_path / "step-00000002" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    with pytest.warns(RuntimeWarning, match=r"step-00000002 is damaged.*step-00000001"):
        path = latest_checkpoint(tmp_path)
    assert path.name == "step-00000001"
    model_state, _meta, _opt, state = load_training_checkpoint(path)
    assert state["step"] == 1 and torch.equal(model_state["w"], torch.full((256,), 1.0))
    (tmp_path / "step-00000001" / "state.json").write_text("{")
    with pytest.raises(CorruptFileError, match="no intact checkpoint"):
        latest_checkpoint(tmp_path)


def test_resume_without_checkpoints_says_so(tmp_path):
    with pytest.warns(RuntimeWarning, match="nothing to resume.*step 0"):
        assert latest_checkpoint(tmp_path / "empty") is None
