"""InstructEdit: instruction-based multi-task editor (hparams, executor, trainer)."""
from .instructedit_hparams import InstructEditHyperParams

__all__ = ["InstructEditHyperParams"]
