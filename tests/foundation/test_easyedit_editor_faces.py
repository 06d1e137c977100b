"""``integration.easyedit_editor``: what the demo and the bench use of EasyEdit's ``BaseEditor`` module."""
from __future__ import annotations

import pytest


class _Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k


def test_counting_edit_evaluations_ticks_each_call_and_restores(easyeditor_module, monkeypatch):
    from easyedit_agrade.integration.easyedit_editor import counting_edit_evaluations, editor_module

    module = editor_module()
    calls = []

    def quality(*args, **kwargs):
        calls.append((args, kwargs))
        if kwargs.get("fail"):
            raise RuntimeError("evaluation failed")
        return {"rewrite_acc": [1.0]}

    monkeypatch.setattr(module, "compute_edit_quality", quality)
    bar = _Bar()
    with counting_edit_evaluations(bar):
        assert module.compute_edit_quality is not quality
        assert module.compute_edit_quality("model", k=1) == {"rewrite_acc": [1.0]}
        with pytest.raises(RuntimeError, match="evaluation failed"):
            module.compute_edit_quality(fail=True)
    assert bar.n == 2 and len(calls) == 2
    assert calls[0] == (("model",), {"k": 1})
    assert module.compute_edit_quality is quality  # restored


def test_editor_module_defines_base_editor(easyeditor_module):
    from easyedit_agrade.integration.easyedit_editor import editor_module

    assert editor_module().BaseEditor is easyeditor_module.BaseEditor
