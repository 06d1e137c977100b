"""EasyEdit methods that only an upstream source checkout has — AlphaEdit, UltraEdit, EMMET, PMET, EAMET — run from
that checkout (``EASYEDIT_SRC=...``, the ``make test-upstream`` environment); nothing of theirs is copied here.

What this module adds around them, each for a reason found in the checkout's code:

* **Which ones exist.** :data:`UPSTREAM_METHODS` names each method's ``alg_name`` (EasyEdit's ``ALG_DICT`` key),
  its hparams folder under ``hparams/`` and the module exporting its hyperparameter class.
  :func:`available_upstream_methods` returns those the installed ``easyeditor`` has (class importable *and* the
  ``alg_name`` in ``ALG_DICT``); :func:`unavailable_reason` says why one is missing ("not in this EasyEdit
  generation"), e.g. with the PyPI wheel, which has none of them.
* **The model family by name.** AlphaEdit sizes its projection and key cache by ``'llama'``/``'qwen'`` in
  ``hparams.model_name`` (otherwise they are never defined and the edit stops with a NameError); UltraEdit shifts
  its loss for causal LMs only when the name contains a known family. :func:`prepare_upstream_edit` therefore
  relabels the :class:`~.preloaded.PreloadedModel` with the architecture (``"smollm2-135m-instruct (llama)"``).
* **Statistics.** AlphaEdit, EMMET, PMET and EAMET read MEMIT's key second moments (mom2); they are written from
  the local WikiText by :func:`~.easyedit_stats.export_mom2`. AlphaEdit's null-space projection P is computed
  once per (statistics, layers, threshold) with upstream's own ``get_project`` and saved at ``hparams.P_loc``
  (upstream would otherwise compute it and save it as ``null_space_project.pt`` in the working directory).
* **Process-wide state.** AlphaEdit keeps the first P it loaded and accumulates every edited key in a module-level
  cache for sequential editing; each prepared edit starts from the given P_loc and an empty key cache.
* **UltraEdit's batch.** Its executor edits exactly ``batch_size`` requests in chunks of ``batch_size_once``;
  both are set from the number of requests.
* **Restoring weights.** UltraEdit's ``weights_copy`` is always empty (it compares module names with parameter
  names), so EasyEdit's ``batch_edit`` cannot restore it; :func:`edited_parameters` + :func:`snapshot_weights`
  give every method an exact restore.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..hparams import HyperParamsError

#: the hparams file name of the embedded model inside each method folder
MODEL_HPARAMS_NAME = "smollm2-135m"


class NotInThisGeneration(HyperParamsError):
    """The method exists in EasyEdit upstream, but the installed ``easyeditor`` does not have it."""


@dataclass(frozen=True)
class UpstreamMethod:
    """A benchmark row for an upstream-only EasyEdit method."""

    name: str  # row name (and hparams folder, as upstream names it)
    alg_name: str  # EasyEdit's ALG_DICT key (the YAML's alg_name)
    module: str  # module that exports the hyperparameter class
    class_name: str
    description: str
    statistics: bool  # reads MEMIT's key second moments (mom2)
    batchable: bool  # in EasyEdit's BatchEditor (else one request per apply_to_model call)
    family_by_name: bool = False  # picks model-family code by substring of hparams.model_name

    def hparams_file(self, model_hparams_name: str = MODEL_HPARAMS_NAME) -> str:
        """Relative to the hparams dir: ``<name>/<model>.yaml``."""
        return f"{self.name}/{model_hparams_name}.yaml"


UPSTREAM_METHODS: dict[str, UpstreamMethod] = {m.name: m for m in (
    UpstreamMethod("AlphaEdit", "AlphaEdit", "easyeditor", "AlphaEditHyperParams",
                   "EasyEdit upstream AlphaEdit (MEMIT with null-space-projected updates; real mom2 statistics)",
                   statistics=True, batchable=True, family_by_name=True),
    UpstreamMethod("UltraEdit", "ULTRAEDIT", "easyeditor", "UltraEditHyperParams",
                   "EasyEdit upstream UltraEdit (training-free lifelong least-squares editing)",
                   statistics=False, batchable=True, family_by_name=True),
    UpstreamMethod("EMMET", "EMMET", "easyeditor.models.emmet", "EMMETHyperParams",
                   "EasyEdit upstream EMMET (equality-constrained batched editing; real mom2 statistics)",
                   statistics=True, batchable=True),
    UpstreamMethod("PMET", "PMET", "easyeditor", "PMETHyperParams",
                   "EasyEdit upstream PMET (FFN-only residual update; real mom2 statistics)",
                   statistics=True, batchable=True),
    UpstreamMethod("EAMET", "EAMET", "easyeditor.models.eamet", "EAMETHyperParams",
                   "EasyEdit upstream EAMET (one request per call in EasyEdit; real mom2 statistics)",
                   statistics=True, batchable=False),
)}


def by_alg_name(alg_name: Any) -> UpstreamMethod | None:
    """The upstream method with this ``alg_name`` (EasyEdit's spelling, e.g. ``"ULTRAEDIT"``) or row name."""
    for m in UPSTREAM_METHODS.values():
        if alg_name in (m.alg_name, m.name):
            return m
    return None


def _find_class(method: UpstreamMethod) -> tuple[type | None, str | None]:
    try:
        easyeditor = importlib.import_module("easyeditor")
    except ImportError as exc:
        return None, f"EasyEdit is not importable ({exc})"
    where = getattr(easyeditor, "__file__", "easyeditor")
    try:
        cls = getattr(importlib.import_module(method.module), method.class_name)
    except (ImportError, AttributeError):
        return None, (f"{method.name} is not in this EasyEdit generation: easyeditor ({where}) has no "
                      f"{method.class_name}; it comes with an EasyEdit source checkout "
                      "(make test-upstream EASYEDIT_SRC=<checkout>, or the checkout on PYTHONPATH)")
    alg_dict = getattr(importlib.import_module("easyeditor.util.alg_dict"), "ALG_DICT", {})
    if method.alg_name not in alg_dict:
        return None, (f"{method.name} is not in this EasyEdit generation: easyeditor ({where}) has "
                      f"{method.class_name} but no {method.alg_name!r} in its ALG_DICT")
    return cls, None


def hparams_class(method: UpstreamMethod) -> type:
    """The installed EasyEdit's hyperparameter class, or :class:`NotInThisGeneration` with the reason."""
    cls, why = _find_class(method)
    if cls is None:
        raise NotInThisGeneration(why)
    return cls


def unavailable_reason(method: UpstreamMethod | str) -> str | None:
    """``None`` if the installed ``easyeditor`` can run the method, else a sentence saying why not."""
    m = method if isinstance(method, UpstreamMethod) else by_alg_name(method)
    if m is None:
        return f"{method!r} is not an upstream EasyEdit method known here ({sorted(UPSTREAM_METHODS)})"
    return _find_class(m)[1]


def available_upstream_methods() -> dict[str, UpstreamMethod]:
    """The upstream methods the installed ``easyeditor`` has, by row name (empty with the PyPI wheel)."""
    return {name: m for name, m in UPSTREAM_METHODS.items() if _find_class(m)[0] is not None}


# ---------------------------------------------------------------------------------------------- preparation
def architecture_name(model_name: Any, model: Any) -> Any:
    """``model_name`` with the architecture appended (``"smollm2-135m-instruct (llama)"``), same model behind it."""
    from .preloaded import PreloadedModel

    family = str(getattr(model.config, "model_type", "") or "")
    if not family or family in str(model_name).lower():
        return model_name
    label = f"{model_name} ({family})"
    if isinstance(model_name, PreloadedModel):
        return model_name.relabelled(label)
    return label


def edited_parameters(method: UpstreamMethod, hparams: Any) -> list[str]:
    """The parameter names the method writes into (for an exact snapshot/restore)."""
    if method.alg_name == "ULTRAEDIT":
        return [p if p.endswith(".weight") else f"{p}.weight" for p in hparams.inner_params]
    templates = list(getattr(hparams, "rewrite_module_tmps", None) or [hparams.rewrite_module_tmp])
    return [f"{t.format(layer)}.weight" for t in templates for layer in hparams.layers]


def snapshot_weights(model: Any, names: Sequence[str]) -> dict[str, Any]:
    """Detached copies of the named parameters (restore with ``core.weights.restore_weights``)."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"the model has no parameter(s) {missing}")
    return {n: params[n].detach().clone() for n in names}


def _digest(paths: Sequence[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def alphaedit_projection(model: Any, tok: Any, hparams: Any, *, log: Callable[[str], None] | None = None) -> Path:
    """Compute (once) AlphaEdit's null-space projections P for ``hparams.layers`` with upstream's ``get_project``
    from the exported mom2, save them as one (layers, d, d) tensor, and point ``hparams.P_loc`` at the file.

    The file name keys the statistics files' contents, the layers and the threshold, so changed statistics or
    settings never reuse an old P. Call after :func:`~.easyedit_stats.export_mom2` (which sets ``stats_dir``).
    """
    import torch

    from .easyedit_stats import easyedit_model_name, easyedit_stats_file, edited_modules

    main = importlib.import_module("easyeditor.models.alphaedit.AlphaEdit_main")
    stats = [easyedit_stats_file(hparams.stats_dir, model, m, precision=str(hparams.mom2_dtype),
                                 sample_size=hparams.mom2_n_samples) for m in edited_modules(hparams)]
    key = _digest(stats, f"{list(hparams.layers)}|{float(hparams.nullspace_threshold)!r}|{hparams.rewrite_module_tmp}")
    path = Path(hparams.stats_dir) / easyedit_model_name(model) / "alphaedit" / f"null_space_project-{key}.pt"
    if not path.is_file():
        P = torch.stack([main.get_project(model, tok, layer, hparams).float().cpu() for layer in hparams.layers])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.pt")
        torch.save(P, tmp)
        tmp.replace(path)
        if log is not None:
            kept = [int(round(float(torch.trace(p)))) for p in P]
            log(f"AlphaEdit null-space projection (threshold {hparams.nullspace_threshold}): null-space dims {kept} "
                f"of {P.shape[-1]} per layer, saved at {path}")
    hparams.P_loc = str(path)
    return path


def null_space_dims(P_loc: str | Path) -> list[int]:
    """The rank of each layer's projection in an AlphaEdit P file (its trace)."""
    import torch

    P = torch.load(str(P_loc), map_location="cpu", weights_only=True)  # tensors only: no pickled code
    return [int(round(float(torch.trace(p)))) for p in P]


def reset_alphaedit_state() -> None:
    """Make the next AlphaEdit call read ``hparams.P_loc`` and start with an empty key cache (upstream keeps the
    first P it loaded and every edited key of the process, for sequential editing)."""
    main = importlib.import_module("easyeditor.models.alphaedit.AlphaEdit_main")
    main.P_loaded = False
    main.cache_c_new = False


def ultraedit_batch(hparams: Any, n_requests: int) -> tuple[int, int]:
    """Set UltraEdit's ``batch_size`` to ``n_requests`` and ``batch_size_once`` to the largest divisor of it not
    above the YAML's value (the executor edits exactly ``batch_size`` requests, in chunks of ``batch_size_once``)."""
    n = max(1, int(n_requests))
    once = max(1, min(int(hparams.batch_size_once), n))
    while n % once:
        once -= 1
    hparams.batch_size, hparams.batch_size_once = n, once
    return n, once


def prepare_upstream_edit(method: UpstreamMethod | str, model: Any, tok: Any, hparams: Any, n_requests: int, *,
                          stats_dir: str | Path | None = None, n_tokens: int = 100_000,
                          preserved_root: str | Path | None = None, log: Callable[[str], None] | None = None,
                          progress: bool = False) -> list[str]:
    """Make ``hparams`` ready for an upstream method's edit of ``n_requests`` requests on ``model``; returns notes
    for the bench row (what was set and why). Call it on the editor's own hparams (``editor.hparams``), after
    ``BaseEditor`` was built and before ``apply_algo``/``batch_edit``."""
    m = method if isinstance(method, UpstreamMethod) else by_alg_name(method)
    if m is None:
        raise ValueError(f"{method!r} is not an upstream EasyEdit method ({sorted(UPSTREAM_METHODS)})")
    hparams_class(m)  # NotInThisGeneration before anything is computed
    notes: list[str] = []
    if m.family_by_name:
        hparams.model_name = architecture_name(hparams.model_name, model)
        notes.append(f"{m.name}: hparams.model_name presented as {str(hparams.model_name)!r} (EasyEdit's {m.name} "
                     "picks model-family code by substring of the name)")
    if m.statistics:
        from .easyedit_stats import export_mom2

        src = export_mom2(model, tok, hparams, n_tokens=n_tokens, stats_dir=stats_dir,
                          preserved_root=preserved_root, progress=progress, log=log)
        notes.append(f"{m.name}: key statistics (mom2) = {src.describe()}")
    if m.alg_name == "AlphaEdit":
        path = alphaedit_projection(model, tok, hparams, log=log)
        reset_alphaedit_state()
        dims = null_space_dims(path)
        notes.append(f"AlphaEdit: null-space projection from upstream's get_project, threshold "
                     f"{hparams.nullspace_threshold}: null-space dims {dims} per layer; key cache started empty")
    if m.alg_name == "ULTRAEDIT":
        n, once = ultraedit_batch(hparams, n_requests)
        notes.append(f"UltraEdit: batch_size={n} (all requests), batch_size_once={once}")
    return notes


def restore_snapshot(model: Any, originals: Mapping[str, Any]) -> None:
    """Copy the snapshot back (bit-exact)."""
    from ..core.weights import restore_weights

    restore_weights(model, originals)


# ---------------------------------------------------------------------------------------------- one batch edit
@dataclass
class UpstreamEdit:
    """The outcome of :func:`batch_edit_upstream`: the edited model (weights still edited), the exact originals of
    every parameter the method writes, EasyEdit's own timing of the edit call and its per-request metrics."""

    method: UpstreamMethod
    model: Any
    originals: dict[str, Any]
    edit_seconds: float
    prepare_seconds: float
    easyedit_metrics: list[dict]
    notes: list[str]
    hparams: Any

    def restore(self) -> None:
        """Put the original weights back (bit-exact)."""
        restore_snapshot(self.model, self.originals)


def batch_edit_upstream(method: UpstreamMethod | str, hparams: Any, model: Any, tok: Any,
                        requests: Sequence[Mapping[str, Any]], *, model_alias: str = "smollm2-135m-instruct",
                        stats_dir: str | Path | None = None, n_tokens: int = 100_000,
                        preserved_root: str | Path | None = None,
                        log: Callable[[str], None] | None = None) -> UpstreamEdit:
    """Edit all ``requests`` in one chunk with upstream ``BaseEditor.batch_edit`` (``sequential_edit=True``, so the
    edited weights stay in ``model``; restore with :meth:`UpstreamEdit.restore`).

    ``hparams`` is copied (EasyEdit writes into it); ``requests`` are EasyEdit request dicts with ``prompt``,
    ``target_new``, ``subject`` and optionally ``ground_truth``. EasyEdit's ``pre``/``post`` metrics come back
    as it computes them; ``edit_seconds`` is its own timing of the ``apply_algo`` call (statistics and AlphaEdit's
    projection are prepared before, timed as ``prepare_seconds``).
    """
    import copy
    import time

    from .easyedit import register
    from .preloaded import PreloadedModel

    m = method if isinstance(method, UpstreamMethod) else by_alg_name(method)
    if m is None:
        raise ValueError(f"{method!r} is not an upstream EasyEdit method ({sorted(UPSTREAM_METHODS)})")
    hparams_class(m)
    if not m.batchable:
        raise ValueError(f"{m.name} is not in EasyEdit's BatchEditor: it edits one request per call")
    register()
    hparams = copy.deepcopy(hparams)
    hparams.model_name = PreloadedModel(model_alias, model, tok)
    editor = importlib.import_module("easyeditor.editors.editor").BaseEditor.from_hparams(hparams)
    t0 = time.perf_counter()
    notes = prepare_upstream_edit(m, editor.model, editor.tok, editor.hparams, len(requests), stats_dir=stats_dir,
                                  n_tokens=n_tokens, preserved_root=preserved_root, log=log)
    if int(getattr(editor.hparams, "batch_size", len(requests)) or 1) < len(requests):
        editor.hparams.batch_size = len(requests)
        notes.append(f"{m.name}: batch_size raised to {len(requests)} (one solve for all requests)")
    prepare_seconds = time.perf_counter() - t0
    originals = snapshot_weights(editor.model, edited_parameters(m, editor.hparams))
    kwargs: dict[str, Any] = {"subject": [r["subject"] for r in requests]}
    if all(r.get("ground_truth") for r in requests):
        kwargs["ground_truth"] = [r["ground_truth"] for r in requests]
    metrics, edited, _ = editor.batch_edit(prompts=[r["prompt"] for r in requests],
                                           target_new=[r["target_new"] for r in requests],
                                           sequential_edit=True, verbose=False, **kwargs)
    seconds = float(metrics[0]["time"]) if metrics and "time" in metrics[0] else float("nan")
    return UpstreamEdit(m, edited, originals, seconds, prepare_seconds, metrics, notes, editor.hparams)
