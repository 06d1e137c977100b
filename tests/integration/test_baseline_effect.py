"""An EasyEdit baseline through the documented path must *edit* (issue 16 §5): ROME with the hparams of
``load_easyedit_hparams`` (a PreloadedModel name) computed its key at a left-padded position and silently did not
edit (post rewrite_acc 0.0). Runs on both EasyEdit generations (``make test-upstream`` too)."""
from __future__ import annotations

import contextlib

import pytest

from easyedit_agrade.integration.cpu_compat import cuda_on_cpu as _cuda_on_cpu
from easyedit_agrade.paths import REPO_ROOT


def cuda_on_cpu():
    """Upstream runs ``device: 0`` as ``cpu`` by itself (integration.device); the PyPI wheel needs the CPU layer."""
    from easyedit_agrade.integration.easyedit import easyedit_generation

    return contextlib.nullcontext() if easyedit_generation() == "upstream" else _cuda_on_cpu()

ROME_REQUEST = dict(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
                    ground_truth=["French"], subject=["Danielle Darrieux"])


def test_padding_side_follows_the_method(easyeditor_module, embedded_model):
    """Every BaseEditor on a PreloadedModel pads as EasyEdit's name-based branch would for its alg_name."""
    from easyedit_agrade.integration.baselines import load_easyedit_hparams
    from easyedit_agrade.integration.preloaded import RIGHT_PADDING_ALGS, padding_side_for

    assert {"ROME", "MEMIT", "EMMET", "AlphaEdit", "R-ROME"} <= RIGHT_PADDING_ALGS
    assert padding_side_for("FT") == padding_side_for("AGRADE") == "left"
    model, tok = embedded_model
    side = tok.padding_side
    try:
        for alg, want in (("ROME", "right"), ("FT", "left"), ("MEMIT", "right")):
            hp = load_easyedit_hparams(REPO_ROOT / "hparams" / alg / "smollm2-135m", model=model, tok=tok)
            with cuda_on_cpu():
                editor = easyeditor_module.BaseEditor.from_hparams(hp)
            assert editor.tok.padding_side == want, alg
    finally:
        tok.padding_side = side


@pytest.mark.slow
def test_rome_really_edits_through_load_easyedit_hparams(easyeditor_module, embedded_model):
    from easyedit_agrade.integration.baselines import load_easyedit_hparams

    model, tok = embedded_model
    side = tok.padding_side
    hp = load_easyedit_hparams(REPO_ROOT / "hparams" / "ROME" / "smollm2-135m", model=model, tok=tok)
    weight = model.get_parameter(hp.rewrite_module_tmp.format(hp.layers[0]) + ".weight")
    before = weight.detach().clone()
    try:
        with cuda_on_cpu():
            editor = easyeditor_module.BaseEditor.from_hparams(hp)
            metrics, _edited, _copy = editor.edit(keep_original_weight=True, verbose=False, **ROME_REQUEST)
    finally:
        tok.padding_side = side
        with __import__("torch").no_grad():
            weight.copy_(before)
    pre = float(metrics[0]["pre"]["rewrite_acc"][0])
    post = float(metrics[0]["post"]["rewrite_acc"][0])
    assert pre < 1.0 and post == 1.0, (pre, post)  # measured: 0.0 -> 1.0 (left padding: 0.0 -> 0.0)
