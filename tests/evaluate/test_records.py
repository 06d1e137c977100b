"""Record readers for every format, error messages naming the record and field, and the benchmark pool."""
from __future__ import annotations

import json

import pytest

from easyedit_agrade.evaluate.records import (DISTRACT_NEIGHBOR, NEIGHBORHOOD, OTHER_ATTRIBUTION, RecordError,
                                              build_pool, detect_format, load_records, parse_records)

from evaluate_samples import CF, KE, MQ, ZSRE  # noqa: E402


def test_formats_are_detected():
    assert detect_format(ZSRE) == "zsre"
    assert detect_format(CF) == "counterfact"
    assert detect_format(KE) == "knowedit"
    assert detect_format(MQ) == "mquake"


def test_zsre_and_counterfact_to_easyedit_request():
    (z, c), _ = parse_records([ZSRE, CF], source="t")
    req = z.to_request()
    assert req["prompt"] == ZSRE["src"] and req["target_new"] == "The X-Files"
    assert req["rephrase_prompt"] == ZSRE["rephrase"] and req["subject"] == "Call the Doctor"
    assert req["locality"][NEIGHBORHOOD] == {"prompt": ZSRE["loc"], "ground_truth": "Billy Idol"}
    assert req["portability"]["One-Hop"] == {"prompt": "Who starred in it?", "ground_truth": "David Duchovny"}
    assert c.locality[NEIGHBORHOOD][0].answer == "French" and c.ground_truth == "French"


def test_knowedit_lists_and_aliases():
    (k,), _ = parse_records([KE], source="t")
    assert [p.answers for p in k.locality[OTHER_ATTRIBUTION]] == [("genus",), ("genus", "gen.")]
    req = k.to_request()
    assert req["locality"][OTHER_ATTRIBUTION]["prompt"] == ["The taxon rank of Epaspidoceras is", "Epaspidoceras rank"]
    assert req["portability"]["Reasoning"]["ground_truth"] == "Owlet moths"
    assert DISTRACT_NEIGHBOR not in req["locality"]  # derived by the evaluator only


def test_mquake_case():
    recs, (case,) = parse_records([MQ], source="mq")
    assert [r.prompt for r in recs] == ["Fernando Santos is a citizen of", "The head of state in United Kingdom is"]
    assert case.rewrite_uids == [r.uid for r in recs]
    assert case.questions[0].answers == ("Emmerson Mnangagwa", "Emmerson Dambudzo Mnangagwa")
    assert case.hops[0].answers == ("United Kingdom", "UK")


@pytest.mark.parametrize("record, index, field", [
    ({"src": "Q?", "rephrase": "Q2?"}, 1, "alt"),
    ({"src": "", "alt": "A"}, 1, "src"),
    ({"prompt": "P", "target_new": 3}, 1, "target_new"),
    ({"prompt": "P", "target_new": "T", "portability": {"Reasoning": [{"ground_truth": "x"}]}}, 1, "prompt"),
])
def test_malformed_record_names_index_and_field(record, index, field):
    with pytest.raises(RecordError) as info:
        parse_records([CF if "prompt" in record else ZSRE, record], source="f.json")
    msg = str(info.value)
    assert f"record {index}" in msg and repr(field) in msg and "f.json" in msg


def test_jsonl_and_bad_json(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(CF) + "\n" + json.dumps(KE) + "\n")
    recs, _ = load_records(p)
    assert len(recs) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CF) + "\n{oops\n")
    with pytest.raises(RecordError, match="line 2"):
        load_records(bad)


def test_pool_interleaves_sources_and_keeps_cases_whole(shared_data):
    pool = build_pool(shared_data, seed=0)
    assert len(pool.records) > 2048
    first = pool.take(10)
    assert len({r.source for r in first}) >= 6  # round-robin: every prefix mixes the sources
    keys = [(r.subject, r.prompt) for r in pool.records]
    assert len(keys) == len(set(keys))
    assert all(r.subject and r.subject in r.prompt for r in pool.records)
    assert pool.cases and all(len(pool.cases_within(pool.take(2048))) == len(pool.cases) for _ in [0])
    assert build_pool(shared_data, seed=0).take(50) == pool.take(50)  # deterministic
