"""η calibration of a trained archive (``python -m easyedit_agrade.tools.agrade_calibrate``): the written archive
differs from its source only by the chosen η factor / λ shift, the choice respects the constraints, and several
validation batches are averaged."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_calibrate_scales_eta_and_averages_batches(tmp_path, embedded_model, capsys):
    from easyedit_agrade.core.checkpoint import load_tensors
    from easyedit_agrade.models.agrade.archive import find_archive
    from easyedit_agrade.tools.agrade_calibrate import main
    from easyedit_agrade.paths import REPO_ROOT, data_file

    try:
        data_file("counterfact/counterfact-val.json")
        from easyedit_agrade.models.agrade import AGRADEHyperParams

        hp = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams/AGRADE/smollm2-135m"))
        src = find_archive(embedded_model[0], hp)
    except Exception as exc:  # no shared data / no shipped archive
        pytest.skip(f"needs ../shared/data and the shipped AGRADE archive: {exc}")
    dst = tmp_path / "cal.safetensors"
    torch.set_num_threads(1)
    assert main([str(src), str(dst), "--val-size", "3", "--val-batches", "2", "--factors", "0.5", "2",
                 "--min-ls", "0.0"]) == 0
    chosen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    before, _ = load_tensors(src)
    after, meta = load_tensors(dst)
    cal = meta["training"]["eta_calibration"]
    assert cal["factor"] == chosen["chosen_factor"] and cal["val_batches"] == "2 batches of 3 edits"
    assert {c["factor"] for c in cal["candidates"]} == {0.5, 1.0, 2.0}
    picked = next(c for c in cal["candidates"] if c["factor"] == cal["factor"])
    assert picked["score"] == max(c["score"] for c in cal["candidates"])  # no constraint binds here
    for key, value in before.items():
        if key.endswith(".lr"):
            torch.testing.assert_close(after[key], value * cal["factor"])
        else:
            assert torch.equal(after[key], value), key
    with pytest.raises(ValueError, match="val_batches"):
        from easyedit_agrade.tools.agrade_calibrate import evaluate_factors

        evaluate_factors(str(src), str(REPO_ROOT / "hparams/AGRADE/smollm2-135m"), [None] * 5, [1.0], n_batches=2)
