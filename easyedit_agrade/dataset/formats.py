"""The record formats and their registry: one parser per format, each giving :class:`~.schema.Record`\\ s.

Formats (all from EasyEdit / its sources; see the shared data's PROVENANCE.md):

* ``zsre`` — zsRE, MEND format: ``src`` -> ``alt``, ``rephrase``, ``loc``/``loc_ans``, ``subject``, ``answers``;
  optional ``portability`` (EasyEdit One-Hop: ``New Question``/``New Answer``), ``alter_subject_question`` +
  ``alternative_subject`` (Subject-Replace), ``inverse question`` (Inverse-Relation, answer: the subject);
* ``counterfact`` — CounterFact, MEND format: ``prompt`` -> ``target_new``, ``rephrase_prompt``,
  ``locality_prompt``/``locality_ground_truth``, ``subject``, ``ground_truth``;
* ``rome_counterfact`` — CounterFact in ROME's format: ``requested_rewrite{prompt (template), subject, target_new,
  target_true}``, ``paraphrase_prompts``, ``neighborhood_prompts``; optional ``portability`` (One-Hop) and
  ``alternative_subject`` (Subject-Replace);
* ``knowedit`` — KnowEdit: ``prompt`` -> ``target_new``, ``subject``, ``ground_truth``, optional
  ``rephrase_prompt``, ``portability{Reasoning, Subject_Aliasing, Logical_Generalization}`` and
  ``locality{Relation_Specificity, Forgetfulness}`` (lists of ``{prompt, ground_truth}``; a ground truth may be a
  string, a list of aliases, or a list of alias lists). Probe keys keep the file's order;
* ``mquake`` — MQuAKE cases: several ``requested_rewrite`` edits plus multi-hop ``questions``, ``new_answer``
  (+ aliases) and the chain ``new_single_hops``;
* ``convsent`` — ConvSent topics ``ent``, ``pos``, ``neg``: the edit asks :data:`CONVSENT_QUESTION` and targets one
  response of a sentiment drawn per record (seeded); the other responses of that sentiment are ``responses``, the
  opposite ones ``opposite``, and the next topic's question and first response the ``neighborhood`` probe.

``require_probes=True`` (the training readers) makes the generalisation and locality fields of zsRE/CounterFact
required and KnowEdit's ``locality`` object mandatory. :func:`get_format` names the setting in its error for an
unknown format; :func:`parse_raw` parses a list of raw records of one format (or ``"auto"``: detected per record).
"""
from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from .schema import (KNOWEDIT_LOCALITY, KNOWEDIT_PORTABILITY, NEIGHBORHOOD, MQuAKECase, Probe, Record,
                     RecordFormatError, answers_of, get_field, get_text, probe_list)

CONVSENT_QUESTION = "What do you think of {ent}?"
CONVSENT_REPHRASE = "Tell me your opinion of {ent}."


class Parsed(NamedTuple):
    records: list[Record]
    cases: list[MQuAKECase]


# ----------------------------------------------------------------------------- one parser per format
def _one_hop(rec: dict, r: Record, i: int, src: str) -> None:
    port = rec.get("portability")
    if isinstance(port, dict) and port.get("New Question") and port.get("New Answer"):
        r.portability["One-Hop"] = [Probe(port["New Question"], answers_of(port["New Answer"], f"{src}: record {i}"))]


def _mend_probes(rec: dict, r: Record, i: int, src: str, names: tuple[str, str, str], required: bool) -> None:
    """The MEND formats' rephrase and neighbourhood probe (``names``: rephrase, locality prompt, its answer)."""
    rephrase, loc_prompt, loc_answer = names
    reph = get_text(rec, rephrase, i, src, required=required)
    if reph:
        r.rephrase.append(reph)
    loc = get_text(rec, loc_prompt, i, src, required=required)
    if loc is not None:
        r.locality[NEIGHBORHOOD] = [Probe(loc, (get_text(rec, loc_answer, i, src),))]  # type: ignore[arg-type]


def parse_zsre(rec: Any, i: int, src: str, family: str = "zsre", *, require_probes: bool = False) -> Record:
    prompt = get_text(rec, "src", i, src)
    target = get_text(rec, "alt", i, src)
    subject = get_text(rec, "subject", i, src, required=False)
    answers = rec.get("answers")
    gt = answers[0] if isinstance(answers, list) and answers and isinstance(answers[0], str) else None
    r = Record(uid=f"{src}:{i}", source=src, family=family, prompt=prompt, target_new=target,  # type: ignore[arg-type]
               subject=subject, ground_truth=gt, index=i, case_id=rec.get("case_id", i))
    _mend_probes(rec, r, i, src, ("rephrase", "loc", "loc_ans"), require_probes)
    _one_hop(rec, r, i, src)
    if rec.get("alter_subject_question"):
        r.portability["Subject-Replace"] = [Probe(get_text(rec, "alter_subject_question", i, src), (target,))]  # type: ignore[arg-type]
    if rec.get("inverse question"):
        if not subject:
            raise RecordFormatError(f"{src}: record {i}: field 'subject' is needed by 'inverse question'")
        r.portability["Inverse-Relation"] = [Probe(get_text(rec, "inverse question", i, src), (subject,))]  # type: ignore[arg-type]
    return r


def parse_counterfact(rec: Any, i: int, src: str, family: str = "counterfact", *,
                      require_probes: bool = False) -> Record:
    r = Record(uid=f"{src}:{i}", source=src, family=family, prompt=get_text(rec, "prompt", i, src),  # type: ignore[arg-type]
               target_new=get_text(rec, "target_new", i, src),  # type: ignore[arg-type]
               subject=get_text(rec, "subject", i, src, required=False),
               ground_truth=get_text(rec, "ground_truth", i, src, required=False), index=i,
               case_id=rec.get("case_id", i))
    _mend_probes(rec, r, i, src, ("rephrase_prompt", "locality_prompt", "locality_ground_truth"), require_probes)
    return r


def parse_rome_counterfact(rec: Any, i: int, src: str, family: str = "counterfact", *,
                           require_probes: bool = False) -> Record:
    rw = get_field(rec, "requested_rewrite", i, src, kind=dict)
    where = f"{src}: record {i}: requested_rewrite"
    template = get_field(rw, "prompt", i, where)
    subject = get_field(rw, "subject", i, where)
    tn = get_field(rw, "target_new", i, where, kind=dict)
    tt = get_field(rw, "target_true", i, where, kind=dict, required=False) or {}
    target = get_field(tn, "str", i, f"{where}.target_new")
    if "{}" not in template:
        raise RecordFormatError(f"{where}: field 'prompt' must be a template with '{{}}' for the subject")
    r = Record(uid=f"{src}:{i}", source=src, family=family, prompt=template.format(subject), target_new=target,
               subject=subject, ground_truth=tt.get("str"), index=i, case_id=rec.get("case_id", i))
    para = rec.get("paraphrase_prompts") or []
    if isinstance(para, list) and para and isinstance(para[0], str):
        r.rephrase.append(para[0])
    neigh = rec.get("neighborhood_prompts") or []
    if isinstance(neigh, list) and neigh and tt.get("str"):
        first = neigh[0]["prompt"] if isinstance(neigh[0], dict) else neigh[0]
        r.locality[NEIGHBORHOOD] = [Probe(first, (tt["str"],))]
    if require_probes and not (r.rephrase and r.locality):
        raise RecordFormatError(f"{src}: record {i}: fields 'paraphrase_prompts' and 'neighborhood_prompts' (with "
                                f"'target_true') are needed")
    _one_hop(rec, r, i, src)
    if rec.get("alternative_subject"):
        r.portability["Subject-Replace"] = [Probe(template.format(rec["alternative_subject"]), (target,))]
    return r


def parse_knowedit(rec: Any, i: int, src: str, family: str = "knowedit", *, require_probes: bool = False) -> Record:
    r = Record(uid=f"{src}:{i}", source=src, family=family, prompt=get_text(rec, "prompt", i, src),  # type: ignore[arg-type]
               target_new=get_text(rec, "target_new", i, src),  # type: ignore[arg-type]
               subject=get_text(rec, "subject", i, src, required=False),
               ground_truth=get_text(rec, "ground_truth", i, src, required=False) if rec.get("ground_truth") else None,
               index=i, case_id=rec.get("case_id", i))
    reph = rec.get("rephrase_prompt") or rec.get("rephrase")
    if isinstance(reph, list):
        reph = reph[0] if reph else None
    if isinstance(reph, str) and reph.strip():
        r.rephrase.append(reph)
    port = get_field(rec, "portability", i, src, required=False, kind=dict) or {}
    for key in port:  # the file's order
        if key in KNOWEDIT_PORTABILITY and port[key]:
            r.portability[key] = probe_list(port[key], f"{src}: record {i}: portability.{key}")
    if require_probes and not isinstance(rec.get("locality"), dict):
        raise RecordFormatError(f"{src}: record {i}: missing field 'locality' (an object; may be empty)")
    loc = get_field(rec, "locality", i, src, required=False, kind=dict) or {}
    for key, name in KNOWEDIT_LOCALITY.items():
        if loc.get(key):
            r.locality[name] = probe_list(loc[key], f"{src}: record {i}: locality.{key}")
    return r


def parse_mquake(rec: Any, i: int, src: str) -> tuple[list[Record], MQuAKECase]:
    case_uid = f"{src}:{i}"
    rewrites = get_field(rec, "requested_rewrite", i, src, kind=list)
    if not rewrites:
        raise RecordFormatError(f"{src}: record {i}: field 'requested_rewrite' is empty")
    edits = []
    for j, rw in enumerate(rewrites):
        where = f"{src}: record {i}: requested_rewrite[{j}]"
        if not isinstance(rw, dict):
            raise RecordFormatError(f"{where}: expected an object")
        template, subject = rw.get("prompt"), rw.get("subject")
        tn = rw.get("target_new")
        target = tn.get("str") if isinstance(tn, dict) else tn
        for name, val in (("prompt", template), ("subject", subject), ("target_new", target)):
            if not isinstance(val, str) or not val.strip():
                raise RecordFormatError(f"{where}: field {name!r} is missing or empty")
        tt = rw.get("target_true")
        edits.append(Record(uid=f"{case_uid}/{j}", source=src, family="mquake",
                            prompt=template.format(subject) if "{}" in template else template,
                            target_new=target, subject=subject,
                            ground_truth=tt.get("str") if isinstance(tt, dict) else None, group=case_uid, index=i,
                            case_id=rec.get("case_id", i)))
    new_answers = answers_of([get_field(rec, "new_answer", i, src)] + list(rec.get("new_answer_alias") or []),
                             f"{src}: record {i}: new_answer")
    questions = [Probe(q, new_answers) for q in get_field(rec, "questions", i, src, kind=list)]
    hops = []
    for j, hop in enumerate(get_field(rec, "new_single_hops", i, src, kind=list)):
        where = f"{src}: record {i}: new_single_hops[{j}]"
        if not isinstance(hop, dict) or not hop.get("cloze") or not hop.get("answer"):
            raise RecordFormatError(f"{where}: needs 'cloze' and 'answer'")
        hops.append(Probe(hop["cloze"], answers_of([hop["answer"]] + list(hop.get("answer_alias") or []), where)))
    return edits, MQuAKECase(case_uid, [e.uid for e in edits], questions, hops)


def parse_convsent(raw: Sequence[Any], src: str = "<convsent>", *, seed: int = 0,
                   n_responses: int = 5) -> list[Record]:
    """One record per topic; the target sentiment is drawn per record with ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    for i, rec in enumerate(raw):
        ent = get_field(rec, "ent", i, src)
        sides = []
        for name in ("pos", "neg"):
            side = get_field(rec, name, i, src, kind=list)
            if not side:
                raise RecordFormatError(f"{src}: record {i}: field {name!r} is empty")
            sides.append(side)
        pos, neg = sides
        if not all(isinstance(x, str) for x in pos + neg):
            raise RecordFormatError(f"{src}: record {i}: fields 'pos'/'neg' must be lists of strings")
        label = "positive" if rng.random() < 0.5 else "negative"
        want, other = (pos, neg) if label == "positive" else (neg, pos)
        want = [w.strip() for w in want if w.strip()][:n_responses]
        other = [w.strip() for w in other if w.strip()][:n_responses]
        if not want or not other:
            raise RecordFormatError(f"{src}: record {i}: fields 'pos'/'neg' need non-empty responses")
        out.append(Record(uid=f"{src}:{i}", source=src, family="convsent", prompt=CONVSENT_QUESTION.format(ent=ent),
                          target_new=want[0], subject=ent, rephrase=[CONVSENT_REPHRASE.format(ent=ent)], index=i,
                          case_id=i, label=label, responses=want, opposite=other))
    for k, r in enumerate(out):  # locality: the next topic's question and one of its responses
        nxt = out[(k + 1) % len(out)]
        r.other_topic = nxt.subject
        r.locality[NEIGHBORHOOD] = [Probe(CONVSENT_QUESTION.format(ent=nxt.subject), (nxt.responses[0],))]
    return out


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class RecordFormat:
    """A registered format: ``parse_one(rec, index, source, family=..., require_probes=...)`` gives one record
    (MQuAKE: several and a case); ``parse_all`` instead parses a whole list (ConvSent links neighbours)."""

    name: str
    summary: str
    parse_one: Callable[..., Any] | None = None
    parse_all: Callable[..., list[Record]] | None = None


FORMATS: dict[str, RecordFormat] = {f.name: f for f in (
    RecordFormat("zsre", "zsRE, MEND format (src, alt, rephrase, loc, loc_ans)", parse_one=parse_zsre),
    RecordFormat("counterfact", "CounterFact, MEND format (prompt, target_new, rephrase_prompt, locality_prompt)",
                 parse_one=parse_counterfact),
    RecordFormat("rome_counterfact", "CounterFact, ROME format (requested_rewrite, paraphrase_prompts)",
                 parse_one=parse_rome_counterfact),
    RecordFormat("knowedit", "KnowEdit (prompt, target_new, portability{...}, locality{...})",
                 parse_one=parse_knowedit),
    RecordFormat("mquake", "MQuAKE cases (requested_rewrite list, questions, new_single_hops)",
                 parse_one=parse_mquake),
    RecordFormat("convsent", "ConvSent topics (ent, pos, neg)", parse_all=parse_convsent),
)}


def get_format(name: str, *, field: str = "fmt") -> RecordFormat:
    """The registered format ``name``; an unknown one raises ``ValueError`` naming the setting ``field``."""
    if name not in FORMATS:
        raise ValueError(f"{field}={name!r}: unknown record format; known formats: auto, {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_record_format(rec: Any) -> str:
    """The format of one raw record (see the module docstring; ConvSent is never guessed)."""
    if not isinstance(rec, dict):
        raise RecordFormatError(f"cannot detect the format of a {type(rec).__name__}; expected a JSON object")
    if "requested_rewrite" in rec:
        return "mquake" if isinstance(rec["requested_rewrite"], list) else "rome_counterfact"
    if "src" in rec or "alt" in rec:
        return "zsre"
    if "prompt" in rec or "target_new" in rec:
        if "locality_prompt" in rec or "locality_ground_truth" in rec:
            return "counterfact"
        if "rephrase_prompt" in rec and "portability" not in rec and "locality" not in rec:
            return "counterfact"
        return "knowedit"
    raise RecordFormatError(f"record matches no known format (zsre: src/alt; counterfact/knowedit: prompt/target_new; "
                            f"rome/mquake: requested_rewrite); fields: {sorted(rec)}")


def parse_raw(raw: Sequence[Any], fmt: str = "auto", *, source: str = "<records>", family: str | None = None,
              require_probes: bool = False, start: int = 0, limit: int | None = None, skip_invalid: bool = False,
              field: str = "fmt", **options: Any) -> Parsed:
    """Parse ``raw[start:start+limit]`` (indices in records and errors are file positions) of format ``fmt``
    (``"auto"``: detected per record). ``family`` overrides the parsers' default family. ``skip_invalid`` drops
    malformed records with one ``UserWarning`` naming how many and the first error. ``options`` go to a whole-list
    parser (ConvSent: ``seed``, ``n_responses``)."""
    if not isinstance(raw, list):
        raise RecordFormatError(f"{source}: expected a JSON list of records, got {type(raw).__name__}")
    if fmt != "auto":
        kind = get_format(fmt, field=field)
        if kind.parse_all is not None:
            return Parsed(kind.parse_all(raw, source, **options), [])
    stop = len(raw) if limit is None else min(len(raw), start + limit)
    records: list[Record] = []
    cases: list[MQuAKECase] = []
    errors: list[str] = []
    for i in range(start, stop):
        rec = raw[i]
        try:
            name = fmt
            if name == "auto":
                try:
                    name = detect_record_format(rec)
                except RecordFormatError as exc:
                    raise RecordFormatError(f"{source}: record {i}: {exc}") from None
            if name == "mquake":
                edits, case = parse_mquake(rec, i, source)
                records.extend(edits)
                cases.append(case)
            else:
                kwargs = {"family": family} if family else {}
                records.append(FORMATS[name].parse_one(rec, i, source, require_probes=require_probes, **kwargs))  # type: ignore[misc]
        except RecordFormatError as exc:
            if not skip_invalid:
                raise
            errors.append(str(exc))
    if errors:
        warnings.warn(f"{source}: skipped {len(errors)} malformed record(s), first: {errors[0]}", UserWarning,
                      stacklevel=3)
    return Parsed(records, cases)


def read_json_records(path: str | os.PathLike[str]) -> list[Any]:
    """A JSON list (or one object), or JSONL (one object per line); errors name the line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")

    def lines() -> list[Any]:
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RecordFormatError(f"{path.name}: line {n}: invalid JSON ({exc.msg})") from None
        return out

    if path.suffix == ".jsonl":
        return lines()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{"):
            return lines()  # JSONL under another suffix
        raise RecordFormatError(f"{path.name}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    return [data] if isinstance(data, dict) else data
