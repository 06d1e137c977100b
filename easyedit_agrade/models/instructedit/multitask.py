"""The InstructEdit multi-task data: per-task readers, one record type, train/test splits and seeded balancing.

Tasks and files (relative to the shared data folder):

* ``counterfact`` — MEND CounterFact: ``counterfact/counterfact-train.json`` (train), ``counterfact-val.json``
  (test). prompt → target_new, rephrase_prompt, locality_prompt → locality_ground_truth.
* ``wikirecent`` — KnowEdit WikiRecent ``recent/recent_train.json`` (570 records; the test file is not available,
  so a seeded split keeps ``recent_test_size`` records for testing). No rephrase; locality = the first
  ``Relation_Specificity`` item (first alias; 155 records have none); portability items when present.
* ``convsent`` — ConvSent ``convsent/blender_val.json`` (train) and ``blender_test.json`` (test): ``ent``, ``pos``,
  ``neg``. A record's edit asks "What do you think of {ent}?" and targets one response of a sentiment (chosen per
  record, seeded); the other responses of that sentiment serve as the generalisation probe, the opposite ones for
  the log-likelihood reliability test, and a different topic's question for locality.
* ``zsre`` — the held-out task: ``portability/One_Hop/zsre_mend_eval_portability_gpt4.json`` (never trained on).

:class:`MultiTaskSampler` draws training edits as a pure function of ``(seed, step)``: with ``balance`` every task
is equally likely (or ``task_weights``), without it records are drawn uniformly from the concatenation (so the
natural task sizes set the proportions — the imbalance of the paper's Finding 3).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...dataset.readers import RecordFormatError

CONVSENT_QUESTION = "What do you think of {ent}?"
CONVSENT_REPHRASE = "Tell me your opinion of {ent}."


@dataclass
class TaskRecord:
    """One edit of one task. ``portability`` is a list of ``(prompt, answer)``. ConvSent records also carry
    ``label`` (positive/negative), ``responses`` (target-sentiment responses; ``target_new`` is the first) and
    ``opposite`` (responses of the other sentiment); ``other_topic`` is a different record's entity."""

    task: str
    prompt: str
    target_new: str
    rephrase_prompt: str | None = None
    locality_prompt: str | None = None
    locality_ground_truth: str | None = None
    portability: list[tuple[str, str]] = field(default_factory=list)
    subject: str | None = None
    label: str | None = None
    responses: list[str] = field(default_factory=list)
    opposite: list[str] = field(default_factory=list)
    other_topic: str | None = None
    index: int = -1
    source: str = ""

    def to_request(self) -> dict:
        """An EasyEdit request dict (unwrapped prompts; see :func:`.instructions.wrap_requests`)."""
        req: dict[str, Any] = {"prompt": self.prompt, "target_new": self.target_new, "ground_truth": "<|endoftext|>",
                               "portability": {}, "locality": {}, "task": self.task}
        if self.subject is not None:
            req["subject"] = self.subject
        if self.label is not None:
            req["label"] = self.label
        if self.rephrase_prompt is not None:
            req["rephrase_prompt"] = self.rephrase_prompt
        if self.locality_prompt is not None and self.locality_ground_truth is not None:
            req["locality"] = {"neighborhood": {"prompt": self.locality_prompt,
                                                "ground_truth": self.locality_ground_truth}}
        for i, (p, a) in enumerate(self.portability):
            req["portability"][f"port_{i}"] = {"prompt": p, "ground_truth": a}
        return req


def _need(rec: Any, key: str, i: int, src: str, kind: type | tuple = str) -> Any:
    if not isinstance(rec, dict):
        raise RecordFormatError(f"{src}: record {i}: expected an object, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        raise RecordFormatError(f"{src}: record {i}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, kind):
        raise RecordFormatError(f"{src}: record {i}: field {key!r} has type {type(v).__name__}")
    if isinstance(v, (str, list)) and not v:
        raise RecordFormatError(f"{src}: record {i}: field {key!r} is empty")
    return v


def _first_alias(gt: Any) -> str | None:
    while isinstance(gt, list):
        if not gt:
            return None
        gt = gt[0]
    return gt if isinstance(gt, str) and gt.strip() else None


def parse_counterfact(raw: Sequence[Any], src: str = "<counterfact>") -> list[TaskRecord]:
    out = []
    for i, r in enumerate(raw):
        out.append(TaskRecord("counterfact", _need(r, "prompt", i, src), _need(r, "target_new", i, src),
                              rephrase_prompt=_need(r, "rephrase_prompt", i, src),
                              locality_prompt=_need(r, "locality_prompt", i, src),
                              locality_ground_truth=_need(r, "locality_ground_truth", i, src),
                              subject=r.get("subject"), index=i, source=src))
    return out


def parse_wikirecent(raw: Sequence[Any], src: str = "<wikirecent>") -> list[TaskRecord]:
    out = []
    for i, r in enumerate(raw):
        prompt, target = _need(r, "prompt", i, src), _need(r, "target_new", i, src)
        if not isinstance(r, dict) or not isinstance(r.get("locality"), dict):
            raise RecordFormatError(f"{src}: record {i}: missing field 'locality' (an object; may be empty)")
        loc = r["locality"]
        loc_p = loc_a = None
        for key in ("Relation_Specificity", "Forgetfulness"):
            for item in loc.get(key) or []:
                if isinstance(item, dict) and isinstance(item.get("prompt"), str) and _first_alias(item.get("ground_truth")):
                    loc_p, loc_a = item["prompt"], _first_alias(item["ground_truth"])
                    break
            if loc_p:
                break
        port = []
        for key, items in (r.get("portability") or {}).items():
            for item in items or []:
                a = _first_alias(item.get("ground_truth")) if isinstance(item, dict) else None
                if a and isinstance(item.get("prompt"), str):
                    port.append((item["prompt"], a))
        out.append(TaskRecord("wikirecent", prompt, target, locality_prompt=loc_p, locality_ground_truth=loc_a,
                              portability=port[:2], subject=r.get("subject"), index=i, source=src))
    return out


def parse_convsent(raw: Sequence[Any], src: str = "<convsent>", seed: int = 0, n_responses: int = 5) -> list[TaskRecord]:
    """One record per topic; the target sentiment is drawn per record with ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    ents = []
    for i, r in enumerate(raw):
        ent = _need(r, "ent", i, src)
        pos, neg = _need(r, "pos", i, src, list), _need(r, "neg", i, src, list)
        if not all(isinstance(x, str) for x in pos + neg):
            raise RecordFormatError(f"{src}: record {i}: fields 'pos'/'neg' must be lists of strings")
        label = "positive" if rng.random() < 0.5 else "negative"
        want, other = (pos, neg) if label == "positive" else (neg, pos)
        want = [w.strip() for w in want if w.strip()][:n_responses]
        other = [w.strip() for w in other if w.strip()][:n_responses]
        if not want or not other:
            raise RecordFormatError(f"{src}: record {i}: fields 'pos'/'neg' need non-empty responses")
        ents.append(ent)
        out.append(TaskRecord("convsent", CONVSENT_QUESTION.format(ent=ent), want[0],
                              rephrase_prompt=CONVSENT_REPHRASE.format(ent=ent), subject=ent, label=label,
                              responses=want, opposite=other, index=i, source=src))
    for k, rec in enumerate(out):  # locality: the next topic's question and one of its responses (unwrapped)
        j = (k + 1) % len(out)
        rec.other_topic = out[j].subject
        rec.locality_prompt = CONVSENT_QUESTION.format(ent=out[j].subject)
        rec.locality_ground_truth = out[j].responses[0]
    return out


def parse_zsre(raw: Sequence[Any], src: str = "<zsre>") -> list[TaskRecord]:
    out = []
    for i, r in enumerate(raw):
        port = []
        p = r.get("portability") if isinstance(r, dict) else None
        if isinstance(p, dict) and isinstance(p.get("New Question"), str) and isinstance(p.get("New Answer"), str):
            port.append((p["New Question"], p["New Answer"]))
        out.append(TaskRecord("zsre", _need(r, "src", i, src), _need(r, "alt", i, src),
                              rephrase_prompt=_need(r, "rephrase", i, src), locality_prompt=_need(r, "loc", i, src),
                              locality_ground_truth=_need(r, "loc_ans", i, src), portability=port,
                              subject=r.get("subject"), index=i, source=src))
    return out


PARSERS = {"counterfact": parse_counterfact, "wikirecent": parse_wikirecent, "convsent": parse_convsent,
           "zsre": parse_zsre}

#: default files: task -> (train, test); WikiRecent is split from one file
DEFAULT_FILES = {
    "counterfact": ("counterfact/counterfact-train.json", "counterfact/counterfact-val.json"),
    "wikirecent": ("recent/recent_train.json", "recent/recent_train.json"),
    "convsent": ("convsent/blender_val.json", "convsent/blender_test.json"),
    "zsre": (None, "portability/One_Hop/zsre_mend_eval_portability_gpt4.json"),
}


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    from ...paths import data_file

    return data_file(path)


def read_task(task: str, path: str | os.PathLike[str], *, seed: int = 0) -> list[TaskRecord]:
    if task not in PARSERS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(PARSERS)}")
    p = _resolve(str(path))
    with open(p, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, list):
        raise RecordFormatError(f"{p.name}: expected a JSON list of records")
    if task == "convsent":
        return parse_convsent(raw, p.name, seed=seed)
    return PARSERS[task](raw, p.name)


def wikirecent_split(records: list[TaskRecord], test_size: int, seed: int = 0) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """Seeded split of the single WikiRecent file: (train, test)."""
    order = list(range(len(records)))
    random.Random(seed + 7919).shuffle(order)
    test = sorted(order[:test_size])
    ts = set(test)
    return [r for i, r in enumerate(records) if i not in ts], [records[i] for i in test]


def load_split(task: str, split: str, *, seed: int = 0, recent_test_size: int = 100,
               path: str | None = None) -> list[TaskRecord]:
    """Train or test records of ``task`` from the default files (or ``path``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if task not in DEFAULT_FILES:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(DEFAULT_FILES)}")
    train_f, test_f = DEFAULT_FILES[task]
    f = path or (train_f if split == "train" else test_f)
    if f is None:
        raise ValueError(f"task {task!r} is held out: it has no training split")
    recs = read_task(task, f, seed=seed)
    if task == "wikirecent" and path is None:
        tr, te = wikirecent_split(recs, recent_test_size, seed=0)
        return tr if split == "train" else te
    return recs


class MultiTaskSampler:
    """Seeded draws of (record, description index) from several tasks; a pure function of ``(seed, step)``."""

    def __init__(self, tasks: dict[str, list[TaskRecord]], *, balance: bool = True,
                 task_weights: dict[str, float] | None = None, seed: int = 0, instructions=None,
                 use_instruction: bool = True) -> None:
        self.tasks = {t: list(r) for t, r in tasks.items() if r}
        if not self.tasks:
            raise ValueError("no training records in any task")
        for t in tasks:
            if not tasks[t]:
                raise ValueError(f"task {t!r} has no training records")
        self.names = sorted(self.tasks)
        self.balance = balance
        self.seed = int(seed)
        self.instructions = instructions
        self.use_instruction = use_instruction
        if balance:
            w = task_weights or {t: 1.0 for t in self.names}
            unknown = set(w) - set(self.names)
            if unknown:
                raise ValueError(f"task_weights name unknown task(s) {sorted(unknown)}; training tasks: {self.names}")
            self.weights = [float(w.get(t, 0.0)) for t in self.names]
        else:
            self.weights = [float(len(self.tasks[t])) for t in self.names]
        if sum(self.weights) <= 0:
            raise ValueError("task weights must not all be zero")

    def draw(self, step: int, k: int = 1) -> list[tuple[TaskRecord, int]]:
        rng = random.Random(self.seed * 1_000_003 + int(step))
        out = []
        for _ in range(k):
            task = rng.choices(self.names, weights=self.weights)[0]
            rec = rng.choice(self.tasks[task])
            idx = self.instructions.sample_index(task, rng) if (self.use_instruction and self.instructions) else 0
            out.append((rec, idx))
        return out

    def proportions(self) -> dict[str, float]:
        s = sum(self.weights)
        return {t: w / s for t, w in zip(self.names, self.weights)}
