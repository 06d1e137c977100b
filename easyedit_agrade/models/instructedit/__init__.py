"""InstructEdit: one instruction-conditioned (MEND-architecture) editor for many editing tasks.

Laid out like EasyEdit's ``easyeditor/models/<method>/``: ``instructedit_hparams.py``, ``instructedit_main.py``
(executor), ``instructedit_trainer.py`` (trainer, ``train_main``), ``editor.py`` (the edit: eq. 3 and MEND's
update), ``instructions.py`` (instructions as data, ``wrap_requests``), ``multitask.py`` (task readers, balanced
sampling), ``instructedit_eval.py`` (metrics), ``archive.py``; the Figure-4 picture is a face
(``easyedit_agrade.tools.instructedit_editing_area``).
Imports are lazy so that importing the package stays cheap.
"""
from __future__ import annotations

from typing import Any

from .instructedit_hparams import InstructEditHyperParams, InstructEditTrainingHyperParams
from .instructions import InstructionSet, load_instructions, wrap_edit_inputs, wrap_requests

__all__ = ["InstructEditHyperParams", "InstructEditTrainingHyperParams", "InstructionSet", "load_instructions",
           "wrap_requests", "wrap_edit_inputs", "apply_instructedit_to_model", "InstructEditTrainer", "train_main"]


def __getattr__(name: str) -> Any:
    if name == "apply_instructedit_to_model":
        from .instructedit_main import apply_instructedit_to_model

        return apply_instructedit_to_model
    if name in ("InstructEditTrainer", "train_main"):
        from . import instructedit_trainer

        return getattr(instructedit_trainer, name)
    raise AttributeError(name)
