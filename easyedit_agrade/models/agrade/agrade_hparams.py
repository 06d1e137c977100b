"""Hyperparameters of AGRADE (editing) — EasyEdit's ``models/<method>/<method>_hparams.py`` layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional, Union

from ...hparams import ValidatedHyperParamsMixin, hyperparams_base

_Base = hyperparams_base()


@dataclass
class AGRADEHyperParams(ValidatedHyperParamsMixin, _Base):
    """Editing-time settings of AGRADE. ``from_hparams('hparams/AGRADE/smollm2-135m')`` loads the YAML."""

    ALG_NAME: ClassVar[str] = "AGRADE"

    model_name: str
    #: edited weights (the second FFN linear of the last 6 layers), e.g. ``model.layers.24.mlp.down_proj.weight``
    inner_params: List[str]
    alg_name: str = "AGRADE"
    #: EasyEdit's device field: a CUDA index, or ``"cpu"``
    device: Union[int, str] = 0
    model_parallel: bool = False
    #: trained hypernetwork (.safetensors); None finds the shipped archive for this model under ``archives/``
    archive: Optional[str] = None
    #: edits applied in one solve (``BaseEditor.batch_edit`` chunks requests by this)
    batch_size: int = 256
    max_length: int = 40
    #: hypernetwork shape (must match the archive)
    rank: int = 256
    n_blocks: int = 2
    #: initial per-module η (eq 1) and log-regulariser λ (eq 3) before training
    eta_init: float = 1e-3
    log_lambda_init: float = 0.0
    #: method switches, the ablations of the paper's Table 2; ``preset: malmen`` turns the AGRADE parts off
    preset: Literal["agrade", "malmen"] = "agrade"
    use_adjustment: bool = True
    use_regularization: bool = True
    use_weight_projection: bool = True
    use_gradient_projection: bool = True
    #: solver path: ``auto`` picks the T×T dual form when fewer target tokens than input width
    solver: Literal["auto", "primal", "dual"] = "auto"
    #: edits per forward/backward when caching H and ∇G
    cache_batch_size: int = 64
    editor_dtype: Literal["float32", "float64"] = "float32"
    kernels_backend: Optional[Literal["auto", "torch", "triton"]] = None
    extra: dict = field(default_factory=dict)
