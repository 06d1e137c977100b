"""Hyperparameters of AGRADE — EasyEdit's ``models/<method>/<method>_hparams.py`` layout.

* :class:`AGRADEHyperParams` — editing (``hparams/AGRADE/<model>.yaml``), used by ``BaseEditor``.
* :class:`AGRADETrainingHyperParams` — training (``hparams/TRAINING/AGRADE/<model>.yaml``), used by
  :class:`~easyedit_agrade.models.agrade.agrade_trainer.AGRADETrainer`.

Method switches (the ablations of the paper's Table 2) and the ``malmen`` preset are resolved by
:meth:`AGRADEHyperParams.switches`: ``preset: malmen`` turns off eq 4 (the only part of AGRADE that MALMEN's
reference implementation does not already have: MALMEN also scales by c = −η⟨H, H̃⟩, solves the same ridge system
and trains on P = H M⁻¹ g_θ; see docs/agrade.md).
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, List, Literal, Optional, Union

from ...core.editor_hparams import EditorHyperParams, EditorTrainingFields
from ...hparams import HyperParamsError


@dataclass(frozen=True)
class Switches:
    """The resolved method switches (after applying the preset)."""

    adjustment: bool  # eqs 1–2: G = c ⊙ ∇G̃ (off: G = ∇G̃)
    regularization: bool  # eq 3: + e^λ I (off: M = HᵀH, minimum-norm solve)
    weight_projection: bool  # eq 4 against the previous module's G
    gradient_projection: bool  # eq 6: P = H M⁻¹ g_θ (off: P = H g_θ)


@dataclass
class AGRADEHyperParams(EditorHyperParams):
    """Editing-time settings of AGRADE; ``from_hparams('hparams/AGRADE/smollm2-135m')`` loads the YAML. Fields
    not declared here (model, modules, archive, network shape, dtype, guards) come from
    :class:`~easyedit_agrade.core.editor_hparams.EditorHyperParams`."""

    ALG_NAME: ClassVar[str] = "AGRADE"

    alg_name: str = "AGRADE"
    #: edits applied in one solve (``BaseEditor.batch_edit`` chunks requests by this; so does the executor)
    batch_size: int = 256
    max_length: int = 40
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
    #: write cached H/∇G rows to safetensors shards in a private temp folder (under ``cache_spill_dir`` or the
    #: system temp dir; deleted afterwards) instead of memory: editor memory then does not grow with the edits
    cache_spill: bool = False
    cache_spill_dir: Optional[str] = None
    kernels_backend: Optional[Literal["auto", "torch", "triton"]] = None
    #: target positions whose edited-module input row is longer than this many times the median row (massive
    #: activations of attention-sink tokens) get G = 0 in that module; None: off. See ``models/agrade/outliers.py``
    max_key_norm_ratio: Optional[float] = 4.0
    #: when editing (frozen normaliser), target positions whose key or output-gradient row has a root-mean-square
    #: z-score above this under the hypernetwork's input normaliser (far outside its training edits) get G = 0;
    #: None: off. See ``models/agrade/outliers.py``
    max_row_zscore: Optional[float] = 5.0
    #: added to every module's learned log λ (eq 3) when editing, not in training: e^offset times the ridge, for
    #: batches far larger than or unlike the training edits (0: the learned λ). See docs/agrade.md
    log_lambda_offset: float = 0.0
    #: preserved-knowledge term of eq 3 (docs/agrade.md, *Preserved knowledge*): M = HᵀH + e^λ I + e^μ C₀ with
    #: C₀ = E[k kᵀ] of the module's input keys over ``preserved_corpus``; μ is learned per module like λ
    #: (``log_mu_init`` before training, and for archives trained without the term); ``log_mu_offset`` is added
    #: when editing, like ``log_lambda_offset``. Off: the paper's eq 3, bit-identical
    use_preserved_cov: bool = False
    log_mu_init: float = 0.0
    log_mu_offset: float = 0.0
    #: AlphaEdit-style: confine ΔW to the null space of C₀'s dominant subspace — the eigenvectors of C₀ with
    #: eigenvalue ≤ ``null_space_threshold`` × the largest (keys of ordinary text then see ~no change)
    null_space: bool = False
    null_space_threshold: float = 1e-2
    #: statistics for C₀: corpus (relative to the shared data folder, or a path; never the perplexity text),
    #: token budget and window; cached as safetensors under ``preserved_stats_dir`` (default: the user cache)
    preserved_corpus: str = "wikitext/wiki.valid.tokens"
    preserved_tokens: int = 100_000
    preserved_window: int = 256
    preserved_stats_dir: Optional[str] = None
    #: question-style preserved keys (:mod:`.preserved_records`): a pool of records (``path[@start:stop]``, the
    #: training pool syntax; never validation records) whose prompts with their true answers are a second
    #: statistics text; C₀ = (1 − w)·C₀(corpus) + w·C₀(records) with w = ``preserved_records_weight`` (None or
    #: w = 0: the corpus alone, bit-identical)
    preserved_records: Optional[str] = None
    preserved_records_weight: float = 0.5
    #: refuse a batch whose ΔW would change an edited module's output on ordinary-text keys by more than this,
    #: E‖kΔW‖²/E‖kW‖² = tr(ΔWᵀC₀ΔW)/tr(WᵀC₀W) (needs the key statistics; None: no check)
    max_preserved_change: Optional[float] = None
    #: when editing with the e^μ C₀ term: raise log μ per module in steps of 1 until that predicted output change
    #: is at most this (a batch-size-aware μ; None: the learned μ + log_mu_offset as they are)
    preserved_change_budget: Optional[float] = None
    #: solves per batch when editing (1: the paper's one-shot edit). Round r > 1 caches H and ∇G again on the model
    #: with the earlier rounds' ΔW applied (the residual of the edit) and solves again; the batch's ΔW is the sum.
    #: A round is skipped once the edit prompts' target-token accuracy, measured by its own cache pass, reaches
    #: ``rounds_stop_accuracy`` (None: always ``edit_rounds``). ``preserved_change_budget`` bounds the summed ΔW,
    #: so more rounds never buy a larger change on ordinary text than one round may make. Not used in training
    edit_rounds: int = 1
    rounds_stop_accuracy: Optional[float] = 0.9
    #: the perplexity guard (docs/agrade.md, *Perplexity guard*): the editor measures the model's perplexity on
    #: ``heldout_windows`` windows of ``preserved_window`` tokens of the statistics corpus that C₀ does not use (the
    #: ones after its first ``preserved_tokens``; never the perplexity test text) when it first edits — the
    #: reference — and after each round's ΔW; a round that would take it above ``max_heldout_ppl_ratio`` × the
    #: reference is scaled by the largest step that keeps it within (``heldout_search_steps`` bisection steps, 0 =
    #: not applied), no later round is solved, and a warning says so. The executor's reference is the model as the
    #: call got it, so the bound holds for all chunks of a call together. None: off (nothing is measured)
    max_heldout_ppl_ratio: Optional[float] = None
    heldout_windows: int = 16
    heldout_search_steps: int = 5
    #: where eq 5's G comes from when editing: ``hypernet`` (the paper: the trained network's one-shot G) or
    #: ``optimized`` — MEMIT's values, optimised for every request of the batch at edit time (δ at the last edited
    #: layer's output, subject's last token; ``value_steps`` Adam steps of ``value_lr``, weight decay
    #: ``value_weight_decay``·‖δ‖²/‖h‖², ‖δ‖ ≤ ``value_clamp``·‖h‖, a request stops at mean target NLL
    #: ``value_stop_nll``; over its prompt and ``value_prefixes`` context-prefixed copies), then spread over the
    #: edited modules with ΔW = (KᵀK + λ·C₀)⁻¹KᵀR on the subjects' keys — λ = ``value_preserved_keys`` (a constant
    #: count of ordinary-text keys, MEMIT's ``mom2_update_weight``) or ``value_preserved_weight``·n for n edits,
    #: or min(w·n, keys) when both are set (at least one is) — in
    #: ``value_sweeps`` passes over the modules (each later pass re-solves a module for its own change plus its share
    #: of what is still unmet). No archive is used. models/agrade/values.py, docs/agrade.md *Value-optimised edits*
    value_source: Literal["hypernet", "optimized"] = "hypernet"
    value_steps: int = 25
    value_lr: float = 0.5
    value_weight_decay: float = 1e-3
    value_clamp: float = 4.0
    value_stop_nll: float = 0.05
    value_prefixes: int = 2
    value_preserved_weight: Optional[float] = 10.0
    value_preserved_keys: Optional[float] = None
    value_sweeps: int = 1
    #: with ``value_source: optimized``: a second edit of the same batch by a trained network — the AGRADE hparams
    #: file named here (``.yaml`` optional; a relative path is resolved against the folder of the YAML that names
    #: it), with its own modules, archive and guards — computed on the model with the value ΔW added and its η
    #: (eq 1) times ``network_stage_eta_factor``. The batch's ΔW is the sum of both; the network places much of
    #: what the value solve leaves unmet at thousands of edits (docs/agrade_scaling.md, *Value edit, then the
    #: network*). None: the value edit alone
    network_stage: Optional[str] = None
    network_stage_eta_factor: float = 1.0
    #: every module's η of eq 1 times this when editing (a smaller or larger step than the archive's learned η for
    #: batches unlike the training edits; not used in training). 1: the learned η, bit-identical
    eta_factor: float = 1.0
    # max_delta_ratio (a shared field, default 10): the largest module ratio measured with the shipped archive on
    # the embedded model: 1 CounterFact edit 0.02–0.12, 16: 0.18, 256: 1.0, zsRE 256: 2.9, CounterFact 1,024: 4.7
    # (the largest documented batch; bench pool 512, which collapses the model, 5.6)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_key_norm_ratio is not None and not self.max_key_norm_ratio > 1:
            raise HyperParamsError("max_key_norm_ratio must be > 1 (or null to turn the check off)")
        if self.max_row_zscore is not None and not self.max_row_zscore > 0:
            raise HyperParamsError("max_row_zscore must be > 0 (or null to turn the check off)")
        for key in ("log_mu_init", "log_mu_offset"):
            if not math.isfinite(float(getattr(self, key))):
                raise HyperParamsError(f"{key} must be a finite number")
        if self.null_space and not 0 < float(self.null_space_threshold) < 1:
            raise HyperParamsError("null_space_threshold must be in (0, 1) (a fraction of C0's largest eigenvalue)")
        if self.uses_preserved_keys() and not self.use_regularization:
            raise HyperParamsError("use_preserved_cov / null_space need use_regularization: true (eq 3's ridge)")
        if self.preserved_change_budget is not None and not (self.use_preserved_cov
                                                             and self.preserved_change_budget > 0):
            raise HyperParamsError("preserved_change_budget must be > 0 and needs use_preserved_cov: true")
        if isinstance(self.edit_rounds, bool) or not isinstance(self.edit_rounds, int) or self.edit_rounds < 1:
            raise HyperParamsError(f"edit_rounds must be an integer >= 1, got {self.edit_rounds!r}")
        if self.rounds_stop_accuracy is not None and not 0 < float(self.rounds_stop_accuracy) <= 1:
            raise HyperParamsError("rounds_stop_accuracy must be in (0, 1] (or null: always run edit_rounds rounds)")
        if self.max_heldout_ppl_ratio is not None and not float(self.max_heldout_ppl_ratio) > 1:
            raise HyperParamsError("max_heldout_ppl_ratio must be > 1 (a perplexity ratio; or null to turn the guard off)")
        if isinstance(self.heldout_windows, bool) or not isinstance(self.heldout_windows, int) or self.heldout_windows < 1:
            raise HyperParamsError(f"heldout_windows must be an integer >= 1, got {self.heldout_windows!r}")
        if (isinstance(self.heldout_search_steps, bool) or not isinstance(self.heldout_search_steps, int)
                or not 0 <= self.heldout_search_steps <= 20):
            raise HyperParamsError(f"heldout_search_steps must be an integer in [0, 20], got {self.heldout_search_steps!r}")
        if self.value_source not in ("hypernet", "optimized"):
            raise HyperParamsError(f"value_source must be 'hypernet' or 'optimized', got {self.value_source!r}")
        for key, least in (("value_steps", 1), ("value_prefixes", 0), ("value_sweeps", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise HyperParamsError(f"{key} must be an integer >= {least}, got {v!r}")
        for key in ("value_lr", "value_clamp", "value_stop_nll", "value_preserved_weight", "value_preserved_keys"):
            v = getattr(self, key)
            if key.startswith("value_preserved") and v is None:
                continue
            try:
                ok = not isinstance(v, bool) and math.isfinite(float(v)) and float(v) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise HyperParamsError(f"{key} must be a finite number > 0, got {v!r}")
        if self.value_preserved_weight is None and self.value_preserved_keys is None:
            raise HyperParamsError("set value_preserved_weight (C0's weight per edit: w*n), value_preserved_keys (a "
                                   "constant weight, MEMIT's mom2_update_weight) or both (min(w*n, keys)); both are "
                                   "null")
        if not (math.isfinite(float(self.value_weight_decay)) and float(self.value_weight_decay) >= 0):
            raise HyperParamsError(f"value_weight_decay must be a finite number >= 0, got {self.value_weight_decay!r}")
        if self.value_source == "optimized" and (self.edit_rounds != 1 or self.max_heldout_ppl_ratio is not None):
            raise HyperParamsError("value_source: optimized makes its edit in one solve: set edit_rounds: 1 and "
                                   "max_heldout_ppl_ratio: null")
        for key in ("eta_factor", "network_stage_eta_factor"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise HyperParamsError(f"{key} must be a finite number > 0, got {v!r}")
        if self.network_stage is not None and self.value_source != "optimized":
            raise HyperParamsError("network_stage (a trained network's edit after the value edit) needs value_source: "
                                   "optimized")
        if self.max_preserved_change is not None and not self.max_preserved_change > 0:
            raise HyperParamsError("max_preserved_change must be > 0 (or null to turn the check off)")
        if self.preserved_tokens < self.preserved_window or self.preserved_window < 2:
            raise HyperParamsError("preserved_tokens must be >= preserved_window >= 2")
        w = self.preserved_records_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise HyperParamsError(f"preserved_records_weight must be a number in [0, 1], got {w!r}")
        if self.preserved_records is not None and not (isinstance(self.preserved_records, str)
                                                       and self.preserved_records.strip()):
            raise HyperParamsError(f"preserved_records must be a path[@start:stop] string or null, got "
                                   f"{self.preserved_records!r}")

    @classmethod
    def from_hparams(cls, hparams_name_or_path, overrides: dict | None = None):
        """As :meth:`~easyedit_agrade.hparams.HyperParams.from_hparams`; a relative ``network_stage`` is resolved
        against this YAML's folder."""
        obj = super().from_hparams(hparams_name_or_path, overrides)
        if obj.network_stage is not None and not Path(obj.network_stage).is_absolute():
            obj.network_stage = str(Path(obj._source_path).parent / obj.network_stage)
        return obj

    def network_stage_hparams(self) -> "AGRADEHyperParams | None":
        """The hparams of ``network_stage`` (its η times ``network_stage_eta_factor``), or None without one.
        Raises :class:`HyperParamsError` naming the field when the file is missing or is not a network edit."""
        if self.network_stage is None:
            return None
        try:
            stage = AGRADEHyperParams.from_hparams(self.network_stage)
        except FileNotFoundError as exc:
            raise HyperParamsError(f"network_stage: {exc}") from None
        if stage.value_source != "hypernet" or stage.network_stage is not None:
            raise HyperParamsError(f"network_stage: {self.network_stage} must be a trained network's edit "
                                   f"(value_source: hypernet, no network_stage of its own)")
        return AGRADEHyperParams.from_dict(dict(stage.to_dict(),
                                                eta_factor=stage.eta_factor * self.network_stage_eta_factor),
                                           source=f"network_stage {self.network_stage}")

    def value_c0_weight(self, n_edits: int) -> float:
        """λ on C₀ in the value solve for a batch of ``n_edits`` (:func:`.values.preserved_c0_weight`)."""
        from .values import preserved_c0_weight

        return preserved_c0_weight(n_edits, self.value_preserved_weight, self.value_preserved_keys)

    def uses_value_search(self) -> bool:
        """Whether eq 5's G comes from the edit-time value search (``value_source: optimized``), not the network."""
        return self.value_source == "optimized"

    def uses_preserved_keys(self) -> bool:
        """Whether eq 3 uses C₀'s statistics (the e^μ C₀ term, the null-space restriction, or both)."""
        return bool(self.use_preserved_cov or self.null_space)

    def switches(self) -> Switches:
        if self.preset == "malmen":
            return Switches(self.use_adjustment, self.use_regularization, False, self.use_gradient_projection)
        return Switches(self.use_adjustment, self.use_regularization, self.use_weight_projection,
                        self.use_gradient_projection)

    #: fields that change the trained network or its meaning (checked against an archive's metadata)
    ARCHIVE_KEYS: ClassVar[tuple[str, ...]] = ("rank", "n_blocks", "inner_params", "preset", "use_adjustment",
                                               "use_regularization", "use_weight_projection",
                                               "use_gradient_projection", "key_positions")


@dataclass(kw_only=True)
class AGRADETrainingHyperParams(EditorTrainingFields, AGRADEHyperParams):
    """Training settings (``hparams/TRAINING/AGRADE/<model>.yaml``): the editing fields, the shared training fields
    (:class:`~easyedit_agrade.core.editor_hparams.EditorTrainingFields`: ``lr``, ``max_grad_norm``, ``loc_coef``,
    ``max_steps``, ``seed``, ``train_lower_dtype``, …) plus these."""

    #: training / validation records (a path, or relative to the shared data folder), zsRE-MEND or CounterFact-MEND
    #: a file, or a mixed pool: a list of ``path[@start:stop]`` entries (balanced to the smallest, interleaved),
    #: e.g. [counterfact/counterfact-train.json, zsre/zsre_mend_train_10000.json@0:9000]
    train_data: Union[str, List[str]] = "counterfact/counterfact-train.json"
    val_data: Union[str, List[str]] = "counterfact/counterfact-val.json"
    data_format: Literal["auto", "zsre", "counterfact"] = "auto"
    #: validation records: ``val_start`` .. ``val_start + val_size`` of ``val_data`` (None: the last val_size)
    val_start: Optional[int] = None
    val_size: int = 256
    #: edits per training step (the paper uses 8192 on an A800)
    n_edits: int = 64
    #: Adam learning rates of η and λ (the body's: ``lr``)
    eta_lr: float = 3e-5
    lambda_lr: float = 1e-2
    #: μ's own Adam group (the preserved-knowledge term; only with use_preserved_cov)
    mu_lr: float = 1e-2
    #: L = gen_coef · CE(equivalent prompts) + edit_coef · CE(edit prompts) + loc_coef · KL(unrelated prompts);
    #: the paper (and MALMEN) train on the equivalent and unrelated prompts only: edit_coef 0
    gen_coef: float = 1.0
    edit_coef: float = 0.0
    #: early stopping: stop after ``patience`` validations without improvement of ``early_stop_key``
    early_stop_key: Literal["score", "es", "gs", "ls", "loss"] = "score"
    patience: int = 8
    checkpoint_every: int = 25
    results_dir: str = "runs/agrade"
    #: start from this trained archive's network instead of a fresh one (fresh optimiser; ``--init-from``)
    init_archive: Optional[str] = None
