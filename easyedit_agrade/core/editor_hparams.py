"""The fields and checks every hypernetwork editor's editing hyperparameters share (AGRADE, InstructEdit, …).

A method's ``<method>_hparams.py`` subclasses :class:`EditorHyperParams` (a dataclass), sets ``ALG_NAME`` and
``ARCHIVE_KEYS``, re-declares a shared field only to change its default (``alg_name``, ``batch_size``, …), adds its
own fields and extends :meth:`EditorHyperParams.__post_init__` with its own checks.

Nothing here knows EasyEdit's quirks: wrapping ``model_name`` so that ``BaseEditor`` accepts SmolLM2 and mapping
``device: 0`` to the CPU on upstream EasyEdit without CUDA are done by the integration layer when a ``BaseEditor``
is built (:func:`easyedit_agrade.integration.preloaded.adapt_hparams`), so a method folder moves upstream with
import changes only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional, Union

from ..hparams import HyperParamsError, ValidatedHyperParamsMixin, check_ranges, hyperparams_base

_Base = hyperparams_base()


@dataclass
class EditorHyperParams(ValidatedHyperParamsMixin, _Base):
    """Editing-time settings common to the hypernetwork editors (``hparams/<METHOD>/<model>.yaml``)."""

    #: the method's EasyEdit ``alg_name`` (the value ``alg_name`` must have)
    ALG_NAME: ClassVar[str] = ""
    #: fields that change the trained network or its meaning (checked against an archive's metadata)
    ARCHIVE_KEYS: ClassVar[tuple[str, ...]] = ("rank", "n_blocks", "inner_params")

    #: the embedded model alias or a local Hugging Face directory (an already-loaded model: a ``PreloadedModel``)
    model_name: str
    #: edited weights, e.g. ``model.layers.24.mlp.down_proj.weight``
    inner_params: List[str]
    alg_name: str = ""
    #: EasyEdit's device field: a CUDA index, or ``"cpu"``
    device: Union[int, str] = 0
    model_parallel: bool = False
    #: trained editor archive (.safetensors); None finds the shipped archive for this model under ``archives/``
    archive: Optional[str] = None
    #: edits combined into one ΔW (``BaseEditor.batch_edit`` chunks requests by this; so does the executor)
    batch_size: int = 1
    #: tokens of prompt + target; a longer request is an error (never cut)
    max_length: int = 40
    #: hypernetwork shape (must match the archive): rank of the low-rank blocks, number of blocks
    rank: int = 128
    n_blocks: int = 2
    #: edits per forward/backward when caching the edited modules' inputs and output gradients
    cache_batch_size: int = 16
    #: which positions' rows are cached: ``target`` (the positions predicting a target token: the paper's and
    #: MALMEN's choice) or ``target+subject`` (also each edit prompt's last subject token, where ROME/MEMIT place
    #: their edit; the loss stays on the targets). Part of what a network is trained for (archive-checked).
    key_positions: Literal["target", "target+subject"] = "target"
    editor_dtype: Literal["float32", "float64"] = "float32"
    #: refuse an edit (model untouched) whose ‖ΔW‖_F/‖W‖_F exceeds this in some module; None: off. A bound
    #: against blow-ups, not a quality gate; see ``core/edit_report.py``
    max_delta_ratio: Optional[float] = 10.0
    #: how ΔW enters the weights. ``auto``: the executor (whose weights_copy EasyEdit restores with
    #: ``param[...] = v``) writes round(w32 + ΔW) in place for every dtype; the evaluation loops (restored by
    #: ``restore_weights``) use an fp32 hook for bf16/fp16 weights. See ``core/weights.py``.
    apply_mode: Literal["auto", "inplace", "hook"] = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.rank < 1 or self.n_blocks < 0:
            raise HyperParamsError("rank must be >= 1 and n_blocks >= 0")
        if not self.inner_params:
            raise HyperParamsError("inner_params must name at least one weight")

    @property
    def torch_dtype(self):
        """``editor_dtype`` as a torch dtype (the dtype of the cached rows, the hypernetwork and ΔW)."""
        import torch

        return torch.float64 if self.editor_dtype == "float64" else torch.float32

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["model_name"] = str(self.model_name)  # a PreloadedModel (an already-loaded model) as its plain name
        return out


@dataclass(kw_only=True)
class EditorTrainingFields:
    """The training fields every hypernetwork trainer reads (``hparams/TRAINING/<METHOD>/<model>.yaml``).

    A method's training class lists this first among its bases, after its editing class's fields come these:
    ``class AGRADETrainingHyperParams(EditorTrainingFields, AGRADEHyperParams)``, declared
    ``@dataclass(kw_only=True)`` so that its own fields, all with defaults, may follow the editing class's
    required ``model_name`` / ``inner_params``. Fields re-declared there change the default."""

    #: edits per hypernetwork update
    n_edits: int = 1
    #: Adam learning rate of the network body
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    #: weights of the edit-prompt cross-entropy and the unrelated-prompt KL in the training loss
    edit_coef: float = 1.0
    loc_coef: float = 1.0
    max_steps: int = 1000
    val_every: int = 50
    checkpoint_every: int = 50
    seed: int = 0
    #: dtype of the frozen layers below the first edited one *during training* (bf16 is ~3x faster on CPU; the
    #: edited layers, the cached rows, ΔW and the hypernetwork stay in editor_dtype). Editing always uses the
    #: model's dtype
    train_lower_dtype: Optional[Literal["bfloat16", "float32"]] = None
    #: where checkpoints go (``--out`` overrides); the best network is exported to ``<out>/best.safetensors``
    results_dir: str = "runs/editor"
