"""The scoped shims that let EasyEdit 0.0.1.dev0's baselines run on this stack leave the model's function intact."""
from __future__ import annotations

import importlib

import pytest
import torch

from easyedit_agrade.integration import baseline_compat as compat


def test_decoder_layers_return_tuples_is_transparent(embedded_model):
    model, tok = embedded_model
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    seen = []
    with compat.decoder_layers_return_tuples(model, "model.layers.{}", model.config.num_hidden_layers):
        h = model.model.layers[5].register_forward_hook(lambda m, a, o: seen.append(type(o)))
        try:
            with torch.no_grad():
                out = model(input_ids=ids).logits
        finally:
            h.remove()
    assert seen == [tuple]  # what EasyEdit's MEMIT hooks expect
    assert torch.equal(out, ref)
    with torch.no_grad():  # hooks removed afterwards
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_adalora_total_step_and_model_parallel(easyeditor_module):
    lora_main = importlib.import_module("easyeditor.models.lora.lora_main")
    original = lora_main.AdaLoraConfig
    with compat.adalora_total_step(30):
        cfg = lora_main.AdaLoraConfig(r=8, target_modules=["q_proj"])
        assert cfg.total_step == 30
    assert lora_main.AdaLoraConfig is original
    with pytest.raises(ValueError, match="total_step"):
        original(r=8, target_modules=["q_proj"])  # why the shim exists

    class H:
        pass

    h = H()
    assert compat.ensure_model_parallel_field(h) and h.model_parallel is False
    assert not compat.ensure_model_parallel_field(h)


def test_memit_identity_covariance(easyeditor_module, embedded_model):
    model, _ = embedded_model
    memit = importlib.import_module("easyeditor.models.memit.memit_main")

    class H:
        layers = [3]
        rewrite_module_tmp = "model.layers.{}.mlp.down_proj"

    key = (model.config._name_or_path.replace("/", "_"), "model.layers.3.mlp.down_proj")
    with compat.memit_identity_covariance(model, H()):
        assert torch.equal(memit.COV_CACHE[key], torch.eye(model.config.intermediate_size))
    assert key not in memit.COV_CACHE


def test_rome_and_memit_get_a_right_padding_tokenizer(easyeditor_module, embedded_model_dir):
    """BaseEditor keeps ROME/MEMIT on right padding (their lookup indices assume it); PreloadedModel pads left."""
    from easyedit_agrade.bench.methods import METHODS, load_hparams, make_editor
    from easyedit_agrade.lm import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(embedded_model_dir)
    for name, side in (("ROME", "right"), ("FT", "left"), ("MEMIT", "right")):
        editor = make_editor(load_hparams(METHODS[name]), model, tok, "smollm2-135m-instruct")
        assert editor.tok.padding_side == side, name
