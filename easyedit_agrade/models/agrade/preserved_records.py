"""Question-style preserved keys: C₀ mixed with the key statistics of edit records' own prompts.

C₀ over ordinary text (``preserved_corpus``, Wikipedia) tells the solve which key directions prose uses; it says
little about questions. 256 zsRE edits move the model's answers to *other* questions (LS 0.62–0.65, one-hop
portability 0.331 → 0.267 whether or not the probed facts were edited: docs/agrade_scaling.md, *Why portability
falls*). ``preserved_records`` names a pool of training records (``path[@start:stop]``, the training pool syntax;
relative paths under the shared data folder) whose prompts with their **true** answers — ``prompt ground_truth``
and ``locality_prompt locality_answer``, one line each — are the second text, and the solve's C₀ becomes

    C₀ = (1 − w) · C₀(preserved_corpus) + w · C₀(record prompts),    w = ``preserved_records_weight``.

The records' text is written once to ``<stats dir>/record_text/`` (named by the source file's SHA-256 and the
range), so its statistics are cached and keyed like any corpus's (model, text SHA-256, tokens, window). Keep the
range off validation records (zsRE-val is records 9,000–9,999 of ``zsre_mend_train_10000.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ...atomic import atomic_write_text
from ...core.preserved_stats import file_sha256, preserved_second_moments
from ...dataset.readers import parse_pool_entry, read_pool
from ...hparams import HyperParamsError
from ...paths import cache_dir, data_dir

FIELD = "preserved_records"


def record_lines(records) -> list[str]:
    """``prompt ground_truth`` and ``locality_prompt locality_answer`` of each record (the parts it has), in order."""
    lines = []
    for r in records:
        for prompt, answer in ((r.prompt, r.ground_truth), (r.locality_prompt, r.locality_ground_truth)):
            if prompt and answer:
                lines.append(f"{prompt.strip()} {answer.strip()}")
    return lines


def record_text_file(spec: str, root: str | Path | None = None) -> Path:
    """The text of the records of ``spec`` (``path[@start:stop]``), written once under ``<root>/record_text/``
    (``root``: the statistics dir, default ``<cache>/stats``). Errors name ``preserved_records``."""
    try:
        path, start, stop = parse_pool_entry(str(spec))
    except ValueError as exc:
        raise HyperParamsError(f"{FIELD}: {exc}") from None
    source = Path(path).expanduser()
    if not source.is_absolute() and not source.exists():
        source = data_dir() / path
    if not source.is_file():
        raise FileNotFoundError(f"{FIELD} {str(spec)!r}: no file at {source}")
    base = Path(root).expanduser() if root else cache_dir() / "stats"
    target = base / "record_text" / f"{source.stem}-{file_sha256(source)[:16]}-{start}-{stop or 'end'}.txt"
    if not target.is_file():
        lines = record_lines(read_pool([str(spec)], lambda _path: source))
        if not lines:
            raise ValueError(f"{FIELD} {str(spec)!r}: no record there has a prompt with its true answer")
        atomic_write_text(target, "\n".join(lines) + "\n")
    return target


def records_text_for(hparams) -> Path | None:
    """The records' text of ``hparams`` (:func:`record_text_file`), or None when they are not mixed in
    (``preserved_records`` null or ``preserved_records_weight`` 0)."""
    if hparams.preserved_records is None or float(hparams.preserved_records_weight) == 0.0:
        return None
    return record_text_file(hparams.preserved_records, hparams.preserved_stats_dir)


def statistics_key(hparams) -> tuple:
    """The hparams that define C₀ (corpus, tokens, window, statistics dir, records and their weight), as a key."""
    return (str(hparams.preserved_corpus), int(hparams.preserved_tokens), int(hparams.preserved_window),
            str(hparams.preserved_stats_dir), str(hparams.preserved_records), float(hparams.preserved_records_weight))


def mixed_second_moments(model: nn.Module, tok, names: Sequence[str], hparams, *, progress: bool = True,
                         log=None) -> dict[str, torch.Tensor]:
    """C₀ per module for ``hparams``: the corpus statistics, mixed with the records' when ``preserved_records`` is
    set and ``preserved_records_weight`` > 0 (otherwise exactly the corpus statistics, the same tensors)."""
    settings = dict(n_tokens=int(hparams.preserved_tokens), window=int(hparams.preserved_window),
                    root=hparams.preserved_stats_dir, progress=progress, log=log)
    records = records_text_for(hparams)  # bad records fail before any statistics are computed
    text = preserved_second_moments(model, tok, names, corpus=hparams.preserved_corpus, **settings)
    if records is None:
        return text
    try:
        questions = preserved_second_moments(model, tok, names, corpus=records, **settings)
    except ValueError as exc:
        raise ValueError(f"{FIELD} {hparams.preserved_records!r}: {exc}") from None
    weight = float(hparams.preserved_records_weight)
    return {n: (1.0 - weight) * text[n] + weight * questions[n] for n in names}
