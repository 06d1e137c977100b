"""Shared fixtures: the embedded model (loaded once per session), the shared data folder, EasyEdit."""
from __future__ import annotations

import os

# Triton decides at import time whether to interpret kernels; set this before anything imports triton so the
# kernel tests run in-process on the CPU (only Triton kernels are affected; CPU code paths use torch ops).
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from easyedit_agrade.paths import data_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """The shared datasets folder; tests that need it skip with a clear message when it is absent."""
    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set EASYEDIT_AGRADE_SHARED)")
    return path


@pytest.fixture(scope="session")
def easyeditor_module():
    if importlib.util.find_spec("easyeditor") is None:
        pytest.skip("EasyEdit (easyeditor) is not installed")
    import easyeditor

    from easyedit_agrade.integration.easyedit import register

    register()
    return easyeditor


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The converted embedded SmolLM2 directory (converted on first use, then cached)."""
    from easyedit_agrade.lm import EmbeddedModelError, ensure_embedded_model

    try:
        return ensure_embedded_model()
    except EmbeddedModelError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def embedded_model(embedded_model_dir):
    """(model, tokenizer) of the embedded model, fp32, CPU, eval mode. Tests must restore any weight they change."""
    from easyedit_agrade.lm import load_model_and_tokenizer

    return load_model_and_tokenizer(embedded_model_dir)
