"""Real key statistics ("mom2") for EasyEdit's ROME and MEMIT, from the local WikiText corpus — one cache with AGRADE.

EasyEdit's ROME (``mom2_adjustment``) and MEMIT (always) need, per edited layer, the uncentred second moment of the
layer's input keys over ordinary text, C = E[k kᵀ]. EasyEdit computes it with ``layer_stats`` over a Hugging Face
Wikipedia/WikiText download and caches it as ``<stats_dir>/<model>/<dataset>_stats/<layer>_<dtype>_mom2_<n>.npz``
(a :class:`~easyeditor.util.runningstats.CombinedStat` of one ``SecondMoment``). Nothing can be downloaded here.

The same matrix is the C₀ of AGRADE's preserved-knowledge term, computed by
:func:`easyedit_agrade.core.preserved_stats.preserved_second_moments` on the first ``n_tokens`` tokens of
``wikitext/wiki.valid.tokens`` (the held-out ``wiki.test.tokens`` is refused: it is the perplexity text). So there
is one computation and one store: :func:`export_mom2` takes C₀ from that cache (computing what is missing) and
writes it with **EasyEdit's own** ``CombinedStat``/``SecondMoment``/``save_cached_state`` at the path EasyEdit's
``layer_stats`` looks for, with ``count`` = the token count and ``sample_size`` = the token count (the key ``tally`` checks; ``hparams.mom2_n_samples`` is set to it). EasyEdit then loads it through its own code path (``get_cov`` / ``get_inv_cov`` →
``layer_stats`` → ``tally`` → ``load_cached_state``) and never reaches its download. ``tests/integration`` checks
that EasyEdit's ``layer_stats``, fed the same text through its own ``TokenizedDataset`` pipeline, computes the
same matrix as our streamer.
"""
from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_path
from ..core.preserved_stats import DEFAULT_CORPUS, file_sha256, model_key, preserved_second_moments, resolve_corpus
from ..paths import cache_dir

#: default home of the exported EasyEdit statistics (``hparams.stats_dir`` is pointed here by the bench)
DEFAULT_EASYEDIT_STATS_DIR = "stats/easyedit"
#: set on the hparams by :func:`export_mom2`: the description of the statistics it points them at (bench rows)
STATISTICS_ATTR = "_easyedit_agrade_statistics"
#: the dataset name written into the path; EasyEdit's ``layer_stats`` only knows "wikitext" and "wikipedia"
DATASET_NAME = "wikitext"


@dataclass(frozen=True)
class StatisticsSource:
    """What the statistics are: shown in bench rows and notes."""

    corpus: str
    n_tokens: int
    window: int
    stats_dir: str

    def describe(self) -> str:
        return f"{self.n_tokens:,} tokens of {self.corpus} (windows of {self.window})"


def easyedit_model_name(model: Any) -> str:
    """The model key EasyEdit's ``get_cov``/``layer_stats`` derive: ``config._name_or_path`` with '/' → '_'."""
    return str(model.config._name_or_path).replace("/", "_")


def easyedit_model_dirs(model: Any) -> list[str]:
    """Every folder name an EasyEdit generation's ``layer_stats`` reads the model's statistics from: the PyPI wheel
    uses :func:`easyedit_model_name`, upstream HEAD the last component of ``config._name_or_path``."""
    names = [easyedit_model_name(model), str(model.config._name_or_path).rsplit("/")[-1]]
    return list(dict.fromkeys(names))


def easyedit_stats_file(stats_dir: str | Path, model: Any, layer_name: str, *, precision: str,
                        sample_size: int | None, ds_name: str = DATASET_NAME) -> Path:
    """The file EasyEdit's ``layer_stats`` reads for ``mom2`` of ``layer_name`` (its naming, default batch size)."""
    suffix = "" if sample_size is None else f"_{int(sample_size)}"
    return Path(stats_dir) / easyedit_model_name(model) / f"{ds_name}_stats" / f"{layer_name}_{precision}_mom2{suffix}.npz"


def edited_modules(hparams: Any) -> list[str]:
    """The modules whose input keys ROME/MEMIT read: ``rewrite_module_tmp`` over ``layers``."""
    return [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]


def export_mom2(model: Any, tok: Any, hparams: Any, *, corpus: str | Path = DEFAULT_CORPUS, n_tokens: int = 100_000,
                window: int = 256, stats_dir: str | Path | None = None, preserved_root: str | Path | None = None,
                progress: bool = True, log: Callable[[str], None] | None = None) -> StatisticsSource:
    """Write EasyEdit's ``mom2`` cache files for the layers of a ROME/MEMIT ``hparams`` and point it at them.

    Sets ``hparams.stats_dir`` (a folder keyed by the model's weights, the corpus and the window),
    ``hparams.mom2_dataset`` (``"wikitext"``), ``hparams.mom2_n_samples`` (= the token count, the key in
    EasyEdit's file name) and :data:`STATISTICS_ATTR` (what the statistics are); keeps ``mom2_dtype``. Existing files are left as they are (EasyEdit loads them); the shared C₀ cache (under
    ``preserved_root``, default the AGRADE statistics cache) is computed on first use. A missing corpus raises FileNotFoundError naming it before anything is written.
    Each file is also placed under the model folder the other EasyEdit generation reads (:func:`easyedit_model_dirs`).
    """
    import numpy as np
    import torch

    corpus_path = resolve_corpus(corpus)
    if n_tokens < window or window < 2:
        raise ValueError(f"n_tokens={n_tokens} must be >= window={window} >= 2")
    runningstats = importlib.import_module("easyeditor.util.runningstats")
    count = (n_tokens // window) * window
    base = Path(stats_dir).expanduser() if stats_dir is not None else cache_dir() / DEFAULT_EASYEDIT_STATS_DIR
    # EasyEdit keys its files by config._name_or_path, layer, dtype and sample size only; the folder adds what it
    # does not see (the weights, the corpus, the window), so a fine-tuned model or another text never reuses them
    root = base / model_key(model) / f"{corpus_path.stem}-{file_sha256(corpus_path)[:16]}-w{int(window)}"
    precision = str(getattr(hparams, "mom2_dtype", "float32") or "float32")
    sample_size = count  # EasyEdit's tally checks this key: here the token count
    modules = edited_modules(hparams)
    files = {m: easyedit_stats_file(root, model, m, precision=precision, sample_size=sample_size) for m in modules}
    # the same file under the other generation's model folder (upstream keys it by the last path component)
    mirrors = {m: [root / d / f.relative_to(root / easyedit_model_name(model)) for d in easyedit_model_dirs(model)[1:]]
               for m, f in files.items()}
    todo = [m for m, f in files.items() if not f.is_file()]
    if todo:
        moments = preserved_second_moments(model, tok, todo, corpus=corpus_path, n_tokens=n_tokens, window=window,
                                           root=preserved_root, progress=progress, log=log)
        for m in todo:
            stat = runningstats.CombinedStat(mom2=runningstats.SecondMoment())
            sm = stat.mom2
            sm.count = count
            sm.mom2 = (moments[m].detach().to("cpu", torch.float64) * count).to(getattr(torch, precision))
            files[m].parent.mkdir(parents=True, exist_ok=True)
            tmp = files[m].with_name(files[m].stem + ".partial.npz")
            runningstats.save_cached_state(str(tmp), stat, {"sample_size": sample_size})
            tmp.replace(files[m])
            if log is not None:
                log(f"EasyEdit mom2 for {m}: {files[m]}")
        np.load(files[todo[0]])  # fail here, not inside EasyEdit, if the written file is unreadable
    for m, others in mirrors.items():
        for other in others:
            if not other.is_file():
                with atomic_path(other) as tmp:
                    shutil.copyfile(files[m], tmp)
    source = StatisticsSource(corpus=corpus_path.name, n_tokens=count, window=window, stats_dir=str(root))
    hparams.stats_dir = str(root)
    hparams.mom2_dataset = DATASET_NAME
    hparams.mom2_n_samples = sample_size
    setattr(hparams, STATISTICS_ATTR, source.describe())
    return source


def clear_easyedit_covariance_caches(model: Any, hparams: Any) -> None:
    """Drop EasyEdit's in-process covariance caches for these layers (MEMIT ``COV_CACHE``, ROME
    ``inv_mom2_cache``), so the next edit reads the files; e.g. after swapping identity for real statistics."""
    name = easyedit_model_name(model)
    for mod_name, attr in (("easyeditor.models.memit.memit_main", "COV_CACHE"),
                           ("easyeditor.models.rome.compute_u", "inv_mom2_cache")):
        try:
            cache = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError):
            continue
        for m in edited_modules(hparams):
            cache.pop((name, m), None)

