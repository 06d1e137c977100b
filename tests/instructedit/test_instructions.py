"""Instructions as data: wrapping, train vs held-out descriptions, placeholders, bad files, request wrapping."""
from __future__ import annotations

import json
import random

import pytest

from easyedit_agrade.models.instructedit.instructions import (HELD_OUT_INDEX, InstructionError, InstructionSet,
                                                              is_wrapped, load_instructions, wrap_edit_inputs,
                                                              wrap_requests)

DESC = {t: [f"{t} description {i}" for i in range(10)] for t in ("counterfact", "wikirecent", "zsre")}
DESC["convsent"] = [f"Be [LABEL] about [TOPIC] ({i})." for i in range(10)]


@pytest.fixture()
def ins():
    return InstructionSet(DESC, source="test")


def test_template_and_idempotence(ins):
    w = ins.wrap("The capital of France is", "counterfact", 3)
    assert w == "Task: counterfact\nDescription: counterfact description 3\nInput: The capital of France is"
    assert is_wrapped(w) and not is_wrapped("The capital of France is")
    assert ins.wrap(w, "zsre", 1) == w  # already wrapped: unchanged


def test_training_samples_only_first_nine_and_index_9_is_held_out(ins):
    rng = random.Random(0)
    seen = {ins.sample_index("zsre", rng) for _ in range(2000)}
    assert seen == set(range(9))
    assert HELD_OUT_INDEX == 9 and HELD_OUT_INDEX not in ins.train_indices("counterfact")
    assert "description 9" in ins.wrap("q", "zsre", HELD_OUT_INDEX)


def test_shared_descriptions_file(shared_data):
    ins = load_instructions(None)
    assert set(ins.tasks) == {"convsent", "counterfact", "wikirecent", "zsre"}
    assert all(len(ins.descriptions[t]) == 10 for t in ins.tasks)
    held = ins.wrap("What do you think of bananas?", "convsent", 9, label="negative", topic="bananas")
    assert held.endswith("\nInput: What do you think of bananas?")
    assert "negative" in held and "bananas" in held and "[LABEL]" not in held and "[TOPIC]" not in held
    assert ins.descriptions["convsent"][9].startswith("Steer the chatbot")


def test_convsent_placeholders(ins):
    w = ins.wrap("What do you think of X?", "convsent", 0, label="positively", topic="X")
    assert "Be positive about X (0)." in w
    with pytest.raises(InstructionError, match=r"\[TOPIC\]"):
        ins.wrap("q", "convsent", 0, label="positive")


def test_unknown_task_and_bad_files(ins, tmp_path):
    with pytest.raises(InstructionError, match=r"unknown task 'medicine'"):
        ins.wrap("q", "medicine", 0)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(InstructionError, match=r"empty"):
        InstructionSet.load(empty)
    nodesc = tmp_path / "nodesc.json"
    nodesc.write_text(json.dumps({"zsre": []}))
    with pytest.raises(InstructionError, match=r"task 'zsre' has no description"):
        InstructionSet.load(nodesc)
    with pytest.raises(InstructionError, match=r"no task descriptions"):
        InstructionSet({}, source="x")
    with pytest.raises(FileNotFoundError):
        InstructionSet.load(tmp_path / "missing.json")


def test_user_file(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"law": ["Legal facts."]}))
    ins = load_instructions(f)
    assert ins.wrap("q", "law", 0) == "Task: law\nDescription: Legal facts.\nInput: q"


def test_wrap_requests_wraps_edit_rephrase_portability_not_locality(ins):
    req = {"prompt": "Who is the CEO of X?", "target_new": "Alice", "ground_truth": "Bob",
           "rephrase_prompt": "X's CEO is?", "locality": {"nq": {"prompt": "Who wrote Hamlet?", "ground_truth": "W"}},
           "portability": {"one_hop": {"prompt": "Alice runs which company?", "ground_truth": "X"}}}
    out = wrap_requests([req], "zsre", instructions=ins, index=2)[0]
    assert out["prompt"].startswith("Task: zsre\nDescription: zsre description 2\nInput: Who is")
    assert is_wrapped(out["rephrase_prompt"]) and is_wrapped(out["portability"]["one_hop"]["prompt"])
    assert out["locality"]["nq"]["prompt"] == "Who wrote Hamlet?"
    assert req["prompt"] == "Who is the CEO of X?"  # input not changed
    assert wrap_requests([out], "zsre", instructions=ins, index=5)[0] == out  # idempotent


def test_wrap_requests_needs_task(ins):
    with pytest.raises(InstructionError, match=r"needs the editing task"):
        wrap_requests([{"prompt": "p", "target_new": "t"}], instructions=ins)
    with pytest.raises(InstructionError, match=r"missing field 'target_new'"):
        wrap_requests([{"prompt": "p"}], "zsre", instructions=ins)


def test_wrap_edit_inputs(ins):
    kw = wrap_edit_inputs(None, prompts=["a", "b"], target_new=["x", "y"], rephrase_prompts=["a2", "b2"],
                          locality_inputs={"n": {"prompt": ["l1", "l2"], "ground_truth": ["g1", "g2"]}},
                          portability_inputs={"p": {"prompt": ["p1", "p2"], "ground_truth": ["q1", "q2"]}},
                          task="counterfact", instructions=ins)
    assert all(is_wrapped(p) for p in kw["prompts"] + kw["rephrase_prompts"] + kw["portability_inputs"]["p"]["prompt"])
    assert kw["locality_inputs"]["n"]["prompt"] == ["l1", "l2"] and kw["target_new"] == ["x", "y"]
