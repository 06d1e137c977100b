"""The one record model (dataset/): real records of every format, parsed by the format registry and seen through
the three views (EditRecord, EvalRecord, TaskRecord), equal the values the three old parsers gave.

``record_pins.json`` was written by the parsers as they were before the record model (dataset/readers.py,
evaluate/records.py and models/instructedit/multitask.py of the previous commit) for a few records per format and
file; these tests parse the same files with today's code and compare.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from easyedit_agrade.dataset import FORMATS, RecordFormatError, get_format, parse_raw, read_records
from easyedit_agrade.evaluate.records import load_records
from easyedit_agrade.models.instructedit.multitask import load_split

PINS = json.loads((Path(__file__).with_name("record_pins.json")).read_text(encoding="utf-8"))


def _eval_view(r) -> dict:
    return {"uid": r.uid, "family": r.family, "prompt": r.prompt, "target_new": r.target_new, "subject": r.subject,
            "ground_truth": r.ground_truth, "rephrase": r.rephrase, "group": r.group,
            "locality": {k: [[p.prompt, list(p.answers)] for p in v] for k, v in r.locality.items()},
            "portability": {k: [[p.prompt, list(p.answers)] for p in v] for k, v in r.portability.items()}}


def test_every_registered_format_is_pinned():
    pinned = {v["fmt"] for v in PINS["eval"].values()} | {"convsent"}  # ConvSent: the task pins below
    assert pinned == set(FORMATS)


@pytest.mark.parametrize("name", sorted(PINS["eval"]))
def test_benchmark_records_equal_the_old_parser(shared_data, name):
    pin = PINS["eval"][name]
    records, cases = load_records(shared_data / pin["path"], pin["fmt"])
    if pin["fmt"] == "mquake":
        case = cases[0]
        assert [_eval_view(r) for r in records if r.group == case.uid] == pin["records"]
        assert {"uid": case.uid, "rewrite_uids": case.rewrite_uids,
                "questions": [[p.prompt, list(p.answers)] for p in case.questions],
                "hops": [[p.prompt, list(p.answers)] for p in case.hops]} == pin["case"]
        return
    for i, want in pin["picks"].items():
        got = _eval_view(records[int(i)])
        assert got == want
        assert list(got["portability"]) == list(want["portability"])  # the probe order too


@pytest.mark.filterwarnings("ignore:.*skipped .* malformed record")  # the zsRE train files' empty 'alt's
@pytest.mark.parametrize("name", sorted(PINS["edit"]))
def test_training_records_equal_the_old_reader(shared_data, name):
    pin = PINS["edit"][name]
    records = read_records(shared_data / pin["path"], skip_invalid=True)
    assert len(records) == pin["n"]
    for i, want in pin["picks"].items():
        assert dataclasses.asdict(records[int(i)]) == want


@pytest.mark.parametrize("key", sorted(PINS["task"]))
def test_task_records_equal_the_old_multitask_parser(shared_data, key):
    pin = PINS["task"][key]
    task, split = key.split(":")
    records = load_split(task, split, seed=0)
    assert len(records) == pin["n"]
    for i, want in pin["picks"].items():
        got = dataclasses.asdict(records[int(i)])
        got["portability"] = [list(p) for p in got["portability"]]
        assert got == want


def test_unknown_format_names_the_setting_and_the_known_formats():
    with pytest.raises(ValueError, match=r"fmt='zsre_v2': unknown record format; known formats: auto, zsre, "):
        parse_raw([{"src": "q", "alt": "a"}], "zsre_v2")
    with pytest.raises(ValueError, match=r"task='medical': unknown record format"):
        get_format("medical", field="task")
    with pytest.raises(ValueError, match=r"fmt='csv'"):
        from easyedit_agrade.dataset import parse_records

        parse_records([{"src": "q", "alt": "a", "rephrase": "r", "loc": "l", "loc_ans": "x"}], "csv")
    assert get_format("knowedit").parse_one is not None and get_format("convsent").parse_all is not None


def test_undetectable_record_names_its_fields():
    with pytest.raises(RecordFormatError, match=r"x.json: record 1: record matches no known format.*\['foo'\]"):
        parse_raw([{"src": "q", "alt": "a"}, {"foo": 1}], source="x.json")


def test_require_probes_is_what_the_training_readers_add():
    rec = {"src": "Who?", "alt": "A"}
    assert parse_raw([rec]).records[0].rephrase == []  # the benchmark takes a record without probes
    with pytest.raises(RecordFormatError, match=r"record 0: missing field 'rephrase'"):
        parse_raw([rec], "zsre", require_probes=True)
    with pytest.raises(RecordFormatError, match=r"missing field 'locality'"):
        parse_raw([{"prompt": "p", "target_new": "t"}], "knowedit", require_probes=True)
