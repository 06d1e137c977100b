"""Hyperparameters of InstructEdit — EasyEdit's ``models/<method>/<method>_hparams.py`` layout.

* :class:`InstructEditHyperParams` — editing (``hparams/InstructEdit/<model>.yaml``), used by ``BaseEditor``.
* :class:`InstructEditTrainingHyperParams` — training (``hparams/TRAINING/InstructEdit/<model>.yaml``), used by
  :class:`~easyedit_agrade.models.instructedit.instructedit_trainer.InstructEditTrainer`.

``use_instruction: false`` turns InstructEdit into multi-task MEND (same code, prompts never wrapped).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from ...core.editor_hparams import EditorHyperParams, EditorTrainingFields
from ...hparams import HyperParamsError


@dataclass
class InstructEditHyperParams(EditorHyperParams):
    """InstructEdit at edit time: a MEND-architecture editor whose prompts are wrapped in task instructions.
    The base class :class:`~easyedit_agrade.core.editor_hparams.EditorHyperParams` holds the shared fields;
    a field re-declared here only changes its default."""

    ALG_NAME: ClassVar[str] = "InstructEdit"
    #: fields that change the trained network or its meaning (checked against an archive's metadata)
    ARCHIVE_KEYS: ClassVar[tuple[str, ...]] = ("rank", "n_blocks", "inner_params", "use_instruction")

    alg_name: str = "InstructEdit"
    #: edits combined into one ΔW (``BaseEditor.batch_edit`` chunks by this; ``edit`` forces 1)
    batch_size: int = 1
    max_length: int = 96
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
    # max_delta_ratio (a shared field, default 10), measured with the shipped archive on the embedded model:
    # single CounterFact/zsRE edits 0.04–0.15, 8 in one ΔW 0.36–0.40

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.instruction_index < 0:
            raise HyperParamsError("instruction_index must be >= 0")


@dataclass(kw_only=True)
class InstructEditTrainingHyperParams(EditorTrainingFields, InstructEditHyperParams):
    """Training settings (``hparams/TRAINING/InstructEdit/<model>.yaml``): the editing fields, the shared training
    fields (:class:`~easyedit_agrade.core.editor_hparams.EditorTrainingFields`: ``n_edits`` — edits per
    hypernetwork update, applied as one ΔW —, ``lr``, ``max_grad_norm``, ``edit_coef``, ``loc_coef``,
    ``max_steps``, ``checkpoint_every``, ``seed``, ``train_lower_dtype``, …) plus these."""

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
    #: updates (of ``n_edits`` each) accumulated per optimizer step
    accumulate: int = 2
    #: Adam learning rate of the per-module edit lr (the body's: ``lr``)
    lr_lr: float = 1e-4
    #: L = edit_coef·CE(equivalent prompts) + edit_coef·CE(edit prompt)·inner_coef + loc_coef·KL(unrelated)
    inner_coef: float = 0.5
    #: stop cleanly (with a checkpoint) once this much training wall time is spent (None: no limit)
    max_wall_s: Optional[float] = None
    val_every: int = 100
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
