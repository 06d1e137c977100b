"""The editing methods the benchmark runs, how their hparams are loaded, and how their edits are applied.

Every method runs through EasyEdit's ``BaseEditor``: the harness builds ``BaseEditor.from_hparams(hparams)`` (which
dispatches ``alg_name`` through EasyEdit's ``ALG_DICT``, where AGRADE and InstructEdit are registered, and places
the model) and calls the editor's ``apply_algo`` — the same call ``BaseEditor.edit``/``batch_edit`` make. It does
not use those two loops themselves: in EasyEdit 0.0.1.dev0 they evaluate record by record and restore the original
weights after every request (``edit``) or chunk (``batch_edit``), so N edits would never be in the model together.

* **batch** — all N requests go to one ``apply_to_model`` call (the method batches internally; its ``batch_size``
  hyperparameter keeps the meaning the method gives it: edits per solve for MEMIT/MEND, the optimiser minibatch for
  FT/LoRA, the micro-batching of AGRADE's executor);
* **sequential** — one ``apply_to_model`` call per request, in order, the weights kept in between (ROME is a
  single-edit method in EasyEdit; InstructEdit edits one request at a time when its ``batch_size`` is 1).
"""
from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from ..integration.easyedit_editor import base_editor_on_loaded_model as make_editor  # noqa: F401  (the bench's name)
from ..integration.preloaded import RIGHT_PADDING_ALGS  # noqa: F401  (re-exported; one list for every caller)
from ..paths import REPO_ROOT
from ..registry import METHODS as REGISTRY

#: where the shipped hparams live (``hparams/<METHOD>/<model>.yaml``)
HPARAMS_DIR = REPO_ROOT / "hparams"
MODEL_HPARAMS_NAME = "smollm2-135m"

#: alg_name -> (module, hyperparameter class) of this plugin's methods (from the one method table); EasyEdit's own
#: baselines (FT, LoRA, MEND, ROME, MEMIT, ...) are loaded by ``integration.baselines.load_easyedit_hparams``
HPARAMS_CLASSES: dict[str, tuple[str, str]] = {m.alg_name: (m.hparams_module, m.hparams_class) for m in REGISTRY}


#: EasyEdit's single-edit methods (its ``SingletonEditor``)
SEQUENTIAL_ALGS = {"ROME", "KN"}


@dataclass(frozen=True)
class MethodSpec:
    """A row of the benchmark: an EasyEdit ``alg_name`` with an hparams file and optional overrides."""

    name: str
    alg_name: str
    hparams_file: str  # relative to the hparams dir
    overrides: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    def hparams_path(self, hparams_dir: Path | None = None) -> Path:
        return Path(hparams_dir or HPARAMS_DIR) / self.hparams_file


def _spec(name: str, alg: str, desc: str, overrides: tuple = (), folder: str | None = None) -> MethodSpec:
    return MethodSpec(name, alg, f"{folder or alg}/{MODEL_HPARAMS_NAME}.yaml", overrides, desc)


METHODS: dict[str, MethodSpec] = {
    "AGRADE": _spec("AGRADE", "AGRADE", "AGRADE (this plugin)"),
    "MALMEN": _spec("MALMEN", "AGRADE", "MALMEN preset: AGRADE's hparams with `preset: malmen` (this plugin)",
                    overrides=(("preset", "malmen"),), folder="AGRADE"),
    "InstructEdit": _spec("InstructEdit", "InstructEdit", "InstructEdit (this plugin)"),
    "FT": _spec("FT", "FT", "EasyEdit FT (constrained fine-tuning of one FFN layer)"),
    "LoRA": _spec("LoRA", "LoRA", "EasyEdit LoRA (peft AdaLoRA adapter on q_proj/v_proj)"),
    "MEND": _spec("MEND", "MEND", "EasyEdit MEND (archives/mend-smollm2-135m-instruct.safetensors, EasyEdit's own trainer)"),
    "ROME": _spec("ROME", "ROME", "EasyEdit ROME (key statistics: see --statistics)"),
    "MEMIT": _spec("MEMIT", "MEMIT", "EasyEdit MEMIT (key statistics: see --statistics)"),
}
#: the rows every EasyEdit generation has (the default method list of a run adds the upstream-only ones it finds)
ALL_METHODS = tuple(METHODS)


def _upstream_specs() -> dict[str, MethodSpec]:
    from ..integration.upstream_methods import UPSTREAM_METHODS

    return {m.name: MethodSpec(m.name, m.alg_name, m.hparams_file(MODEL_HPARAMS_NAME), (), m.description)
            for m in UPSTREAM_METHODS.values()}


#: EasyEdit upstream's newer methods (AlphaEdit, UltraEdit, EMMET, PMET, EAMET): rows when the installed easyeditor
#: has them (a source checkout: ``make test-upstream EASYEDIT_SRC=...``); naming one on the PyPI wheel fails with
#: "not in this EasyEdit generation"
UPSTREAM_ROWS = tuple(_upstream_specs())
METHODS.update(_upstream_specs())


def default_methods() -> tuple[str, ...]:
    """The rows of a full run: every base row, plus the upstream-only methods the installed EasyEdit has."""
    from ..integration.upstream_methods import available_upstream_methods

    return ALL_METHODS + tuple(name for name in UPSTREAM_ROWS if name in available_upstream_methods())

def covariance_note(statistics: str, n_tokens: int) -> str:
    """The results' note on ROME/MEMIT key statistics for ``--statistics``."""
    if statistics == "wiki":
        return (f"ROME and MEMIT use real key statistics (EasyEdit's mom2): the uncentred second moment of each edited "
                f"layer's input over {n_tokens:,} tokens of wikitext/wiki.valid.tokens (WikiText-2 validation; the "
                "perplexity text wiki.test.tokens is never used), computed once into the cache AGRADE's "
                "preserved-knowledge term reads and written in EasyEdit's own format where its layer_stats loads it "
                "(no download). ROME runs with mom2_adjustment on.")
    return ("ROME and MEMIT run with covariance adjustment off (--statistics identity): ROME uses the unwhitened key; "
            "EasyEdit 0.0.1.dev0's MEMIT ignores the flag and always loads a covariance, so the harness gives it the "
            "identity matrix (the MEMIT update becomes ridge-regularised least squares).")


def load_hparams(spec: MethodSpec, hparams_dir: Path | None = None, *, extra: dict | None = None) -> Any:
    """Read the YAML, apply the spec's and ``extra`` overrides, and build the method's hyperparameter object."""
    path = spec.hparams_path(hparams_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name}: hparams file {path.name!r} not found under {path.parent.name}/")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    config.update(dict(spec.overrides))
    config.update(extra or {})
    if spec.alg_name in HPARAMS_CLASSES:  # our validated dataclasses
        module, cls_name = HPARAMS_CLASSES[spec.alg_name]
        return getattr(importlib.import_module(module), cls_name).from_dict(config, source=str(path.name))
    # EasyEdit's own classes: the integration layer handles keys that only one EasyEdit generation knows
    from ..integration.baselines import HPARAMS_CLASSES as EASYEDIT_HPARAMS_CLASSES, load_easyedit_hparams

    if spec.alg_name not in EASYEDIT_HPARAMS_CLASSES:
        raise ValueError(f"{spec.name}: no hyperparameter class known for alg_name {spec.alg_name!r}")
    hparams = load_easyedit_hparams(path)
    for key, value in {**dict(spec.overrides), **(extra or {})}.items():
        setattr(hparams, key, value)
    return hparams


def edit_mode(spec: MethodSpec, hparams: Any) -> tuple[str, str]:
    """``("batch" | "sequential", why)`` for a method."""
    if spec.name in UPSTREAM_ROWS:
        from ..integration.upstream_methods import by_alg_name

        if not by_alg_name(spec.alg_name).batchable:
            return "sequential", f"{spec.name} is not in EasyEdit's BatchEditor (one request per call)"
    if spec.alg_name in SEQUENTIAL_ALGS:
        return "sequential", f"{spec.alg_name} edits one fact per call (EasyEdit's SingletonEditor)"
    if spec.alg_name == "InstructEdit" and int(getattr(hparams, "batch_size", 1) or 1) == 1:
        return "sequential", "InstructEdit's hparams set batch_size: 1 (one request per edit)"
    if spec.alg_name == "LoRA":
        return "batch", ("EasyEdit's LoRA executor trains one adapter on all requests (EasyEdit's BatchEditor "
                         "does not list LoRA, and its per-request path would stack adapters)")
    return "batch", f"{spec.alg_name} edits all requests in one apply_to_model call"


def prepare_edit(spec: MethodSpec, model: Any, tok: Any, hparams: Any, *, statistics: str, n_tokens: int,
                 n_requests: int, notes: list[str]) -> str | None:
    """Everything a baseline needs before its timed edit; returns the statistics description for the bench row.

    * ROME/MEMIT read EasyEdit's key statistics (mom2). ``statistics="wiki"``: its cache files are written from the
      shared C₀ cache (``n_tokens`` tokens of ``wikitext/wiki.valid.tokens``;
      :func:`easyedit_agrade.integration.easyedit_stats.export_mom2`) and ROME's ``mom2_adjustment`` is switched on;
      ``"identity"``: ROME's adjustment off, MEMIT's covariance = I (in :func:`method_context`).
    * EasyEdit upstream's newer methods: :func:`easyedit_agrade.integration.upstream_methods.prepare_upstream_edit`
      (statistics from the same cache, AlphaEdit's null-space projection, UltraEdit's batch, the model family name).
    """
    from ..integration.easyedit_stats import STATISTICS_ATTR, clear_easyedit_covariance_caches, export_mom2

    if spec.name in UPSTREAM_ROWS:
        from ..integration.upstream_methods import by_alg_name, prepare_upstream_edit

        notes.extend(prepare_upstream_edit(by_alg_name(spec.alg_name), model, tok, hparams, n_requests,
                                           n_tokens=n_tokens))
        return getattr(hparams, STATISTICS_ATTR, None)  # set when the method reads mom2
    if spec.alg_name not in ("ROME", "MEMIT"):
        return None
    if statistics == "identity":
        if spec.alg_name == "ROME":
            hparams.mom2_adjustment = False
            notes.append("ROME: mom2_adjustment off (--statistics identity)")
        return None
    if statistics != "wiki":
        raise ValueError(f"statistics must be 'wiki' or 'identity', got {statistics!r}")
    hparams.mom2_adjustment = True
    clear_easyedit_covariance_caches(model, hparams)
    source = export_mom2(model, tok, hparams, n_tokens=n_tokens, progress=False)
    notes.append(f"{spec.alg_name}: key statistics (EasyEdit mom2) = {source.describe()}, shared with AGRADE's C0 "
                 f"cache")
    return source.describe()


@contextlib.contextmanager
def method_context(spec: MethodSpec, model: Any, hparams: Any, n_requests: int,
                   notes: list[str]) -> Iterator[None]:
    """Scoped compatibility shims a baseline needs on this stack (each one named in ``notes``)."""
    from ..integration import baseline_compat as compat

    with contextlib.ExitStack() as stack:
        if getattr(hparams, "_easyedit_agrade_added_model_parallel", False):
            notes.append(f"{spec.name}: its hparams class has no model_parallel field (BaseEditor reads it): set to "
                         "false")
        if spec.alg_name == "MEMIT":
            n_layers = int(model.config.num_hidden_layers)
            stack.enter_context(compat.decoder_layers_return_tuples(model, hparams.layer_module_tmp, n_layers))
            notes.append("MEMIT: decoder-layer outputs presented as tuples to EasyEdit's hooks (transformers>=4.54)")
            from ..integration.easyedit_stats import STATISTICS_ATTR

            if getattr(hparams, STATISTICS_ATTR, None) is None:
                stack.enter_context(compat.memit_identity_covariance(model, hparams))
                notes.append("MEMIT: covariance = identity (--statistics identity: covariance adjustment off)")
        if spec.alg_name == "LoRA":
            steps = int(hparams.num_steps) * max(1, math.ceil(n_requests / max(int(hparams.batch_size), 1)))
            stack.enter_context(compat.adalora_total_step(steps))
            notes.append(f"LoRA: AdaLoraConfig given total_step={steps} (required by peft>=0.14; EasyEdit never "
                         "calls AdaLoRA's rank re-allocation, so it has no effect on training)")
        yield


MEND_NO_ARCHIVE = ("MEND needs a trained MEND hypernetwork archive (EasyEdit's EditTrainer with "
                   "MENDTrainingHparams, on this model): the shipped YAML names "
                   "archives/mend-smollm2-135m-instruct.safetensors; train another with "
                   "`python -m easyedit_agrade.integration.mend_training hparams/TRAINING/MEND/smollm2-135m.yaml`; "
                   "without one EasyEdit's executor stops with 'Training weights Needed'")


class MethodUnavailable(RuntimeError):
    """A method cannot run with its hparams on this checkout (found before the model is loaded)."""


def preflight(spec: MethodSpec, hparams: Any) -> None:
    """Raise :class:`MethodUnavailable` with a clear message for a run that is known to fail before it starts.

    MEND without ``archive:``: EasyEdit 0.0.1.dev0's executor only asserts ``params.archive is not None`` (a bare
    ``AssertionError`` that prints 'Training weights Needed....' to stdout), which is all the bench could report.
    """
    if spec.alg_name == "MEND" and not getattr(hparams, "archive", None):
        raise MethodUnavailable(f"{spec.name}: `archive:` in {spec.hparams_file} is empty, and EasyEdit's MEND "
                                "executor cannot edit without a trained MEND hypernetwork (it stops with a bare "
                                "AssertionError, 'Training weights Needed')")


def diagnose(spec: MethodSpec, hparams: Any, exc: BaseException) -> str | None:
    """A plain-language reason for known failures (shown next to the raw error)."""
    if spec.alg_name == "MEND" and not getattr(hparams, "archive", None):
        return MEND_NO_ARCHIVE
    text = f"{type(exc).__name__}: {exc}"
    if "archive" in text.lower() and spec.alg_name == "AGRADE":
        from ..models.agrade.archive import retrain_hint

        what = "its own trained archive (`preset: malmen`)" if spec.name == "MALMEN" else "a trained archive"
        return f"{spec.name} needs {what} for this model: {retrain_hint(hparams)}"
    if "archive" in text.lower() and spec.alg_name == "InstructEdit":
        return f"{spec.name} needs a trained hypernetwork archive for this model (`easyedit-agrade train`)"
    if isinstance(exc, NotImplementedError):
        return f"{spec.name} is not implemented yet in this checkout"
    return None


def apply_edits(editor: Any, requests: Sequence[dict], mode: str,
                on_progress: Callable[[int], None] | None = None, reports: list[dict] | None = None) -> Any:
    """Apply ``requests`` with the editor's ``apply_algo`` (batch: one call; sequential: one call per request,
    weights kept). Returns the edited model (LoRA returns a new peft wrapper around the same weights). With a
    ``reports`` list, each call's :class:`~easyedit_agrade.core.edit_report.EditReport` (AGRADE / InstructEdit
    executors: ΔW ratios, suppressed rows, the perplexity guard's ratio and steps) is appended as a dict."""
    from ..core.edit_report import last_report

    model = editor.model
    calls = [list(requests)] if mode == "batch" else [[r] for r in requests]
    seen = last_report(model)
    for i, chunk in enumerate(calls):
        model, _ = editor.apply_algo(model, editor.tok, chunk, editor.hparams, copy=False,
                                     return_orig_weights=False, keep_original_weight=False)
        report = last_report(model)
        if reports is not None and report is not None and report is not seen:
            reports.append(report.to_dict())
            seen = report
        if on_progress is not None:
            on_progress(i + 1)
    return model
