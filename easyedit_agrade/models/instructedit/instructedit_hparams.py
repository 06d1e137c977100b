"""Hyperparameters of InstructEdit — EasyEdit's ``models/<method>/<method>_hparams.py`` layout.

* :class:`InstructEditHyperParams` — editing (``hparams/InstructEdit/<model>.yaml``), used by ``BaseEditor``.
* :class:`InstructEditTrainingHyperParams` — training (``hparams/TRAINING/InstructEdit/<model>.yaml``), used by
  :class:`~easyedit_agrade.models.instructedit.instructedit_trainer.InstructEditTrainer`.

``use_instruction: false`` turns InstructEdit into multi-task MEND (same code, prompts never wrapped).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional, Union

from ...hparams import HyperParamsError, ValidatedHyperParamsMixin, check_ranges, hyperparams_base

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
    #: edits combined into one ΔW (``BaseEditor.batch_edit`` chunks by this; ``edit`` forces 1)
    batch_size: int = 1
    max_length: int = 96
    #: hypernetwork shape (must match the archive): rank of the low-rank blocks, number of blocks
    rank: int = 128
    n_blocks: int = 2
    #: initial per-module edit learning rate (ΔW = −lr · ũᵀδ̃, learned during training)
    edit_lr: float = 1e-4
    #: wrap edit, paraphrase and portability prompts as ``Task: …\nDescription: …\nInput: …``
    use_instruction: bool = True
    #: task used for the instruction when a prompt is not yet wrapped and the request names no ``task``
    task: Optional[str] = None
    #: which description of the task to use at edit time (index 9 is the held-out, unseen instruction)
    instruction_index: int = 0
    #: JSON file of task descriptions; None uses the InstructEdit descriptions under the shared data folder
    instructions_path: Optional[str] = None
    #: edits per forward/backward when caching u and δ
    cache_batch_size: int = 16
    editor_dtype: Literal["float32", "float64"] = "float32"
    #: refuse an edit (model untouched) whose ‖ΔW‖_F/‖W‖_F exceeds this in some module; None: off. Measured with
    #: the shipped archive on the embedded model: single CounterFact/zsRE edits 0.04–0.15, 8 in one ΔW 0.36–0.40.
    #: A bound against blow-ups, not a quality gate; see ``core/edit_report.py``
    max_delta_ratio: Optional[float] = 10.0
    #: how ΔW enters the weights. ``auto``: the executor (whose weights_copy EasyEdit restores with
    #: ``param[...] = v``) writes round(w32 + ΔW) in place for every dtype; the evaluation loops (restored by
    #: ``restore_weights``) use an fp32 hook for bf16/fp16 weights. See ``core/weights.py``.
    apply_mode: Literal["auto", "inplace", "hook"] = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ranges(self)
        from ...integration.device import resolve_device

        self.device = resolve_device(self.device)  # device: 0 without CUDA on upstream EasyEdit -> "cpu"
        if self.rank < 1 or self.n_blocks < 0:
            raise HyperParamsError("rank must be >= 1 and n_blocks >= 0")
        if not self.inner_params:
            raise HyperParamsError("inner_params must name at least one weight")
        if self.instruction_index < 0:
            raise HyperParamsError("instruction_index must be >= 0")
        # Same as AGRADE: EasyEdit 0.0.1.dev0 cannot load SmolLM2 by name; a PreloadedModel name makes BaseEditor
        # take its "(model, tokenizer) given" branch (easyedit_agrade.integration.preloaded).
        if type(self.model_name) is str:
            from ...integration.preloaded import PreloadedModel

            self.model_name = PreloadedModel(self.model_name)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["model_name"] = str(self.model_name)
        return out

    #: fields that change the trained network or its meaning (checked against an archive's metadata)
    ARCHIVE_KEYS: ClassVar[tuple[str, ...]] = ("rank", "n_blocks", "inner_params", "use_instruction")


@dataclass
class InstructEditTrainingHyperParams(InstructEditHyperParams):
    """Training settings (``hparams/TRAINING/InstructEdit/<model>.yaml``): the editing fields plus these."""

    #: training tasks (zsRE is the held-out task and may not be listed)
    tasks: List[str] = field(default_factory=lambda: ["counterfact", "wikirecent", "convsent"])
    #: balance task proportions (the paper's Finding 3): each task equally likely (or ``task_weights``)
    balance: bool = True
    task_weights: Optional[dict] = None
    #: keep at most this many training records per task (seeded subset; None: all)
    max_train_per_task: Optional[int] = None
    #: WikiRecent has one file: this many records (seeded) are kept out of training for testing
    recent_test_size: int = 100
    #: validation records per task (taken from the test files' tail, disjoint from the Table-3 test slice)
    val_per_task: int = 8
    #: edits per hypernetwork update (applied as one ΔW), and updates accumulated per optimizer step
    n_edits: int = 1
    accumulate: int = 2
    #: Adam learning rates: network body and the per-module edit lr
    lr: float = 1e-4
    lr_lr: float = 1e-4
    max_grad_norm: float = 1.0
    #: L = edit_coef·CE(equivalent prompts) + edit_coef·CE(edit prompt)·inner_coef + loc_coef·KL(unrelated)
    edit_coef: float = 1.0
    inner_coef: float = 0.5
    loc_coef: float = 1.0
    max_steps: int = 1000
    #: stop cleanly (with a checkpoint) once this much training wall time is spent (None: no limit)
    max_wall_s: Optional[float] = None
    val_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0
    #: dtype of the frozen layers below the first edited one during training (bf16 is much faster on CPU)
    train_lower_dtype: Optional[Literal["bfloat16", "float32"]] = None
    results_dir: str = "runs/instructedit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if "zsre" in self.tasks:
            raise HyperParamsError("zsre is InstructEdit's held-out task; remove it from `tasks`")
        unknown = set(self.tasks) - {"counterfact", "wikirecent", "convsent"}
        if unknown or not self.tasks:
            raise HyperParamsError(f"tasks must be a non-empty subset of counterfact, wikirecent, convsent; got "
                                   f"{self.tasks}")
        if self.n_edits < 1 or self.accumulate < 1:
            raise HyperParamsError("n_edits and accumulate must be >= 1")
