"""Shared fixtures: the embedded model (loaded once per session), the shared data folder, EasyEdit."""
from __future__ import annotations

import importlib.util

import pytest

from easyedit_agrade.paths import data_dir


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
