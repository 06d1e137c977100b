"""The AGRADE-style training readers: files of edit records as flat :class:`EditRecord`\ s, and the mixed pool.

:class:`EditRecord` is a flat, frozen view of the one record model (:class:`~.schema.Record`): one edit with one
equivalent (``rephrase_prompt``) and one unrelated (``locality_prompt -> locality_ground_truth``) probe. The files
are parsed by the format registry (:mod:`.formats`) with ``require_probes=True``, so a zsRE-MEND or CounterFact-MEND
record without its rephrase or locality fields is an error:

* zsRE, MEND format (``zsre_mend_*.json``, EasyEdit's ``ZsreDataset``): ``src`` (prompt), ``alt`` (new target),
  ``rephrase``, ``loc`` (``"nq question: …"``), ``loc_ans``; optional ``subject``, ``answers`` (old answer list).
* CounterFact, MEND format (``counterfact-{train,val,edit}.json``, EasyEdit's ``CounterFactDataset``):
  ``prompt``, ``target_new``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``; optional
  ``subject``, ``ground_truth``, ``case_id``.

A malformed record raises :class:`RecordFormatError` naming the file, the record index and the field.
No method-specific logic lives here (``dataset/`` knows no method).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .formats import parse_raw
from .schema import FORGETFULNESS, NEIGHBORHOOD, OTHER_ATTRIBUTION, Record, RecordFormatError, easyedit_request

#: ``"auto"`` (zsRE or CounterFact-MEND, from the first record) or any name in :data:`.formats.FORMATS`
Format = str


@dataclass(frozen=True)
class EditRecord:
    """One edit: ``prompt -> target_new``, with an equivalent (``rephrase_prompt``) and an unrelated
    (``locality_prompt -> locality_ground_truth``) probe. ``index`` is the position in the source file."""

    prompt: str
    target_new: str
    rephrase_prompt: str | None = None
    locality_prompt: str | None = None
    locality_ground_truth: str | None = None
    subject: str | None = None
    ground_truth: str | None = None
    case_id: Any = None
    index: int = -1
    source: str = ""

    def to_request(self) -> dict:
        """An EasyEdit request dict (``BaseEditor._prepare_requests`` layout)."""
        return easyedit_request(self.prompt, self.target_new, self.ground_truth, subject=self.subject,
                                rephrase_prompt=self.rephrase_prompt,
                                neighborhood=(self.locality_prompt, self.locality_ground_truth))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, r: Record) -> "EditRecord":
        """The flat view of a :class:`~.schema.Record`: its first rephrase and its first locality probe."""
        loc = r.first_probe(NEIGHBORHOOD, OTHER_ATTRIBUTION, FORGETFULNESS)
        return cls(prompt=r.prompt, target_new=r.target_new, rephrase_prompt=r.rephrase[0] if r.rephrase else None,
                   locality_prompt=loc.prompt if loc else None, locality_ground_truth=loc.answer if loc else None,
                   subject=r.subject, ground_truth=r.ground_truth, case_id=r.case_id, index=r.index,
                   source=r.source)


def detect_format(records: Sequence[Any]) -> str:
    """``"zsre"`` if the first record has ``src``/``alt``, ``"counterfact"`` if it has ``prompt``/``target_new``."""
    if not records or not isinstance(records[0], dict):
        raise RecordFormatError("cannot detect the record format of an empty or non-object list")
    first = records[0]
    if "src" in first and "alt" in first:
        return "zsre"
    if "prompt" in first and "target_new" in first:
        return "counterfact"
    raise RecordFormatError(f"record 0 matches neither zsRE (src, alt) nor CounterFact (prompt, target_new): "
                            f"fields {sorted(first)}")


def parse_records(raw: Sequence[Any], fmt: Format = "auto", *, source: str = "<records>",
                  start: int = 0, limit: int | None = None, skip_invalid: bool = False) -> list[EditRecord]:
    """Parse raw JSON records (``raw[start:start+limit]``); indices in errors/records are file positions.

    ``skip_invalid=True`` drops malformed records (e.g. the few zsRE train records with an empty ``alt``) with
    one ``UserWarning`` naming how many and the first error, instead of raising.
    """
    if not isinstance(raw, list):
        raise RecordFormatError(f"{source}: expected a JSON list of records, got {type(raw).__name__}")
    kind = detect_format(raw) if fmt == "auto" else fmt
    parsed = parse_raw(raw, kind, source=source, require_probes=True, start=start, limit=limit,
                       skip_invalid=skip_invalid)
    return [EditRecord.from_record(r) for r in parsed.records]


def read_records(path: str | os.PathLike[str], fmt: Format = "auto", *, start: int = 0,
                 limit: int | None = None, skip_invalid: bool = False) -> list[EditRecord]:
    """Read a JSON file of zsRE-MEND or CounterFact-MEND records (``fmt="auto"`` detects which)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return parse_records(raw, fmt, source=path.name, start=start, limit=limit, skip_invalid=skip_invalid)


def parse_pool_entry(spec: str) -> tuple[str, int, int | None]:
    """``"path[@start:stop]"`` → (path, start, stop or None), e.g. ``zsre/zsre_mend_train_10000.json@0:9000``."""
    path, at, span = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if not at:
        return spec, 0, None
    lo, colon, hi = span.partition(":")
    try:
        start, stop = int(lo or 0), (int(hi) if hi else None)
    except ValueError:
        raise ValueError(f"pool entry {spec!r}: expected PATH@START:STOP with integers") from None
    if not colon or start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"pool entry {spec!r}: expected PATH@START:STOP with 0 <= START < STOP")
    return path, start, stop


def read_pool(specs: Sequence[str], resolve=Path, *, fmt: Format = "auto", balance: bool = True) -> list[EditRecord]:
    """A mixed pool from several files (``path[@start:stop]`` each; malformed records skipped with a warning).
    ``fmt`` applies to a single source; with several, each file's format is detected on its own. ``balance``: every source is cut to the smallest one's size (the first records),
    so a uniformly random batch draws each source equally often. Sources are interleaved round-robin."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [str(specs)]
    sources = []
    for spec in specs:
        path, start, stop = parse_pool_entry(str(spec))
        limit = None if stop is None else stop - start
        sources.append(read_records(resolve(path), fmt if len(specs) == 1 else "auto", start=start, limit=limit,
                                    skip_invalid=True))
    if not sources or not all(sources):
        raise ValueError(f"training pool {list(specs)}: every source must hold at least one record")
    if len(sources) == 1:
        return sources[0]
    if balance:
        n = min(len(s) for s in sources)
        sources = [s[:n] for s in sources]
    out: list[EditRecord] = []
    for i in range(max(len(s) for s in sources)):
        out.extend(s[i] for s in sources if i < len(s))
    return out


def read_zsre_mend(path: str | os.PathLike[str], *, start: int = 0, limit: int | None = None,
                   skip_invalid: bool = False) -> list[EditRecord]:
    return read_records(path, "zsre", start=start, limit=limit, skip_invalid=skip_invalid)


def read_counterfact_mend(path: str | os.PathLike[str], *, start: int = 0, limit: int | None = None,
                          skip_invalid: bool = False) -> list[EditRecord]:
    return read_records(path, "counterfact", start=start, limit=limit, skip_invalid=skip_invalid)


def check_request(req: Any, i: int) -> None:
    """An EasyEdit request dict needs non-empty string ``prompt`` and ``target_new``; the error names ``i``."""
    if not isinstance(req, dict):
        raise RecordFormatError(f"request {i}: expected a dict, got {type(req).__name__}")
    for key in ("prompt", "target_new"):
        if not isinstance(req.get(key), str) or not req[key].strip():
            raise RecordFormatError(f"request {i}: field {key!r} is missing or empty")


def records_from_requests(requests: Sequence[dict]) -> list[EditRecord]:
    """EasyEdit request dicts (``prompt``, ``target_new``, optional ``rephrase_prompt``, ``locality``) -> records."""
    out = []
    for i, req in enumerate(requests):
        check_request(req, i)
        loc_p = loc_a = None
        loc = req.get("locality") or {}
        if isinstance(loc, dict) and loc:
            first = next(iter(loc.values()))
            if isinstance(first, dict):
                loc_p, loc_a = first.get("prompt"), first.get("ground_truth")
                if isinstance(loc_p, list):
                    loc_p = loc_p[0] if loc_p else None
                if isinstance(loc_a, list):
                    loc_a = loc_a[0] if loc_a else None
        reph = req.get("rephrase_prompt")
        if isinstance(reph, list):
            reph = reph[0] if reph else None
        out.append(EditRecord(prompt=req["prompt"], target_new=req["target_new"], rephrase_prompt=reph,
                              locality_prompt=loc_p, locality_ground_truth=loc_a, subject=req.get("subject"),
                              ground_truth=req.get("ground_truth"), case_id=req.get("case_id", i), index=i,
                              source="<requests>"))
    return out
