"""EasyEdit record readers: zsRE-MEND and CounterFact-MEND into EditRecord; malformed records name index+field."""
from __future__ import annotations

import json

import pytest

from easyedit_agrade.dataset import (RecordFormatError, detect_format, parse_records, read_counterfact_mend,
                                     read_records, read_zsre_mend, records_from_requests)

ZSRE = {"subject": "Call the Doctor", "src": "What artist created Call the Doctor?", "alt": "The X-Files",
        "answers": ["Sleater-Kinney"], "rephrase": "Which artist created Call the Doctor?",
        "loc": "nq question: who sang nice day for a white wedding", "loc_ans": "Billy Idol"}
CF = {"case_id": 10, "prompt": "BBC One, by", "target_new": "Sega", "subject": "BBC One", "ground_truth": "BBC",
      "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
      "locality_prompt": "BBC Radio, by", "locality_ground_truth": "BBC"}


def test_zsre_record(tmp_path):
    path = tmp_path / "z.json"
    path.write_text(json.dumps([ZSRE, ZSRE]))
    recs = read_zsre_mend(path)
    r = recs[1]
    assert (r.prompt, r.target_new, r.rephrase_prompt, r.ground_truth) == (ZSRE["src"], ZSRE["alt"], ZSRE["rephrase"],
                                                                           "Sleater-Kinney")
    assert r.locality_prompt == ZSRE["loc"] and r.locality_ground_truth == "Billy Idol" and r.index == 1
    req = r.to_request()
    assert req["locality"]["neighborhood"] == {"prompt": ZSRE["loc"], "ground_truth": "Billy Idol"}
    assert detect_format([ZSRE]) == "zsre" and read_records(path)[0] == recs[0]


def test_counterfact_record_and_request_round_trip(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([CF]))
    (r,) = read_counterfact_mend(path)
    assert (r.prompt, r.target_new, r.subject, r.case_id) == ("BBC One, by", "Sega", "BBC One", 10)
    back = records_from_requests([r.to_request()])[0]
    assert (back.prompt, back.target_new, back.rephrase_prompt, back.locality_prompt,
            back.locality_ground_truth) == (r.prompt, r.target_new, r.rephrase_prompt, r.locality_prompt,
                                            r.locality_ground_truth)


@pytest.mark.parametrize("fmt,rec,field", [("zsre", ZSRE, "alt"), ("counterfact", CF, "rephrase_prompt"),
                                           ("counterfact", CF, "target_new")])
def test_malformed_record_names_index_and_field(fmt, rec, field):
    bad = dict(rec)
    del bad[field]
    with pytest.raises(RecordFormatError, match=rf"record 2: missing field '{field}'"):
        parse_records([rec, rec, bad], fmt, source="x.json")
    wrong = dict(rec, **{field: 5})
    with pytest.raises(RecordFormatError, match=rf"record 1: field '{field}' must be a string"):
        parse_records([rec, wrong], fmt)


def test_start_limit_keep_file_indices():
    recs = parse_records([CF] * 5, "counterfact", start=2, limit=2)
    assert [r.index for r in recs] == [2, 3]


def test_real_shared_files():
    from easyedit_agrade.paths import data_file

    try:
        cf = data_file("counterfact/counterfact-val.json")
        zs = data_file("portability/One_Hop/zsre_mend_eval_portability_gpt4.json")
        zt = data_file("zsre/zsre_mend_train_10000.json")
    except FileNotFoundError as exc:
        pytest.skip(f"shared data absent: {exc}")
    assert len(read_counterfact_mend(cf)) == 1919
    assert len(read_zsre_mend(zs)) == 722
    with pytest.raises(RecordFormatError, match="record 39: field 'alt' is empty"):
        read_records(zt, limit=50)
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        assert len(read_records(zt, limit=50, skip_invalid=True)) == 49


def test_mixed_pool_is_balanced_interleaved_and_sliced(tmp_path):
    import json

    from easyedit_agrade.dataset import parse_pool_entry, read_pool

    cf = [{"prompt": f"cf {i} is", "target_new": "x", "rephrase_prompt": "r", "locality_prompt": "l",
           "locality_ground_truth": "g"} for i in range(10)]
    zs = [{"src": f"zs {i}?", "alt": "y", "rephrase": "r", "loc": "nq question: l", "loc_ans": "g"} for i in range(6)]
    (tmp_path / "cf.json").write_text(json.dumps(cf))
    (tmp_path / "zs.json").write_text(json.dumps(zs))
    pool = read_pool([str(tmp_path / "cf.json"), f"{tmp_path / 'zs.json'}@1:5"], fmt="counterfact")  # per file
    assert [r.prompt for r in pool] == [x for i in range(4) for x in (f"cf {i} is", f"zs {i + 1}?")]
    assert len(read_pool([str(tmp_path / "cf.json"), str(tmp_path / "zs.json")], balance=False)) == 16
    assert parse_pool_entry("a/b.json@0:9000") == ("a/b.json", 0, 9000)
    for bad in ("a.json@5:2", "a.json@x:3", "a.json@7"):
        with pytest.raises(ValueError, match="START:STOP"):
            parse_pool_entry(bad)
