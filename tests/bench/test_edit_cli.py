"""``easyedit-agrade edit``: malformed input names the record and field and writes nothing; a real edit writes
results atomically."""
from __future__ import annotations

import json
import re

import pytest

from easyedit_agrade.bench.edit_cli import edit_main

GOOD_CF = {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
           "subject": "Danielle Darrieux", "ground_truth": "French",
           "rephrase_prompt": "Danielle Darrieux's mother tongue is",
           "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}


def test_malformed_record_reports_index_and_field_and_writes_nothing(tmp_path, capsys):
    bad = dict(GOOD_CF)
    del bad["target_new"]
    src = tmp_path / "requests.json"
    src.write_text(json.dumps([GOOD_CF, GOOD_CF, bad]))
    out = tmp_path / "out.json"
    assert edit_main([str(src), "--method", "FT", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "record 2" in err and "'target_new'" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["requests.json"]


def test_jsonl_error_names_the_line(tmp_path, capsys):
    src = tmp_path / "requests.jsonl"
    src.write_text(json.dumps(GOOD_CF) + "\nnot json\n")
    assert edit_main([str(src), "--out", str(tmp_path / "o.json")]) == 2
    assert "line 2" in capsys.readouterr().err


def test_subject_required_by_rome(tmp_path, capsys):
    rec = dict(GOOD_CF, subject="Somebody Else")
    src = tmp_path / "r.json"
    src.write_text(json.dumps([rec]))
    assert edit_main([str(src), "--method", "ROME", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "record 0" in err and "'subject'" in err


@pytest.mark.slow
def test_edit_knowedit_jsonl_with_ft(tmp_path, easyeditor_module, embedded_model_dir):
    rec = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is",
           "target_new": "English", "ground_truth": "French",
           "locality": {"Relation_Specificity": [{"prompt": "Danielle Darrieux was born in", "ground_truth": "Bordeaux"}]},
           "portability": {"Reasoning": [{"prompt": "Danielle Darrieux writes her letters in", "ground_truth": "English"}]}}
    src = tmp_path / "reqs.jsonl"
    src.write_text(json.dumps(rec) + "\n")
    hp = tmp_path / "ft.yaml"  # the shipped FT hparams with fewer steps, to keep the test short
    from easyedit_agrade.bench.methods import HPARAMS_DIR

    hp.write_text(re.sub(r"num_steps: \d+", "num_steps: 3", (HPARAMS_DIR / "FT" / "smollm2-135m.yaml").read_text()))
    out = tmp_path / "res.json"
    assert edit_main([str(src), "--hparams", str(hp), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "FT" and res["n_edits"] == 1 and res["mode"] == "batch"
    post = res["records"][0]["post"]
    assert set(post) >= {"rewrite_acc", "locality", "portability"}
    assert "Other-Attribution_acc" in post["locality"] and "Reasoning_acc" in post["portability"]
    assert res["summary"]["ES"] is not None
