"""Evaluation records: the one record model of :mod:`easyedit_agrade.dataset` as the benchmark reads it, and the
benchmark pool.

``EvalRecord`` is :class:`~easyedit_agrade.dataset.schema.Record`; the parsers are the format registry's
(:mod:`easyedit_agrade.dataset.formats`), with the KnowEdit portability keys put in the fixed order
:data:`KNOWEDIT_PORTABILITY` (the registry keeps the file's order).

Formats: ``zsre``, ``counterfact``, ``rome_counterfact``, ``knowedit``, ``mquake`` (described in
:mod:`easyedit_agrade.dataset.formats`).

A malformed record raises :class:`RecordError` (= ``dataset.RecordFormatError``) naming the source, the record
index and the field.

Probe names used everywhere (EasyEdit's ``locality``/``portability`` keys in requests and results):

* locality: ``neighborhood`` (the LS probe), ``Other-Attribution`` (KnowEdit ``Relation_Specificity``),
  ``Forgetfulness`` (KnowEdit); ``Distract-Neighbor`` is derived from ``neighborhood`` by the evaluator;
* portability: ``One-Hop``, ``Subject-Replace``, ``Inverse-Relation`` (EasyEdit portability sets), ``Reasoning``,
  ``Subject_Aliasing``, ``Logical_Generalization`` (KnowEdit).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..dataset import formats as _formats
from ..dataset.formats import detect_record_format as detect_format
from ..dataset.formats import read_json_records
from ..dataset.schema import (DISTRACT_NEIGHBOR, FORGETFULNESS, KNOWEDIT_LOCALITY, KNOWEDIT_PORTABILITY, NEIGHBORHOOD,
                              OTHER_ATTRIBUTION, MQuAKECase, Probe, Record, RecordFormatError)

__all__ = ["DISTRACT_NEIGHBOR", "FORGETFULNESS", "KNOWEDIT_LOCALITY", "KNOWEDIT_PORTABILITY", "NEIGHBORHOOD",
           "OTHER_ATTRIBUTION", "DEFAULT_SOURCES", "EvalRecord", "MQuAKECase", "PARSERS", "Pool", "Probe",
           "RecordError", "SourceSpec", "build_pool", "detect_format", "load_records", "parse_counterfact",
           "parse_knowedit", "parse_mquake", "parse_records", "parse_rome_counterfact", "parse_zsre",
           "read_json_records"]

#: the benchmark's name for the one record model
EvalRecord = Record
RecordError = RecordFormatError


def knowedit_order(r: Record) -> Record:
    """Put KnowEdit's portability keys in the fixed order :data:`KNOWEDIT_PORTABILITY` (the benchmark's probe and
    report order); other keys follow in their own order."""
    if any(k in KNOWEDIT_PORTABILITY for k in r.portability):
        keys = [k for k in KNOWEDIT_PORTABILITY if k in r.portability]
        keys += [k for k in r.portability if k not in KNOWEDIT_PORTABILITY]
        r.portability = {k: r.portability[k] for k in keys}
    return r


parse_zsre = _formats.parse_zsre
parse_counterfact = _formats.parse_counterfact
parse_rome_counterfact = _formats.parse_rome_counterfact
parse_mquake = _formats.parse_mquake


def parse_knowedit(rec: Any, i: int, src: str, family: str = "knowedit") -> EvalRecord:
    return knowedit_order(_formats.parse_knowedit(rec, i, src, family))


PARSERS = {"zsre": parse_zsre, "counterfact": parse_counterfact, "rome_counterfact": parse_rome_counterfact,
           "knowedit": parse_knowedit}


def parse_records(raw: Sequence[Any], fmt: str = "auto", *, source: str = "<records>",
                  family: str | None = None) -> tuple[list[EvalRecord], list[MQuAKECase]]:
    """Parse raw records of one format (or ``"auto"``: detected per record); returns the edit records and (for
    MQuAKE) the cases."""
    records, cases = _formats.parse_raw(raw, fmt, source=source, family=family)
    return [knowedit_order(r) for r in records], cases


def load_records(path: str | os.PathLike[str], fmt: str = "auto", *, family: str | None = None,
                 source: str | None = None) -> tuple[list[EvalRecord], list[MQuAKECase]]:
    path = Path(path)
    return parse_records(read_json_records(path), fmt, source=source or path.stem, family=family)


# ----------------------------------------------------------------------------- the benchmark pool
@dataclass(frozen=True)
class SourceSpec:
    """One data source of the benchmark pool (path relative to the shared data folder)."""

    name: str
    path: str
    fmt: str
    family: str


#: the benchmark's sources, interleaved round-robin so that every prefix of the pool mixes them
DEFAULT_SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec("zsre_one_hop", "portability/One_Hop/zsre_mend_eval_portability_gpt4.json", "zsre", "zsre"),
    SourceSpec("counterfact_edit", "counterfact/counterfact-edit.json", "counterfact", "counterfact"),
    SourceSpec("knowedit_zsre", "zsre/ZsRE-test-all.json", "knowedit", "zsre"),
    SourceSpec("counterfact_one_hop", "portability/One_Hop/counterfact_portability_gpt4.json", "rome_counterfact",
               "counterfact"),
    SourceSpec("zsre_subject_replace", "portability/Subject_Replace/zsre_subject_replace.json", "zsre", "zsre"),
    SourceSpec("zsre_inverse_relation", "portability/Inverse_Relation/zsre_inverse_relation.json", "zsre", "zsre"),
    SourceSpec("counterfact_subject_replace", "portability/Subject_Replace/counterfact_subject_replace.json",
               "rome_counterfact", "counterfact"),
    SourceSpec("knowedit_wiki_counterfact", "counterfact/wiki_counterfact_train_cf.json", "knowedit",
               "wiki_counterfact"),
    SourceSpec("knowedit_wiki_recent", "recent/recent_train.json", "knowedit", "wiki_recent"),
    SourceSpec("mquake", "mquake/MQuAKE-CF-3k-v2.first13.json", "mquake", "mquake"),
)


@dataclass
class Pool:
    """The ordered edit pool; the edit set of size N is ``records[:N]`` (MQuAKE cases kept whole)."""

    records: list[EvalRecord]
    cases: dict[str, MQuAKECase]
    sources: dict[str, int]  # records per source in the pool
    notes: list[str]

    def take(self, n: int) -> list[EvalRecord]:
        return self.records[:n]

    def cases_within(self, records: Iterable[EvalRecord]) -> list[MQuAKECase]:
        """MQuAKE cases all of whose rewrites are among ``records``."""
        uids = {r.uid for r in records}
        return [c for c in self.cases.values() if all(u in uids for u in c.rewrite_uids)]


def _usable(r: EvalRecord) -> bool:
    """Records every EasyEdit baseline can take: subject present in the prompt (ROME/MEMIT locate it there)."""
    return bool(r.subject) and r.subject in r.prompt and bool(r.target_new.strip())


def build_pool(data_root: str | os.PathLike[str], sources: Sequence[SourceSpec] = DEFAULT_SOURCES, *,
               seed: int = 0, limit_per_source: int | None = None) -> Pool:
    """Load the sources, shuffle each (seeded), drop duplicates and records without their subject in the prompt,
    and interleave them round-robin. MQuAKE rewrites of one case stay adjacent (a case counts as one turn)."""
    import random

    root = Path(data_root)
    rng = random.Random(seed)
    queues: list[list[list[EvalRecord]]] = []
    cases: dict[str, MQuAKECase] = {}
    counts: dict[str, int] = {}
    notes: list[str] = []
    seen: dict[tuple[str, str], EvalRecord] = {}
    for spec in sources:
        path = root / spec.path
        if not path.exists():
            notes.append(f"source {spec.name}: {spec.path} not found, skipped")
            continue
        records, src_cases = load_records(path, spec.fmt, family=spec.family if spec.fmt != "mquake" else None,
                                          source=spec.name)
        if spec.fmt == "mquake":
            by_case = {c.uid: [r for r in records if r.group == c.uid] for c in src_cases}
            units = [by_case[c.uid] for c in src_cases if all(_usable(r) for r in by_case[c.uid])]
            dropped = len(src_cases) - len(units)
            cases.update({c.uid: c for c in src_cases if by_case[c.uid] in units})
        else:
            units = [[r] for r in records if _usable(r)]
            dropped = len(records) - len(units)
        rng.shuffle(units)
        kept = []
        merged = 0
        for unit in units:
            keys = [(r.subject or "", r.prompt) for r in unit]
            if len(unit) == 1 and keys[0] in seen:
                first = seen[keys[0]]
                if first.target_new == unit[0].target_new and first.group is None:
                    # the same edit in another source: keep one record, with the probes of both
                    for key, probes in unit[0].portability.items():
                        first.portability.setdefault(key, probes)
                    for key, probes in unit[0].locality.items():
                        first.locality.setdefault(key, probes)
                    if not first.rephrase:
                        first.rephrase.extend(unit[0].rephrase)
                    merged += 1
                else:
                    dropped += 1
                continue
            if any(k in seen for k in keys):
                dropped += 1
                continue
            seen.update(zip(keys, unit))
            kept.append(unit)
        if limit_per_source is not None:
            kept = kept[:limit_per_source]
        if dropped:
            notes.append(f"source {spec.name}: {dropped} records dropped (subject not in prompt, or a conflicting "
                         f"duplicate)")
        if merged:
            notes.append(f"source {spec.name}: {merged} records already in the pool from an earlier source; their "
                         f"probes were merged into that record")
        queues.append(kept)
        counts[spec.name] = sum(len(u) for u in kept)
    ordered: list[EvalRecord] = []
    depth = 0
    while any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q):
                ordered.extend(q[depth])
        depth += 1
    in_pool = {r.uid for r in ordered}
    cases = {uid: c for uid, c in cases.items() if all(u in in_pool for u in c.rewrite_uids)}
    return Pool(ordered, cases, counts, notes)
