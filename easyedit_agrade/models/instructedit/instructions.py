"""InstructEdit instructions as data: ``Task: {task}\\nDescription: {description}\\nInput: {prompt}``.

The descriptions live in a JSON file ``{task: [description, ...]}`` (default: the InstructEdit descriptions under the
shared data folder, ``instructions/instructedit_descriptions.json``; 10 per task). Indices ``0..8`` are the
training descriptions (sampled at random, seeded); index ``9`` (:data:`HELD_OUT_INDEX`) is reserved for the
unseen-instruction test. ConvSent descriptions carry ``[LABEL]`` (``positive``/``negative``) and ``[TOPIC]`` (the
entity) placeholders, which are filled per record.

Where the instruction is applied (and why): EasyEdit's ``BaseEditor`` computes the "pre" metrics from the request
dicts *before* calling the executor and the "post" metrics after, so prompts must be wrapped **before** the
requests reach ``BaseEditor`` — :func:`wrap_requests` (request dicts) and :func:`wrap_edit_inputs` (the keyword
arguments of ``BaseEditor.edit``/``batch_edit``). Edit, paraphrase and portability prompts are wrapped; locality
prompts never are. Wrapping is idempotent (:func:`is_wrapped`), and the executor never changes the request dicts,
so pre- and post-edit metrics see exactly the same prompts.
"""
from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {prompt}"
TASKS = ("counterfact", "wikirecent", "convsent", "zsre")
HELD_OUT_INDEX = 9
TRAIN_INDICES = tuple(range(9))
DEFAULT_FILE = "instructions/instructedit_descriptions.json"


class InstructionError(ValueError):
    """Bad instruction data or an unknown task; the message names the task / file."""


def is_wrapped(prompt: str) -> bool:
    """True for a prompt already in the instruction template (wrapping is idempotent)."""
    return isinstance(prompt, str) and prompt.startswith("Task: ") and "\nDescription: " in prompt \
        and "\nInput: " in prompt


def sentiment_label(target_or_label: str) -> str:
    """``positive``/``negative`` from a label or a ConvSent-style target (EasyEdit: 'positively' in target_new)."""
    t = (target_or_label or "").lower()
    if t in ("positive", "pos", "positively"):
        return "positive"
    if t in ("negative", "neg", "negatively"):
        return "negative"
    return "positive" if "positively" in t else "negative"


@dataclass
class InstructionSet:
    """Task descriptions loaded from a JSON file; ``wrap`` builds instruction prompts."""

    descriptions: dict[str, list[str]]
    source: str = "<dict>"
    held_out_index: int = HELD_OUT_INDEX

    def __post_init__(self) -> None:
        if not isinstance(self.descriptions, Mapping) or not self.descriptions:
            raise InstructionError(f"{self.source}: no task descriptions (expected a JSON object task -> list)")
        for task, items in self.descriptions.items():
            if not isinstance(items, list) or not items:
                raise InstructionError(f"{self.source}: task {task!r} has no description")
            for i, d in enumerate(items):
                if not isinstance(d, str) or not d.strip():
                    raise InstructionError(f"{self.source}: task {task!r} description {i} is empty or not a string")

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> "InstructionSet":
        """Load a descriptions file (None: the shared InstructEdit descriptions)."""
        if path is None:
            from ...paths import data_file

            p = data_file(DEFAULT_FILE)
        else:
            p = Path(path).expanduser()
            if not p.is_file():
                from ...paths import data_dir

                alt = data_dir() / str(path)
                if not alt.is_file():
                    raise FileNotFoundError(f"instructions file {str(path)!r} does not exist")
                p = alt
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise InstructionError(f"{p.name}: the instructions file is empty")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InstructionError(f"{p.name}: not valid JSON: {exc}") from exc
        return cls(raw, source=p.name)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.descriptions)

    def _list(self, task: str) -> list[str]:
        if task not in self.descriptions:
            raise InstructionError(f"unknown task {task!r}: {self.source} has descriptions for {self.tasks}")
        return self.descriptions[task]

    def train_indices(self, task: str) -> list[int]:
        """Indices used in training: all but the held-out one (``0..8`` for the InstructEdit file)."""
        n = len(self._list(task))
        idx = [i for i in range(n) if i != self.held_out_index]
        return idx or [0]

    def sample_index(self, task: str, rng: random.Random) -> int:
        return rng.choice(self.train_indices(task))

    def description(self, task: str, index: int = 0, *, label: str | None = None, topic: str | None = None) -> str:
        items = self._list(task)
        if not 0 <= index < len(items):
            raise InstructionError(f"task {task!r} has {len(items)} descriptions; index {index} is out of range")
        text = items[index]
        if "[LABEL]" in text:
            if label is None:
                raise InstructionError(f"task {task!r}: the description needs a [LABEL] (positive/negative)")
            text = text.replace("[LABEL]", sentiment_label(label))
        if "[TOPIC]" in text:
            if not topic:
                raise InstructionError(f"task {task!r}: the description needs a [TOPIC] (the record's subject)")
            text = text.replace("[TOPIC]", topic)
        return text

    def wrap(self, prompt: str, task: str, index: int = 0, *, label: str | None = None,
             topic: str | None = None) -> str:
        """``Task: {task}\\nDescription: {description}\\nInput: {prompt}`` (a wrapped prompt is returned as is)."""
        if is_wrapped(prompt):
            return prompt
        return TEMPLATE.format(task=task, description=self.description(task, index, label=label, topic=topic),
                               prompt=prompt)


_CACHE: dict[str, InstructionSet] = {}


def load_instructions(path: str | os.PathLike[str] | None = None) -> InstructionSet:
    """Cached :meth:`InstructionSet.load` (keyed by path and mtime)."""
    key = "<default>" if path is None else str(Path(path).expanduser())
    try:
        mtime = os.stat(key).st_mtime_ns if path is not None else 0
    except OSError:
        mtime = -1
    ck = f"{key}@{mtime}"
    if ck not in _CACHE:
        _CACHE[ck] = InstructionSet.load(path)
    return _CACHE[ck]


def _wrap_any(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [fn(v) if isinstance(v, str) else v for v in value]
    return value


def _resolve(hparams: Any, task: str | None, index: int | None, instructions: InstructionSet | None):
    task = task if task is not None else getattr(hparams, "task", None)
    if task is None:
        raise InstructionError("InstructEdit needs the editing task (counterfact, wikirecent, convsent, zsre) to "
                               "build the instruction: pass task=... or set `task:` in the hparams")
    if index is None:
        index = int(getattr(hparams, "instruction_index", 0) or 0)
    if instructions is None:
        instructions = load_instructions(getattr(hparams, "instructions_path", None))
    instructions._list(task)  # unknown task -> error now
    return task, index, instructions


def wrap_requests(requests: Sequence[dict], task: str | None = None, *, hparams: Any = None, index: int | None = None,
                  instructions: InstructionSet | None = None) -> list[dict]:
    """Copies of EasyEdit request dicts with the edit, rephrase and portability prompts wrapped (locality not).

    ``task``/``index`` default to ``hparams.task``/``hparams.instruction_index``; a request may carry its own
    ``"task"``. ConvSent's ``[LABEL]`` comes from ``request["label"]`` or ``target_new`` and ``[TOPIC]`` from
    ``request["subject"]``. Returns new dicts; the input is not changed.
    """
    out = []
    for i, req in enumerate(requests):
        if not isinstance(req, dict):
            raise InstructionError(f"request {i}: expected a dict, got {type(req).__name__}")
        for key in ("prompt", "target_new"):
            if not isinstance(req.get(key), str):
                raise InstructionError(f"request {i}: missing field {key!r}")
        t, idx, ins = _resolve(hparams, req.get("task", task), index, instructions)
        label = req.get("label") or (sentiment_label(req["target_new"]) if t == "convsent" else None)
        topic = req.get("subject")
        fn = lambda p: ins.wrap(p, t, idx, label=label, topic=topic)  # noqa: E731
        new = copy.deepcopy(req)
        new["prompt"] = fn(req["prompt"])
        if req.get("rephrase_prompt") is not None:
            new["rephrase_prompt"] = _wrap_any(req["rephrase_prompt"], fn)
        for key, entry in (new.get("portability") or {}).items():
            if isinstance(entry, dict) and "prompt" in entry:
                entry["prompt"] = _wrap_any(entry["prompt"], fn)
        out.append(new)
    return out


def wrap_edit_inputs(hparams: Any = None, *, prompts: str | list[str], task: str | None = None,
                     index: int | None = None, rephrase_prompts: str | list[str] | None = None,
                     portability_inputs: dict | None = None, subject: str | list[str] | None = None,
                     labels: str | list[str] | None = None, instructions: InstructionSet | None = None,
                     **rest: Any) -> dict:
    """Keyword arguments for ``BaseEditor.edit``/``batch_edit`` with the instruction applied.

    Usage: ``editor.edit(**wrap_edit_inputs(hparams, prompts=..., target_new=..., rephrase_prompts=...,
    locality_inputs=..., portability_inputs=..., task="zsre"))``. Locality inputs (in ``rest``) pass unchanged.
    """
    single = isinstance(prompts, str)
    plist = [prompts] if single else list(prompts)
    n = len(plist)

    def as_list(v):
        if v is None:
            return [None] * n
        return [v] * n if isinstance(v, str) else list(v)

    subj, labs = as_list(subject), as_list(labels)
    targets = as_list(rest.get("target_new"))
    t, idx, ins = _resolve(hparams, task, index, instructions)

    def fn(p: str, i: int) -> str:
        label = labs[i] or (sentiment_label(targets[i] or "") if t == "convsent" else None)
        return ins.wrap(p, t, idx, label=label, topic=subj[i])

    out = dict(rest)
    wrapped = [fn(p, i) for i, p in enumerate(plist)]
    out["prompts"] = wrapped[0] if single else wrapped
    if subject is not None:
        out["subject"] = subject
    if rephrase_prompts is not None:
        rl = as_list(rephrase_prompts)
        rw = [fn(p, i) for i, p in enumerate(rl)]
        out["rephrase_prompts"] = rw[0] if isinstance(rephrase_prompts, str) else rw
    if portability_inputs is not None:
        port = copy.deepcopy(portability_inputs)
        for key, entry in port.items():
            ps = entry["prompt"]
            pl = [ps] if isinstance(ps, str) else list(ps)
            pw = [fn(p, i) for i, p in enumerate(pl)]
            entry["prompt"] = pw[0] if isinstance(ps, str) else pw
        out["portability_inputs"] = port
    return out
