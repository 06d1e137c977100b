"""EasyEdit's MEND trainer and executor on the embedded model, on the CPU: a tiny real training run whose exported
safetensors archive EasyEdit's MEND executor loads through ``hparams/MEND/smollm2-135m.yaml`` and edits with,
plus the shims of ``integration/mend_compat.py``."""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch

from easyedit_agrade.integration import mend_compat
from easyedit_agrade.integration.mend_training import (
    build_training_hparams,
    iterations_for,
    read_recipe,
    write_splits,
)
from easyedit_agrade.paths import REPO_ROOT, data_file

RECIPE = REPO_ROOT / "hparams" / "TRAINING" / "MEND" / "smollm2-135m.yaml"
EDIT_HPARAMS = REPO_ROOT / "hparams" / "MEND" / "smollm2-135m.yaml"
ZSRE_TRAIN = "zsre/zsre_mend_train_10000.json"

easyeditor = pytest.importorskip("easyeditor", reason="EasyEdit is not importable")


def _need_zsre():
    try:
        path = data_file(ZSRE_TRAIN)
    except FileNotFoundError:
        path = None
    if path is None or not Path(path).is_file():
        pytest.skip(f"shared data {ZSRE_TRAIN} not available")


# --- shims ------------------------------------------------------------------------------------------------------

def test_tagged_name_keeps_value_and_names_architecture():
    cfg = type("Cfg", (), {"model_type": "llama", "is_encoder_decoder": False})()
    name = mend_compat.mend_dispatch_name("/models/smollm2-135m-instruct-abc", cfg)
    assert str(name) == "/models/smollm2-135m-instruct-abc"
    assert name.split("/")[-1] == "smollm2-135m-instruct-abc"
    assert "llama" in name.lower() and "gpt" not in name.lower()
    assert copy.deepcopy(name) is name and copy.deepcopy(name).lower() == name.lower()
    # names EasyEdit already recognises and encoder-decoder models are left alone
    assert type(mend_compat.mend_dispatch_name("gpt2-xl", cfg)) is str
    t5 = type("Cfg", (), {"model_type": "t5", "is_encoder_decoder": True})()
    assert type(mend_compat.mend_dispatch_name("my-t5", t5)) is str
    # an unknown decoder-only family gets EasyEdit's (identical) llama branch
    qwen = type("Cfg", (), {"model_type": "qwen2", "is_encoder_decoder": False})()
    assert mend_compat.mend_dispatch_name("qwen", qwen).lower() == "qwen [llama]"


def test_module_list_full_slices_is_scoped_and_only_full_slices():
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    assert layers[:3] is not layers
    with mend_compat.module_list_full_slices():
        assert layers[:3] is layers and layers[0:] is layers and layers[:10] is layers
        part = layers[:2]
        assert part is not layers and list(part) == list(layers)[:2]
        assert layers[1] is list(layers)[1]
    assert layers[:3] is not layers


def test_allow_model_config_admits_only_that_class():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=32)
    buffer = io.BytesIO()
    torch.save({"model_config": cfg, "w": torch.ones(2)}, buffer)
    buffer.seek(0)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(buffer)
    buffer.seek(0)
    with mend_compat.allow_model_config(cfg):
        loaded = torch.load(buffer)
    assert loaded["model_config"] == cfg


def test_archive_roundtrip_and_refusals(tmp_path):
    from transformers import LlamaConfig

    state = {"edit_lrs": torch.tensor([1e-4, 2e-4]), "mend.x.weight": torch.randn(3, 2), "model_config": object()}
    path = mend_compat.save_mend_archive(state, tmp_path / "a.safetensors", inner_params=["p1", "p2"],
                                         metadata={"steps": 3})
    tensors, meta = mend_compat.read_mend_archive(path)
    assert set(tensors) == {"edit_lrs", "mend.x.weight"} and meta["steps"] == 3
    assert torch.equal(tensors["mend.x.weight"], state["mend.x.weight"])
    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=32)
    buffer = mend_compat.mend_archive_buffer(path, cfg, ["p1", "p2"])
    with mend_compat.allow_model_config(cfg):
        d = torch.load(buffer)
    assert d["model"]["model_config"] == cfg and torch.equal(d["model"]["edit_lrs"], state["edit_lrs"])
    with pytest.raises(ValueError, match="inner_params"):
        mend_compat.mend_archive_buffer(path, cfg, ["p1"])
    from easyedit_agrade.core.checkpoint import save_tensors

    save_tensors(tmp_path / "other.safetensors", {"w": torch.ones(1)}, {"format": "something-else"})
    with pytest.raises(ValueError, match="not a MEND archive"):
        mend_compat.read_mend_archive(tmp_path / "other.safetensors")
    assert mend_compat.resolve_archive_path("archives/x.safetensors") == REPO_ROOT / "archives" / "x.safetensors"


def test_iterations_for_matches_easyedit_loop():
    # BaseTrainer.run: epochs = round(max_iters / (n / bs)); steps taken = max_iters - 1 (within an epoch)
    for steps, n, bs in [(3, 9000, 1), (1000, 8991, 1), (7, 100, 4)]:
        n_train, max_iters = iterations_for(steps, n, bs)
        epochs = round(max_iters / (n_train / bs))
        taken = min(max_iters - 1, epochs * -(-n_train // bs))
        assert epochs == 1 and taken == steps
    assert iterations_for(20, 10, 1) == (10, 21)
    with pytest.raises(ValueError, match="whole number of epochs"):
        iterations_for(15, 10, 1)


def test_recipe_builds_easyedit_training_hparams(tmp_path):
    config, data = read_recipe(RECIPE)
    assert data == {"train_data": ZSRE_TRAIN, "train_range": [0, 9000], "val_range": [9000, 10000]}
    hparams = build_training_hparams(config, results_dir=tmp_path, max_steps=7)
    assert type(hparams).__name__ == "MENDTrainingHparams"
    assert hparams.max_iters == 7 and hparams.device == "cuda:0" and hparams.max_length == 40
    assert "llama" in hparams.model_name.lower() and Path(str(hparams.model_name), "config.json").is_file()
    import yaml

    edit = yaml.safe_load(EDIT_HPARAMS.read_text())
    for key in ("inner_params", "rank", "n_hidden", "hidden_dim", "init", "norm", "combine", "x_only",
                "delta_only", "act", "mlp_class", "shared", "one_sided"):
        assert getattr(hparams, key) == edit[key], key  # the executor builds the same network shape


def test_splits_are_disjoint_validation_is_9000_to_9999(tmp_path):
    _need_zsre()
    config, data = read_recipe(RECIPE)
    splits = write_splits(data, tmp_path, seed=0)
    assert sorted(splits["train_order"]) == list(range(9000)) and splits["train_order"] != list(range(9000))
    assert splits["val_range"] == [9000, 10000]
    raw = json.loads(data_file(ZSRE_TRAIN).read_text())
    assert json.loads(splits["val_path"].read_text()) == raw[9000:10000]
    with pytest.raises(ValueError, match="disjoint"):
        write_splits({**data, "val_range": [8000, 9500]}, tmp_path / "bad", seed=0)


# --- the real trainer, then the real executor --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    _need_zsre()
    from easyedit_agrade.integration.mend_training import train_mend

    out = tmp_path_factory.mktemp("mend-run")
    report = train_mend(RECIPE, out, max_steps=2, val_records=5, val_steps=1,
                        overrides={"val_interval": 2, "log_interval": 1, "accumulate_bs": 1})
    return out, report


@pytest.mark.slow
def test_tiny_training_run_exports_a_validated_archive(tiny_run):
    out, report = tiny_run
    archive = Path(report["archive"])
    assert archive.is_file() and (out / "results.json").is_file() and (out / "report.json").is_file()
    tensors, meta = mend_compat.read_mend_archive(archive)
    assert meta["steps"] == 2 and meta["best_step"] == 2 and meta["batch_size"] == 1
    assert meta["inner_params"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (27, 28, 29)]
    assert "loss/total_edit_val" in meta["best_val_stats"] and "edit/acc_val" in meta["final_val_stats"]
    assert "edit_lrs" in tensors and not any(k.startswith("model.") for k in tensors)
    # two Adam steps (accumulate_bs 1) moved the learned edit lrs away from edit_lr
    assert not torch.allclose(tensors["edit_lrs"], torch.full_like(tensors["edit_lrs"], 1e-4))


@pytest.mark.slow
def test_export_of_easyedit_checkpoint_equals_the_run_archive(tiny_run, tmp_path):
    from easyedit_agrade.integration.mend_training import main

    out, report = tiny_run
    assert main([str(RECIPE), "--export", report["checkpoint"], "--out", str(tmp_path / "e.safetensors")]) == 0
    exported, meta = mend_compat.read_mend_archive(tmp_path / "e.safetensors")
    shipped, _ = mend_compat.read_mend_archive(report["archive"])
    assert exported.keys() == shipped.keys() and all(torch.equal(exported[k], shipped[k]) for k in shipped)
    assert meta["best_step"] == 2 and meta["exported_from"] == Path(report["checkpoint"]).name


@pytest.mark.slow
def test_easyedit_mend_executor_edits_with_the_archive(tiny_run):
    from easyedit_agrade.integration.baselines import load_easyedit_hparams
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu
    from easyedit_agrade.integration.easyedit import register
    from easyedit_agrade.lm import load_model_and_tokenizer

    _, report = tiny_run
    register()
    import importlib

    apply_mend = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT["MEND"]  # what BaseEditor calls

    model, tok = load_model_and_tokenizer()
    hparams = load_easyedit_hparams(EDIT_HPARAMS, model=model, tok=tok)
    hparams.archive = report["archive"]
    name_before = hparams.model_name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    requests = [{"prompt": "The capital of France is", "target_new": "Rome"},
                {"prompt": "The Eiffel Tower is located in", "target_new": "Berlin"}]
    with cuda_on_cpu():
        edited, weights_copy = apply_mend(
            model, tok, requests, hparams, copy=False, return_orig_weights=True, keep_original_weight=True)
    assert hparams.model_name is name_before  # the caller's hparams are not modified
    inner = set(hparams.inner_params)
    assert set(weights_copy) == inner
    after = dict(edited.named_parameters())
    for n in inner:
        assert not torch.equal(after[n].detach(), before[n]), n
    assert all(torch.equal(after[n].detach(), before[n]) for n in before if n not in inner)
    with torch.no_grad():
        for n, w in weights_copy.items():
            after[n].copy_(w)
    assert all(torch.equal(p.detach(), before[n]) for n, p in edited.named_parameters())
    apply_mend.__self__.reset_model()  # EasyEdit's executor is a process-wide singleton holding the model


def test_patched_executor_rebinds_alg_dict_and_reinitialises_per_model():
    calls = []

    class FakeExecutor:  # the shape of EasyEdit's MendRewriteExecutor
        def __init__(self):
            self.is_init = False

        def init_model(self, model, tok, params):
            calls.append(("init", model.name, params.model_name.lower()))
            self.model, self.is_init = model, True

        def reset_model(self):
            calls.append(("reset",))
            self.is_init = False

        def apply_to_model(self, model, tok, requests, hparams, **kwargs):
            if not self.is_init:
                self.init_model(model, tok, hparams)
            calls.append(("apply", self.model.name, hparams.model_name.lower()))
            return self.model, {}

    cfg = type("Cfg", (), {"model_type": "llama", "is_encoder_decoder": False})()
    m1 = type("M", (), {"name": "m1", "config": cfg})()
    m2 = type("M", (), {"name": "m2", "config": cfg})()
    hp = type("HP", (), {})()
    hp.model_name, hp.archive = "smollm2-135m-instruct", None
    alg_dict = {"MEND": FakeExecutor().apply_to_model}
    mend_compat.patch_mend_executor(FakeExecutor)
    mend_compat.patch_mend_executor(FakeExecutor)  # idempotent
    mend_compat.rebind_mend_entry(alg_dict, FakeExecutor)
    alg_dict["MEND"](m1, None, [], hp)
    alg_dict["MEND"](m1, None, [], hp)
    alg_dict["MEND"](m2, None, [], hp)
    tagged = "smollm2-135m-instruct [llama]"
    assert calls == [("init", "m1", tagged), ("apply", "m1", tagged), ("apply", "m1", tagged),
                     ("reset",), ("init", "m2", tagged), ("apply", "m2", tagged)]
    assert hp.model_name == "smollm2-135m-instruct" and type(hp.model_name) is str
