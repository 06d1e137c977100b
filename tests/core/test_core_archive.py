"""The generic archive format of ``core.archive``: a method's ArchiveFormat saves, finds, checks and loads."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agrade"))

from agrade_helpers import tiny_llama  # noqa: E402

from easyedit_agrade.core.archive import ArchiveFormat, model_fingerprint
from easyedit_agrade.core.checkpoint import read_metadata
from easyedit_agrade.models.instructedit.editor import build_networks
from easyedit_agrade.models.instructedit.instructedit_hparams import InstructEditHyperParams

PARAMS = ["model.layers.1.mlp.down_proj.weight"]


class NotFound(FileNotFoundError):
    pass


class Mismatch(ValueError):
    pass


FMT = ArchiveFormat(format="test.method/1", alg_name="InstructEdit", not_found_error=NotFound,
                    mismatch_error=Mismatch, build=build_networks, retrain_hint=lambda hp=None: "retrain it")


@pytest.fixture()
def setup(tmp_path):
    model = tiny_llama(64)
    hp = InstructEditHyperParams.from_dict(dict(alg_name="InstructEdit", model_name="tiny", inner_params=PARAMS,
                                                rank=4, n_blocks=1))
    return model, hp, tmp_path


def test_save_find_load_round_trip(setup):
    model, hp, folder = setup
    nets = build_networks(model, hp, seed=3)
    FMT.save(folder / "a.safetensors", nets, model, hp, training={"steps": 1})
    meta = read_metadata(folder / "a.safetensors")
    assert meta["format"] == "test.method/1" and meta["fingerprint"] == model_fingerprint(model, PARAMS)
    assert meta["hparams"] == {"rank": 4, "n_blocks": 1, "inner_params": PARAMS, "use_instruction": True}
    assert FMT.find(model, hp, folder) == folder / "a.safetensors"
    loaded = FMT.load(folder / "a.safetensors", model, hp)
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    for k, v in nets.state_dict().items():
        assert torch.equal(loaded.state_dict()[k].to(v.dtype), v)


def test_mismatch_and_absence_are_the_methods_errors(setup):
    model, hp, folder = setup
    FMT.save(folder / "a.safetensors", build_networks(model, hp), model, hp)
    other = InstructEditHyperParams.from_dict(dict(hp.to_dict(), rank=8))
    with pytest.raises(NotFound, match="hparam rank=8 but the archive was trained with 4"):
        FMT.find(model, other, folder)
    with pytest.raises(Mismatch, match="rank"):
        FMT.load(folder / "a.safetensors", model, other)
    with torch.no_grad():
        model.get_parameter(PARAMS[0]).add_(1.0)  # other weights: the fingerprint no longer matches
    with pytest.raises(NotFound, match="fingerprint"):
        FMT.find(model, hp, folder)
    missing = InstructEditHyperParams.from_dict(dict(hp.to_dict(), archive=str(folder / "none.safetensors")))
    with pytest.raises(NotFound, match="retrain it"):
        FMT.find(model, missing, folder)
