"""``easyedit-agrade edit``: malformed input names the record and field and writes nothing; a real edit writes
results atomically."""
from __future__ import annotations

import json
import re
from pathlib import Path

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
    saved = tmp_path / "edited-model"
    assert edit_main([str(src), "--hparams", str(hp), "--out", str(out), "--save-model", str(saved)]) == 0
    from easyedit_agrade.bench.edit_cli import SAVED_MARKER

    assert (saved / SAVED_MARKER).is_file() and (saved / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited-model", "ft.yaml", "reqs.jsonl", "res.json"]
    res = json.loads(out.read_text())
    assert res["method"] == "FT" and res["n_edits"] == 1 and res["mode"] == "batch"
    post = res["records"][0]["post"]
    assert set(post) >= {"rewrite_acc", "locality", "portability"}
    assert "Other-Attribution_acc" in post["locality"] and "Reasoning_acc" in post["portability"]
    assert res["summary"]["ES"] is not None


def test_edit_with_agrade_rounds_yaml_reports_the_perplexity_guard(tmp_path, capsys, easyeditor_module,
                                                                    embedded_model_dir):
    """`edit` with the guarded-rounds YAML writes the executor's report — the guard's held-out perplexity ratio and
    each round's step — into the results and names the ratio in its summary line."""
    from easyedit_agrade.bench.methods import HPARAMS_DIR

    src = _requests(tmp_path)
    hp = tmp_path / "agrade.yaml"  # the shipped rounds YAML on fewer statistics and held-out tokens (a short test)
    text = (HPARAMS_DIR / "AGRADE" / "smollm2-135m-rounds.yaml").read_text()
    text = re.sub(r"preserved_tokens: \d+", "preserved_tokens: 2048", text)
    hp.write_text(re.sub(r"heldout_windows: \d+", "heldout_windows: 2", text))
    out = tmp_path / "res.json"
    assert edit_main([str(src), "--hparams", str(hp), "--out", str(out), "--no-eval"]) == 0
    res = json.loads(out.read_text())
    (report,) = res["edit_reports"]
    assert report["alg_name"] == "AGRADE" and report["n_requests"] == 1 and report["chunks"] == 1
    (steps,) = report["guard_steps"]
    assert steps and all(0.0 <= t <= 1.0 for t in steps)
    assert 0.5 < report["heldout_ppl_ratio"] <= 1.25 + 1e-9  # never above the YAML's limit
    assert f"held-out perplexity {report['heldout_ppl_ratio']:.3f}x" in capsys.readouterr().out


# --- nothing the command did not create is deleted or overwritten; bad input is one line, exit 2 ---------------

def _requests(tmp_path, name="requests.json"):
    src = tmp_path / name
    src.write_text(json.dumps([GOOD_CF]))
    return src


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(capsys, argv, *needles):
    """``argv`` must be refused with exit 2 before anything runs. The model given does not exist, so code that
    failed to refuse stops at loading it (exit 1) and never reaches the writing or deleting it should refuse."""
    argv = [*argv, "--model", "/nonexistent/easyedit-agrade-test-model"]
    assert edit_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_out_is_never_the_requests_file(tmp_path, capsys):
    src = _requests(tmp_path)
    before = src.read_bytes()
    for extra in ([], ["--overwrite"]):
        _refused(capsys, [str(src), "--method", "FT", "--out", str(src), *extra], "is the requests file")
    link = tmp_path / "alias.json"
    link.symlink_to(src)
    _refused(capsys, [str(src), "--method", "FT", "--out", str(link), "--overwrite"], "is the requests file")
    _refused(capsys, [str(src), "--method", "FT", "--out", str(tmp_path / "." / "requests.json"), "--overwrite"],
             "is the requests file")
    assert src.read_bytes() == before


def test_existing_out_file_or_directory_refused_before_editing(tmp_path, capsys):
    src = _requests(tmp_path)
    out = tmp_path / "results.json"
    out.write_text("keep me")
    _refused(capsys, [str(src), "--method", "FT", "--out", str(out)], "exists", "--overwrite")
    assert out.read_text() == "keep me"
    (tmp_path / "adir").mkdir()
    _refused(capsys, [str(src), "--method", "FT", "--out", str(tmp_path / "adir"), "--overwrite"], "is a directory")


def test_save_model_refuses_protected_directories(tmp_path, capsys, monkeypatch):
    from easyedit_agrade.paths import REPO_ROOT

    src = _requests(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("x")
    monkeypatch.chdir(work)
    for target in (".", str(work), str(Path.home()), str(REPO_ROOT), "/", str(work.parent.parent)):
        _refused(capsys, [str(src), "--method", "FT", "--out", str(tmp_path / "o.json"), "--save-model", target,
                          "--overwrite"], "refusing")
    assert (work / "mine.txt").read_text() == "x"


def test_save_model_refuses_unrelated_non_empty_directory(tmp_path, capsys):
    src = _requests(tmp_path)
    target = tmp_path / "models"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "notes.txt").write_text("precious")
    listing = _listing(tmp_path)
    for extra in ([], ["--overwrite"]):
        _refused(capsys, [str(src), "--method", "FT", "--out", str(tmp_path / "o.json"), "--save-model",
                          str(target), *extra], "did not save")
    _refused(capsys, [str(src), "--method", "FT", "--out", str(tmp_path / "o.json"), "--save-model",
                      str(tmp_path), "--overwrite"], "would replace")  # holds the requests file
    assert _listing(tmp_path) == listing and (target / "sub" / "notes.txt").read_text() == "precious"


def test_atomic_save_model_replaces_only_its_own_save(tmp_path):
    """A real save (tiny model): into a new or empty directory; an earlier save needs ``overwrite`` and is then
    replaced; a directory with files the command did not write is never touched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from easyedit_agrade.bench.edit_cli import SAVED_MARKER, UsageError, atomic_save_model
    from easyedit_agrade.lm import load_tokenizer

    tok = load_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    target = tmp_path / "edited"
    target.mkdir()  # empty: fine
    atomic_save_model(model, tok, target)
    assert (target / SAVED_MARKER).is_file() and (target / "config.json").is_file()
    with pytest.raises(UsageError, match="--overwrite"):
        atomic_save_model(model, tok, target)
    (target / "stale.txt").write_text("from the first save")
    atomic_save_model(model, tok, target, overwrite=True)
    assert not (target / "stale.txt").exists() and (target / SAVED_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # no temporary siblings left
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"\x00")
    with pytest.raises(UsageError, match="did not save"):
        atomic_save_model(model, tok, other, overwrite=True)
    assert (other / "data.bin").read_bytes() == b"\x00"


def test_non_utf8_requests_file_is_one_line_error(tmp_path, capsys):
    src = tmp_path / "requests.json"
    src.write_bytes(json.dumps([GOOD_CF]).encode("utf-8").replace(b"English", b"Engl\xe9sh"))
    out = tmp_path / "o.json"
    _refused(capsys, [str(src), "--method", "FT", "--out", str(out)], "requests.json", "not UTF-8")
    assert not out.exists()


@pytest.mark.parametrize("text, needle", [("alg_name: FT\nlr: [1, 2\n", "not valid YAML at line"),
                                          ("- just\n- a list\n", "expected a mapping"),
                                          (b"alg_name: F\xff\n", "not UTF-8")])
def test_malformed_hparams_file_is_one_line_error(tmp_path, capsys, text, needle):
    src = _requests(tmp_path)
    hp = tmp_path / "bad.yaml"
    hp.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "o.json"
    _refused(capsys, [str(src), "--hparams", str(hp), "--out", str(out)], "bad.yaml", needle)
    assert not out.exists()


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limit_must_be_positive(tmp_path, capsys, limit):
    src = _requests(tmp_path)
    _refused(capsys, [str(src), "--method", "FT", "--out", str(tmp_path / "o.json"), "--limit", limit],
             "--limit must be at least 1")
