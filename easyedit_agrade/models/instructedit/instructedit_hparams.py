"""Hyperparameters of InstructEdit (editing) — EasyEdit's ``<method>_hparams.py`` layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional, Union

from ...hparams import ValidatedHyperParamsMixin, hyperparams_base

_Base = hyperparams_base()


@dataclass
class InstructEditHyperParams(ValidatedHyperParamsMixin, _Base):
    """Editing-time settings of InstructEdit (a MEND-architecture editor with instruction-wrapped prompts)."""

    ALG_NAME: ClassVar[str] = "InstructEdit"

    model_name: str
    inner_params: List[str]
    alg_name: str = "InstructEdit"
    device: Union[int, str] = 0
    model_parallel: bool = False
    #: trained editor archive (.safetensors); None finds the shipped archive for this model under ``archives/``
    archive: Optional[str] = None
    batch_size: int = 1
    max_length: int = 96
    rank: int = 1920
    n_blocks: int = 2
    #: initial per-module edit learning rate (ΔW = lr · δ̃ ũᵀ)
    edit_lr: float = 1e-4
    #: wrap edit, paraphrase and portability prompts as ``Task: …\nDescription: …\nInput: …``
    use_instruction: bool = True
    #: task name used for the instruction when a request does not carry one (counterfact, wikirecent, convsent, zsre)
    task: Optional[str] = None
    #: which description of the task to use at edit time (index 9 is the held-out, unseen instruction)
    instruction_index: int = 0
    #: JSON file of task descriptions; None uses the InstructEdit descriptions under the shared data folder
    instructions_path: Optional[str] = None
    editor_dtype: Literal["float32", "float64"] = "float32"
    extra: dict = field(default_factory=dict)
