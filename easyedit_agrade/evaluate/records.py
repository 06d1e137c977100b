"""Evaluation records: one normalised form for every edit-record format the harness reads.

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
  string, a list of aliases, or a list of alias lists);
* ``mquake`` — MQuAKE cases: several ``requested_rewrite`` edits plus multi-hop ``questions``, ``new_answer``
  (+ aliases) and the chain ``new_single_hops``.

A malformed record raises :class:`RecordError` naming the source, the record index and the field.

Probe names used everywhere (EasyEdit's ``locality``/``portability`` keys in requests and results):

* locality: ``neighborhood`` (the LS probe), ``Other-Attribution`` (KnowEdit ``Relation_Specificity``),
  ``Forgetfulness`` (KnowEdit); ``Distract-Neighbor`` is derived from ``neighborhood`` by the evaluator;
* portability: ``One-Hop``, ``Subject-Replace``, ``Inverse-Relation`` (EasyEdit portability sets), ``Reasoning``,
  ``Subject_Aliasing``, ``Logical_Generalization`` (KnowEdit).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence


class RecordError(ValueError):
    """A record is malformed; the message names the source, the record index and the field."""


class _EmptyAnswer(RecordError):
    """A ground truth with no non-empty answer."""


NEIGHBORHOOD = "neighborhood"
OTHER_ATTRIBUTION = "Other-Attribution"
FORGETFULNESS = "Forgetfulness"
DISTRACT_NEIGHBOR = "Distract-Neighbor"
KNOWEDIT_PORTABILITY = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
KNOWEDIT_LOCALITY = {"Relation_Specificity": OTHER_ATTRIBUTION, "Forgetfulness": FORGETFULNESS}


@dataclass(frozen=True)
class Probe:
    """A prompt and its acceptable answers; ``answers[0]`` is the one used for teacher forcing."""

    prompt: str
    answers: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass
class EvalRecord:
    """One edit ``prompt -> target_new`` with the probes that evaluate it."""

    uid: str
    source: str
    family: str
    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase: list[str] = field(default_factory=list)
    locality: dict[str, list[Probe]] = field(default_factory=dict)
    portability: dict[str, list[Probe]] = field(default_factory=dict)
    group: str | None = None  # MQuAKE case uid for its rewrites

    def to_request(self) -> dict:
        """An EasyEdit request dict (``BaseEditor._prepare_requests`` layout; lists where a key has several probes)."""
        req: dict[str, Any] = {
            "prompt": self.prompt,
            "target_new": self.target_new,
            "ground_truth": self.ground_truth if self.ground_truth is not None else "<|endoftext|>",
            "portability": {},
            "locality": {},
            "case_id": self.uid,
        }
        if self.subject is not None:
            req["subject"] = self.subject
        if self.rephrase:
            req["rephrase_prompt"] = self.rephrase[0]
        for dest, probes in (("locality", self.locality), ("portability", self.portability)):
            for key, plist in probes.items():
                if not plist:
                    continue
                if len(plist) == 1:
                    req[dest][key] = {"prompt": plist[0].prompt, "ground_truth": plist[0].answer}
                else:
                    req[dest][key] = {"prompt": [p.prompt for p in plist], "ground_truth": [p.answer for p in plist]}
        return req


@dataclass
class MQuAKECase:
    """A multi-hop case: its edits (uids of :class:`EvalRecord` rewrites) and its probes."""

    uid: str
    rewrite_uids: list[str]
    questions: list[Probe]  # the multi-hop questions, each with the new answer and its aliases
    hops: list[Probe]  # the new single-hop chain (cloze form)


# ----------------------------------------------------------------------------- field helpers
def _field(rec: Any, name: str, i: int, src: str, *, required: bool = True, kind: type | tuple = str) -> Any:
    if not isinstance(rec, dict):
        raise RecordError(f"{src}: record {i}: expected a JSON object, got {type(rec).__name__}")
    if name not in rec or rec[name] is None:
        if required:
            raise RecordError(f"{src}: record {i}: missing field {name!r}")
        return None
    value = rec[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError(f"{src}: record {i}: field {name!r} must be {want}, got {type(value).__name__}")
    if isinstance(value, str) and required and not value.strip():
        raise RecordError(f"{src}: record {i}: field {name!r} is empty")
    return value


def _text(rec: Any, name: str, i: int, src: str, *, required: bool = True) -> str | None:
    """A string field; a non-empty list of strings gives its first element (EasyEdit's convention)."""
    value = _field(rec, name, i, src, required=required, kind=(str, list))
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise RecordError(f"{src}: record {i}: field {name!r} must be a string or a non-empty list of strings")
        value = value[0]
    if value is not None and required and not value.strip():
        raise RecordError(f"{src}: record {i}: field {name!r} is empty")
    return value


def _answers(value: Any, where: str) -> tuple[str, ...]:
    """Normalise a ground truth (string | list of strings | list of alias lists) to a tuple of aliases."""
    if isinstance(value, str):
        out = [value]
    elif isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list) and all(isinstance(x, str) for x in v):
                out.extend(v)
            else:
                raise RecordError(f"{where}: ground truth must be strings or lists of strings, got {v!r}")
    else:
        raise RecordError(f"{where}: ground truth must be a string or a list, got {type(value).__name__}")
    out = [a for a in out if a.strip()]
    if not out:
        raise _EmptyAnswer(f"{where}: ground truth is empty")
    return tuple(dict.fromkeys(out))


def _probe_list(value: Any, where: str) -> list[Probe]:
    """KnowEdit probes: a list of ``{prompt, ground_truth}`` (or one such object)."""
    items = value if isinstance(value, list) else [value]
    probes = []
    for j, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError(f"{where}[{j}]: expected an object with 'prompt' and 'ground_truth'")
        prompt = item.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecordError(f"{where}[{j}]: field 'prompt' is missing or empty")
        if "ground_truth" not in item:
            raise RecordError(f"{where}[{j}]: missing field 'ground_truth'")
        try:
            answers = _answers(item["ground_truth"], f"{where}[{j}].ground_truth")
        except _EmptyAnswer:
            continue  # KnowEdit has a few probes without an answer: nothing to score, skipped
        probes.append(Probe(prompt, answers))
    return probes


# ----------------------------------------------------------------------------- formats
def parse_zsre(rec: Any, i: int, src: str, family: str = "zsre") -> EvalRecord:
    prompt = _text(rec, "src", i, src)
    target = _text(rec, "alt", i, src)
    subject = _text(rec, "subject", i, src, required=False)
    answers = rec.get("answers")
    gt = answers[0] if isinstance(answers, list) and answers and isinstance(answers[0], str) else None
    r = EvalRecord(uid=f"{src}:{i}", source=src, family=family, prompt=prompt, target_new=target, subject=subject,
                   ground_truth=gt)
    reph = _text(rec, "rephrase", i, src, required=False)
    if reph:
        r.rephrase.append(reph)
    loc = _text(rec, "loc", i, src, required=False)
    if loc is not None:
        loc_ans = _text(rec, "loc_ans", i, src)
        r.locality[NEIGHBORHOOD] = [Probe(loc, (loc_ans,))]
    port = rec.get("portability")
    if isinstance(port, dict) and port.get("New Question") and port.get("New Answer"):
        r.portability["One-Hop"] = [Probe(port["New Question"], _answers(port["New Answer"], f"{src}: record {i}"))]
    if rec.get("alter_subject_question"):
        r.portability["Subject-Replace"] = [Probe(_text(rec, "alter_subject_question", i, src), (target,))]
    if rec.get("inverse question"):
        if not subject:
            raise RecordError(f"{src}: record {i}: field 'subject' is needed by 'inverse question'")
        r.portability["Inverse-Relation"] = [Probe(_text(rec, "inverse question", i, src), (subject,))]
    return r


def parse_counterfact(rec: Any, i: int, src: str, family: str = "counterfact") -> EvalRecord:
    r = EvalRecord(uid=f"{src}:{i}", source=src, family=family, prompt=_text(rec, "prompt", i, src),
                   target_new=_text(rec, "target_new", i, src), subject=_text(rec, "subject", i, src, required=False),
                   ground_truth=_text(rec, "ground_truth", i, src, required=False))
    reph = _text(rec, "rephrase_prompt", i, src, required=False)
    if reph:
        r.rephrase.append(reph)
    loc = _text(rec, "locality_prompt", i, src, required=False)
    if loc is not None:
        r.locality[NEIGHBORHOOD] = [Probe(loc, (_text(rec, "locality_ground_truth", i, src),))]
    return r


def parse_rome_counterfact(rec: Any, i: int, src: str, family: str = "counterfact") -> EvalRecord:
    rw = _field(rec, "requested_rewrite", i, src, kind=dict)
    where = f"{src}: record {i}: requested_rewrite"
    template = _field(rw, "prompt", i, where)
    subject = _field(rw, "subject", i, where)
    tn = _field(rw, "target_new", i, where, kind=dict)
    tt = _field(rw, "target_true", i, where, kind=dict, required=False) or {}
    target = _field(tn, "str", i, f"{where}.target_new")
    if "{}" not in template:
        raise RecordError(f"{where}: field 'prompt' must be a template with '{{}}' for the subject")
    r = EvalRecord(uid=f"{src}:{i}", source=src, family=family, prompt=template.format(subject),
                   target_new=target, subject=subject, ground_truth=tt.get("str"))
    para = rec.get("paraphrase_prompts") or []
    if isinstance(para, list) and para and isinstance(para[0], str):
        r.rephrase.append(para[0])
    neigh = rec.get("neighborhood_prompts") or []
    if isinstance(neigh, list) and neigh and tt.get("str"):
        first = neigh[0]["prompt"] if isinstance(neigh[0], dict) else neigh[0]
        r.locality[NEIGHBORHOOD] = [Probe(first, (tt["str"],))]
    port = rec.get("portability")
    if isinstance(port, dict) and port.get("New Question") and port.get("New Answer"):
        r.portability["One-Hop"] = [Probe(port["New Question"], _answers(port["New Answer"], f"{src}: record {i}"))]
    if rec.get("alternative_subject"):
        r.portability["Subject-Replace"] = [Probe(template.format(rec["alternative_subject"]), (target,))]
    return r


def parse_knowedit(rec: Any, i: int, src: str, family: str = "knowedit") -> EvalRecord:
    r = EvalRecord(uid=f"{src}:{i}", source=src, family=family, prompt=_text(rec, "prompt", i, src),
                   target_new=_text(rec, "target_new", i, src), subject=_text(rec, "subject", i, src, required=False),
                   ground_truth=_text(rec, "ground_truth", i, src, required=False) if rec.get("ground_truth") else None)
    reph = rec.get("rephrase_prompt") or rec.get("rephrase")
    if isinstance(reph, list):
        reph = reph[0] if reph else None
    if isinstance(reph, str) and reph.strip():
        r.rephrase.append(reph)
    port = _field(rec, "portability", i, src, required=False, kind=dict) or {}
    for key in KNOWEDIT_PORTABILITY:
        if port.get(key):
            r.portability[key] = _probe_list(port[key], f"{src}: record {i}: portability.{key}")
    loc = _field(rec, "locality", i, src, required=False, kind=dict) or {}
    for key, name in KNOWEDIT_LOCALITY.items():
        if loc.get(key):
            r.locality[name] = _probe_list(loc[key], f"{src}: record {i}: locality.{key}")
    return r


def parse_mquake(rec: Any, i: int, src: str) -> tuple[list[EvalRecord], MQuAKECase]:
    case_uid = f"{src}:{i}"
    rewrites = _field(rec, "requested_rewrite", i, src, kind=list)
    if not rewrites:
        raise RecordError(f"{src}: record {i}: field 'requested_rewrite' is empty")
    edits = []
    for j, rw in enumerate(rewrites):
        where = f"{src}: record {i}: requested_rewrite[{j}]"
        if not isinstance(rw, dict):
            raise RecordError(f"{where}: expected an object")
        template, subject = rw.get("prompt"), rw.get("subject")
        tn = rw.get("target_new")
        target = tn.get("str") if isinstance(tn, dict) else tn
        for name, val in (("prompt", template), ("subject", subject), ("target_new", target)):
            if not isinstance(val, str) or not val.strip():
                raise RecordError(f"{where}: field {name!r} is missing or empty")
        tt = rw.get("target_true")
        edits.append(EvalRecord(uid=f"{case_uid}/{j}", source=src, family="mquake",
                                prompt=template.format(subject) if "{}" in template else template,
                                target_new=target, subject=subject,
                                ground_truth=tt.get("str") if isinstance(tt, dict) else None, group=case_uid))
    new_answers = _answers([_field(rec, "new_answer", i, src)] + list(rec.get("new_answer_alias") or []),
                           f"{src}: record {i}: new_answer")
    questions = [Probe(q, new_answers) for q in _field(rec, "questions", i, src, kind=list)]
    hops = []
    for j, hop in enumerate(_field(rec, "new_single_hops", i, src, kind=list)):
        where = f"{src}: record {i}: new_single_hops[{j}]"
        if not isinstance(hop, dict) or not hop.get("cloze") or not hop.get("answer"):
            raise RecordError(f"{where}: needs 'cloze' and 'answer'")
        hops.append(Probe(hop["cloze"], _answers([hop["answer"]] + list(hop.get("answer_alias") or []), where)))
    return edits, MQuAKECase(case_uid, [e.uid for e in edits], questions, hops)


def detect_format(rec: Any) -> str:
    """The format of one raw record (see the module docstring)."""
    if not isinstance(rec, dict):
        raise RecordError(f"cannot detect the format of a {type(rec).__name__}; expected a JSON object")
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
    raise RecordError(f"record matches no known format (zsre: src/alt; counterfact/knowedit: prompt/target_new; "
                      f"rome/mquake: requested_rewrite); fields: {sorted(rec)}")


PARSERS = {"zsre": parse_zsre, "counterfact": parse_counterfact, "rome_counterfact": parse_rome_counterfact,
           "knowedit": parse_knowedit}


def parse_records(raw: Sequence[Any], fmt: str = "auto", *, source: str = "<records>",
                  family: str | None = None) -> tuple[list[EvalRecord], list[MQuAKECase]]:
    """Parse raw records of one format; returns the edit records and (for MQuAKE) the cases."""
    if not isinstance(raw, list):
        raise RecordError(f"{source}: expected a JSON list of records, got {type(raw).__name__}")
    records: list[EvalRecord] = []
    cases: list[MQuAKECase] = []
    for i, rec in enumerate(raw):
        kind = fmt
        if kind == "auto":
            try:
                kind = detect_format(rec)
            except RecordError as exc:
                raise RecordError(f"{source}: record {i}: {exc}") from None
        if kind == "mquake":
            edits, case = parse_mquake(rec, i, source)
            records.extend(edits)
            cases.append(case)
        elif kind in PARSERS:
            kwargs = {"family": family} if family else {}
            records.append(PARSERS[kind](rec, i, source, **kwargs))
        else:
            raise ValueError(f"unknown record format {fmt!r}; expected auto, {', '.join(PARSERS)} or mquake")
    return records, cases


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
                    raise RecordError(f"{path.name}: line {n}: invalid JSON ({exc.msg})") from None
        return out

    if path.suffix == ".jsonl":
        return lines()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{"):
            return lines()  # JSONL under another suffix
        raise RecordError(f"{path.name}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    return [data] if isinstance(data, dict) else data


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
