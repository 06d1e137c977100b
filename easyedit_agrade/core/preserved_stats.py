"""Second moments of the edited modules' input keys over ordinary text, C₀ = E[k kᵀ] (MEMIT's "mom2"), for the
preserved-knowledge term of eq 3 (:mod:`easyedit_agrade.kernels.preserved`).

* **Corpus**: by default ``wikitext/wiki.valid.tokens`` of the shared data. ``wiki.test.tokens`` is the held-out
  perplexity text of the evaluation and is refused here, so statistics and perplexity never mix.
* **Keys**: the first ``n_tokens`` tokens of the corpus in windows of ``window`` tokens (no padding, no special
  tokens), one forward pass without grad; a forward pre-hook on every edited module adds kᵀk of its input rows to
  an fp64 sum; the pass stops after the last edited module (no output head). A tqdm bar shows the windows.
* **Cache**: one safetensors file per (model, corpus, n_tokens, window) under
  ``<cache root>/stats/<model key>/`` — tensors named by module (fp32 Dh×Dh), metadata with the token count,
  corpus name and SHA-256, model key. The model key is the architecture fingerprint plus a SHA-256 of every
  parameter's bytes, so a fine-tuned or differently-cast model never reuses another's statistics. A file that
  lacks some requested modules is extended (the missing ones computed, the file rewritten atomically).
* **Reuse within a process**: :func:`preserved_second_moments` keeps the result per model object, computed on
  the model as first seen (the unedited weights), like the archive cache: sequential editing does not recompute
  statistics of an already-edited model.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..paths import SHARED_ENV, cache_dir, data_dir
from .checkpoint import load_tensors, save_tensors
from .tokenize import text_windows
from .weights import get_module

DEFAULT_CORPUS = "wikitext/wiki.valid.tokens"
#: held-out perplexity text of the evaluation: never used for statistics
PERPLEXITY_CORPUS_NAME = "wiki.test.tokens"
FORMAT = "easyedit_agrade.key_second_moments/1"


class _Stop(Exception):
    pass


def resolve_corpus(corpus: str | Path) -> Path:
    """The corpus file: an absolute/existing path, or a path relative to the shared data folder. Raises
    FileNotFoundError naming the file and the override variable, ValueError for the perplexity corpus."""
    path = Path(corpus).expanduser()
    if not path.is_absolute() and not path.exists():
        path = data_dir() / corpus
    if path.name == PERPLEXITY_CORPUS_NAME:
        raise ValueError(f"preserved_corpus {str(corpus)!r} is the held-out perplexity text; compute key statistics "
                         f"on another corpus (default {DEFAULT_CORPUS!r}) so statistics and perplexity never mix")
    if not path.is_file():
        raise FileNotFoundError(f"preserved_corpus {str(corpus)!r} not found (looked at {path}); set "
                                f"{SHARED_ENV} to the folder holding data/, or give a text file's path")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_key(model: nn.Module) -> str:
    """``<architecture fingerprint>-<sha256 of all parameters' bytes, dtype and names>`` (16 + 16 hex digits)."""
    from ..lm import model_fingerprint

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{model_fingerprint(model)}-{h.hexdigest()[:16]}"


@torch.no_grad()
def key_second_moments(model: nn.Module, module_names: Sequence[str], windows: torch.Tensor, *,
                       batch_size: int = 8, progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """({module: Σ kᵀk / n (fp64)}, n) over every position of ``windows`` (n_windows, window) token ids."""
    if windows.dim() != 2 or windows.numel() == 0:
        raise ValueError(f"windows must be a non-empty (n, L) tensor of token ids, got {tuple(windows.shape)}")
    if not module_names:
        raise ValueError("no modules given")
    modules = {n: get_module(model, n) for n in module_names}
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    count = 0
    order = {id(m): i for i, m in enumerate(model.modules())}
    last = max(modules.values(), key=lambda m: order[id(m)])

    def hook_for(name: str, module: nn.Module) -> Callable:
        def hook(_mod, args):
            k = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if name not in sums:
                sums[name] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device)
            sums[name].addmm_(k.T, k)
            if module is last:
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in modules.items()]
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(windows.shape[0]), desc="key statistics", unit="window", disable=not progress)
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Stop:
                pass
            count += int(ids.numel())
            bar.update(int(ids.shape[0]))
        bar.close()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in module_names if n not in sums]
    if missing:
        raise RuntimeError(f"the forward pass never reached {missing}")
    return {n: sums[n] / count for n in module_names}, count


def stats_file(model: nn.Module, corpus: Path, n_tokens: int, window: int,
               root: str | Path | None = None) -> Path:
    """Where the statistics for this (model, corpus, n_tokens, window) are cached."""
    base = Path(root).expanduser() if root else cache_dir() / "stats"
    digest = file_sha256(corpus)[:16]
    return base / model_key(model) / f"{corpus.stem}-{digest}-{int(n_tokens)}x{int(window)}.safetensors"


def load_or_compute_second_moments(model: nn.Module, tok, module_names: Sequence[str], *,
                                   corpus: str | Path = DEFAULT_CORPUS, n_tokens: int = 100_000,
                                   window: int = 256, root: str | Path | None = None, batch_size: int = 8,
                                   progress: bool = True, log: Callable[[str], None] | None = None
                                   ) -> dict[str, torch.Tensor]:
    """{module: C₀ (fp32, on the model's device)} from the cache, computing (and caching) what is missing."""
    if n_tokens < window or window < 2:
        raise ValueError(f"preserved_tokens={n_tokens} must be >= preserved_window={window} >= 2")
    path_corpus = resolve_corpus(corpus)
    target = stats_file(model, path_corpus, n_tokens, window, root)
    device = next(model.parameters()).device
    have: dict[str, torch.Tensor] = {}
    if target.is_file():
        tensors, meta = load_tensors(target)
        if meta.get("format") == FORMAT:
            have = dict(tensors)
    missing = [n for n in module_names if n not in have]
    if missing:
        if log is not None:
            log(f"computing key statistics for {len(missing)} module(s) on {n_tokens} tokens of {path_corpus.name} "
                f"(cached at {target})")
        windows = text_windows(tok, path_corpus, n_windows=n_tokens // window, window=window)
        new, count = key_second_moments(model, missing, windows, batch_size=batch_size, progress=progress)
        have.update({n: c.to(torch.float32).cpu() for n, c in new.items()})
        meta = {"format": FORMAT, "model_key": target.parent.name, "corpus": path_corpus.name,
                "corpus_sha256": file_sha256(path_corpus), "n_tokens": count, "window": int(window),
                "modules": sorted(have)}
        save_tensors(target, {n: t.contiguous() for n, t in have.items()}, meta)
    for n in module_names:
        if not bool(torch.isfinite(have[n]).all()):
            raise ValueError(f"key statistics for {n} in {target} are not finite; delete the file to recompute")
    return {n: have[n].to(device) for n in module_names}


class SecondMomentCache:
    """Statistics per model object (weakly referenced) and settings; see the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[weakref.ref, dict[str, torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, model: nn.Module, tok, module_names: Sequence[str], **settings) -> dict[str, torch.Tensor]:
        key = (id(model), tuple(module_names), tuple(sorted((k, str(v)) for k, v in settings.items()
                                                             if k not in ("progress", "log"))))
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is model:
                return hit[1]
        stats = load_or_compute_second_moments(model, tok, module_names, **settings)
        with self._lock:
            for stale in [k for k, (ref, _) in self._entries.items() if ref() is None]:
                del self._entries[stale]
            self._entries[key] = (weakref.ref(model), stats)
        return stats


_CACHE = SecondMomentCache()


def preserved_second_moments(model: nn.Module, tok, module_names: Sequence[str], **settings
                             ) -> dict[str, torch.Tensor]:
    """:func:`load_or_compute_second_moments`, once per model object in this process."""
    return _CACHE.get(model, tok, module_names, **settings)


def clear_second_moment_cache() -> None:
    _CACHE.clear()
