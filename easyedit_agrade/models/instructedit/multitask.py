"""The InstructEdit multi-task data: per-task readers, train/test splits and seeded balancing.

Every task file is parsed once by the record model in ``easyedit_agrade.dataset`` (format per task:
:data:`TASK_FORMATS`); :class:`TaskRecord` is the flat view of a :class:`~easyedit_agrade.dataset.schema.Record`
that the InstructEdit editor and metrics read.

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

from ...dataset.formats import CONVSENT_QUESTION, CONVSENT_REPHRASE, parse_raw  # noqa: F401  (kept names)
from ...dataset.schema import (FORGETFULNESS, NEIGHBORHOOD, OTHER_ATTRIBUTION, Record, RecordFormatError,
                               easyedit_request)

#: the record format of each task's files (parsed by the one record model in ``dataset/``)
TASK_FORMATS = {"counterfact": "counterfact", "wikirecent": "knowedit", "convsent": "convsent", "zsre": "zsre"}
#: portability probes kept per record (WikiRecent has up to a dozen; the first ones in the file's order)
MAX_PORTABILITY = 2


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
        req = easyedit_request(self.prompt, self.target_new, task=self.task, subject=self.subject, label=self.label,
                               rephrase_prompt=self.rephrase_prompt,
                               neighborhood=(self.locality_prompt, self.locality_ground_truth))
        for i, (p, a) in enumerate(self.portability):
            req["portability"][f"port_{i}"] = {"prompt": p, "ground_truth": a}
        return req

    @classmethod
    def from_record(cls, task: str, r: Record) -> "TaskRecord":
        """The task view of a :class:`~easyedit_agrade.dataset.schema.Record`: its first rephrase, its first
        locality probe (neighbourhood, else KnowEdit's Relation_Specificity, else Forgetfulness; first alias) and
        up to :data:`MAX_PORTABILITY` portability probes (first alias each)."""
        loc = r.first_probe(NEIGHBORHOOD, OTHER_ATTRIBUTION, FORGETFULNESS)
        port = [(p.prompt, p.answer) for probes in r.portability.values() for p in probes][:MAX_PORTABILITY]
        return cls(task, r.prompt, r.target_new, rephrase_prompt=r.rephrase[0] if r.rephrase else None,
                   locality_prompt=loc.prompt if loc else None, locality_ground_truth=loc.answer if loc else None,
                   portability=port, subject=r.subject, label=r.label, responses=list(r.responses),
                   opposite=list(r.opposite), other_topic=r.other_topic, index=r.index, source=r.source)


def parse_task(task: str, raw: Sequence[Any], src: str, *, seed: int = 0) -> list[TaskRecord]:
    """Raw records of ``task``'s format -> task records (the generalisation and locality fields are required;
    ConvSent's target sentiments are drawn with ``seed``)."""
    if task not in TASK_FORMATS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASK_FORMATS)}")
    options = {"seed": seed} if task == "convsent" else {}
    parsed = parse_raw(raw, TASK_FORMATS[task], source=src, require_probes=True, field="task", **options)
    return [TaskRecord.from_record(task, r) for r in parsed.records]


def parse_counterfact(raw: Sequence[Any], src: str = "<counterfact>") -> list[TaskRecord]:
    return parse_task("counterfact", raw, src)


def parse_wikirecent(raw: Sequence[Any], src: str = "<wikirecent>") -> list[TaskRecord]:
    return parse_task("wikirecent", raw, src)


def parse_convsent(raw: Sequence[Any], src: str = "<convsent>", seed: int = 0, n_responses: int = 5) -> list[TaskRecord]:
    """One record per topic; the target sentiment is drawn per record with ``random.Random(seed)``."""
    parsed = parse_raw(raw, "convsent", source=src, seed=seed, n_responses=n_responses)
    return [TaskRecord.from_record("convsent", r) for r in parsed.records]


def parse_zsre(raw: Sequence[Any], src: str = "<zsre>") -> list[TaskRecord]:
    return parse_task("zsre", raw, src)


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
    return parse_task(task, raw, p.name, seed=seed)


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
