"""The one record model: :class:`Record`, its :class:`Probe`\\ s, and the field checks every format parser uses.

A :class:`Record` is one edit ``prompt -> target_new`` with everything any consumer needs from the source file:

* ``rephrase`` — equivalent prompts (generalisation probes);
* ``locality`` / ``portability`` — named lists of :class:`Probe` (EasyEdit's request keys, see
  :data:`NEIGHBORHOOD` and friends);
* ``subject``, ``ground_truth`` (the old answer), ``case_id`` and ``index`` (position in the file), ``uid``
  (``"<source>:<index>"``), ``family`` (the dataset family it counts under), ``group`` (an MQuAKE case);
* task fields for edits that are not a fact: ConvSent's ``label`` (target sentiment), ``responses`` (target-sentiment
  responses, ``target_new`` is the first), ``opposite`` (the other sentiment) and ``other_topic``.

The AGRADE trainer's flat :class:`~.readers.EditRecord`, the benchmark's ``EvalRecord`` and InstructEdit's
``TaskRecord`` are views of it. A malformed record raises :class:`RecordFormatError` naming the source, the record
index and the field. No method-specific logic lives here (``dataset/`` knows no method).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: locality keys (EasyEdit's ``locality`` request keys)
NEIGHBORHOOD = "neighborhood"
OTHER_ATTRIBUTION = "Other-Attribution"
FORGETFULNESS = "Forgetfulness"
DISTRACT_NEIGHBOR = "Distract-Neighbor"  # derived from ``neighborhood`` by the evaluator, never parsed
#: KnowEdit's portability keys, and its locality keys with the names they get here
KNOWEDIT_PORTABILITY = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
KNOWEDIT_LOCALITY = {"Relation_Specificity": OTHER_ATTRIBUTION, "Forgetfulness": FORGETFULNESS}


class RecordFormatError(ValueError):
    """A record is malformed; the message names the source, the record index and the field."""


class EmptyAnswerError(RecordFormatError):
    """A ground truth with no non-empty answer."""


@dataclass(frozen=True)
class Probe:
    """A prompt and its acceptable answers; ``answers[0]`` is the one used for teacher forcing."""

    prompt: str
    answers: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass
class Record:
    """One edit ``prompt -> target_new`` with the probes that evaluate it (see the module docstring)."""

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
    index: int = -1
    case_id: Any = None
    label: str | None = None
    responses: list[str] = field(default_factory=list)
    opposite: list[str] = field(default_factory=list)
    other_topic: str | None = None

    def first_probe(self, *keys: str, kind: str = "locality") -> Probe | None:
        """The first probe under the first of ``keys`` that has one (``kind``: locality or portability)."""
        probes = self.locality if kind == "locality" else self.portability
        for key in keys:
            if probes.get(key):
                return probes[key][0]
        return None

    def to_request(self) -> dict:
        """An EasyEdit request dict (``BaseEditor._prepare_requests`` layout; lists where a key has several probes)."""
        req = easyedit_request(self.prompt, self.target_new, self.ground_truth, case_id=self.uid, subject=self.subject,
                               rephrase_prompt=self.rephrase[0] if self.rephrase else None)
        for dest, probes in (("locality", self.locality), ("portability", self.portability)):
            for key, plist in probes.items():
                if not plist:
                    continue
                if len(plist) == 1:
                    req[dest][key] = {"prompt": plist[0].prompt, "ground_truth": plist[0].answer}
                else:
                    req[dest][key] = {"prompt": [p.prompt for p in plist], "ground_truth": [p.answer for p in plist]}
        return req


def easyedit_request(prompt: str, target_new: str, ground_truth: str | None = None, *,
                     neighborhood: tuple[str | None, str | None] = (None, None), **fields: Any) -> dict:
    """An EasyEdit request dict (``BaseEditor._prepare_requests`` layout): ``prompt``, ``target_new``,
    ``ground_truth`` (EasyEdit's ``"<|endoftext|>"`` when unknown), empty ``portability``/``locality``, then the
    ``fields`` that are not ``None``; ``neighborhood=(prompt, answer)`` fills ``locality["neighborhood"]``."""
    req: dict[str, Any] = {"prompt": prompt, "target_new": target_new,
                           "ground_truth": ground_truth if ground_truth is not None else "<|endoftext|>",
                           "portability": {}, "locality": {}}
    req.update({k: v for k, v in fields.items() if v is not None})
    loc_prompt, loc_answer = neighborhood
    if loc_prompt is not None and loc_answer is not None:
        req["locality"][NEIGHBORHOOD] = {"prompt": loc_prompt, "ground_truth": loc_answer}
    return req


@dataclass
class MQuAKECase:
    """A multi-hop case: its edits (uids of :class:`Record` rewrites) and its probes."""

    uid: str
    rewrite_uids: list[str]
    questions: list[Probe]  # the multi-hop questions, each with the new answer and its aliases
    hops: list[Probe]  # the new single-hop chain (cloze form)


# ----------------------------------------------------------------------------- field checks
def _type_name(kind: type | tuple) -> str:
    return kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)


def get_field(rec: Any, name: str, i: int, src: str, *, required: bool = True, kind: type | tuple = str) -> Any:
    """``rec[name]`` checked for presence (``required``), type (``kind``) and, for a required string, non-blankness."""
    if not isinstance(rec, dict):
        raise RecordFormatError(f"{src}: record {i}: expected a JSON object, got {type(rec).__name__}")
    if name not in rec or rec[name] is None:
        if required:
            raise RecordFormatError(f"{src}: record {i}: missing field {name!r}")
        return None
    value = rec[name]
    if not isinstance(value, kind):
        raise RecordFormatError(f"{src}: record {i}: field {name!r} must be {_type_name(kind)}, "
                                f"got {type(value).__name__}")
    if isinstance(value, str) and required and not value.strip():
        raise RecordFormatError(f"{src}: record {i}: field {name!r} is empty")
    return value


def get_text(rec: Any, name: str, i: int, src: str, *, required: bool = True) -> str | None:
    """A string field; a non-empty list of strings gives its first element (EasyEdit's convention)."""
    if isinstance(rec, dict) and not isinstance(rec.get(name), (str, list, type(None))):
        raise RecordFormatError(f"{src}: record {i}: field {name!r} must be a string or a list of strings, "
                                f"got {type(rec[name]).__name__}")
    value = get_field(rec, name, i, src, required=required, kind=(str, list))
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise RecordFormatError(f"{src}: record {i}: field {name!r} must be a string or a non-empty list of "
                                    f"strings")
        value = value[0]
    if value is not None and required and not value.strip():
        raise RecordFormatError(f"{src}: record {i}: field {name!r} is empty")
    return value


def answers_of(value: Any, where: str) -> tuple[str, ...]:
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
                raise RecordFormatError(f"{where}: ground truth must be strings or lists of strings, got {v!r}")
    else:
        raise RecordFormatError(f"{where}: ground truth must be a string or a list, got {type(value).__name__}")
    out = [a for a in out if a.strip()]
    if not out:
        raise EmptyAnswerError(f"{where}: ground truth is empty")
    return tuple(dict.fromkeys(out))


def probe_list(value: Any, where: str) -> list[Probe]:
    """KnowEdit probes: a list of ``{prompt, ground_truth}`` (or one such object); probes without an answer are
    skipped (KnowEdit has a few: nothing to score)."""
    items = value if isinstance(value, list) else [value]
    probes = []
    for j, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordFormatError(f"{where}[{j}]: expected an object with 'prompt' and 'ground_truth'")
        prompt = item.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecordFormatError(f"{where}[{j}]: field 'prompt' is missing or empty")
        if "ground_truth" not in item:
            raise RecordFormatError(f"{where}[{j}]: missing field 'ground_truth'")
        try:
            answers = answers_of(item["ground_truth"], f"{where}[{j}].ground_truth")
        except EmptyAnswerError:
            continue
        probes.append(Probe(prompt, answers))
    return probes
