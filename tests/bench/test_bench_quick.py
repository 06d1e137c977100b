"""``easyedit-agrade bench --quick`` end to end: every requested method is reported (ok, or failed with its error)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_bench_end_to_end(tmp_path, shared_data, easyeditor_module, embedded_model_dir):
    from easyedit_agrade.bench import bench_main

    out = tmp_path / "bench"
    rc = bench_main(["--quick", "--methods", "AGRADE,InstructEdit,FT,MEND", "--sizes", "1", "--out", str(out),
                     "--plots-dir", str(tmp_path / "img")])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == {"AGRADE", "InstructEdit", "FT", "MEND"}  # none dropped
    for r in runs.values():
        assert r["status"] in ("ok", "failed")
        if r["status"] == "failed":
            assert r["error"]
    ft = runs["FT"]
    assert ft["status"] == "ok", ft.get("error")
    assert ft["mode"] == "batch" and ft["edit_seconds"] > 0 and ft["peak_rss_mb"] > 0
    m = ft["metrics"]
    for key in ("ES", "GS", "LS", "Score", "easyedit", "portability", "locality", "mquake", "by_family"):
        assert key in m
    assert 0 <= m["ES"] <= 1 and "ppl" in ft["general"] and "mc" in ft["general"]
    mend = runs["MEND"]
    if _mend_archive_configured():  # hparams/MEND points at the shipped EasyEdit-trained MEND archive
        assert mend["status"] == "ok", mend.get("error")
    else:
        assert mend["status"] == "failed" and "archive" in mend["diagnosis"]
    env = res["environment"]
    assert env["seed"] == 0 and env["torch"] and env["easyeditor"] == "0.0.1.dev0"
    assert res["baseline"]["metrics"]["LS"] == 1.0
    md = (out / "bench.md").read_text()
    assert "| FT | batch | 1 | ok |" in md
    assert _mend_archive_configured() or "MEND N=1: **failed**" in md
    assert "wiki.valid.tokens" in md  # the ROME/MEMIT statistics note
    gen = ft["generation"]
    for kind in ("rewrite", "rephrase"):
        assert set(gen[kind]) >= {"exact", "prefix", "token_acc", "entropy", "repetition", "degenerate", "n"}
    assert gen["rewrite"]["n"] == 1 and gen["max_new_tokens"] == 8
    assert res["baseline"]["generation"]["rewrite"]["n"] == 1
    assert "### Generation-based metrics" in md and (out / "bench_generation_vs_edits.png").exists()
    assert (tmp_path / "img" / "bench_score_vs_edits.png").exists()
    assert (out / "bench_time_vs_edits.png").exists()
    from easyedit_agrade.paths import REPO_ROOT

    assert str(REPO_ROOT) not in (out / "results.json").read_text()  # no machine paths in the output


def test_quick_bench_edit_sets_beyond_one_record(tmp_path, shared_data, easyeditor_module, embedded_model):
    """Regressions of the full benchmark: InstructEdit's second sequential edit was rejected by the archive's
    weights fingerprint (N>1 'failed'), and AGRADE's N=16 set (the pool's 13th record puts an attention-sink
    token of SmolLM2 at a target position) wrecked the model: ES/GS/LS 0, perplexity ~10^10. MALMEN without its
    own archive and MEND without one fail with messages that say what to do."""
    from easyedit_agrade.bench import bench_main

    out = tmp_path / "bench"
    rc = bench_main(["--quick", "--methods", "AGRADE,MALMEN,InstructEdit,MEND", "--sizes", "2,13", "--out", str(out),
                     "--no-plots", "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["n_edits"]): r for r in res["runs"]}
    base_ppl = res["baseline"]["general"]["ppl"]
    for key in [("AGRADE", 2), ("AGRADE", 13), ("InstructEdit", 2), ("InstructEdit", 13)]:
        r = runs[key]
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["general"]["ppl"] < 3 * base_ppl and not r.get("collapsed"), (key, r["general"]["ppl"], base_ppl)
        assert r["metrics"]["LS"] > 0.3 and r["metrics"]["ES"] > r["before"]["ES"], (key, r["metrics"]["LS"])
    malmen = runs[("MALMEN", 2)]
    if _shipped_malmen_archive(embedded_model[0]):  # the MALMEN preset edits with its own archive, like AGRADE
        for n in (2, 13):
            r = runs[("MALMEN", n)]
            assert r["status"] == "ok" and not r.get("collapsed"), (n, r.get("error"))
            assert r["metrics"]["ES"] > r["before"]["ES"]
    else:  # without one it fails with a message that says how to train it
        assert malmen["status"] == "failed"
        assert "--preset malmen" in malmen["error"] and "--preset malmen" in malmen["diagnosis"]
        assert runs[("MALMEN", 13)]["status"] == "skipped"
    if _mend_archive_configured():
        for n in (2, 13):  # runs (quality at 13 edits in one batch: archives/README.md, MEND card)
            assert runs[("MEND", n)]["status"] == "ok", (n, runs[("MEND", n)].get("error"))
    else:
        mend = runs[("MEND", 2)]
        assert mend["status"] == "failed" and mend["stage"] == "preflight" and "archive" in mend["error"]
        assert runs[("MEND", 13)]["status"] == "skipped"


def _mend_archive_configured() -> bool:
    """Whether the benchmark's MEND hparams name an archive (``archives/mend-smollm2-135m-instruct.safetensors``)."""
    from easyedit_agrade.bench.methods import METHODS, load_hparams

    return bool(getattr(load_hparams(METHODS["MEND"]), "archive", None))


def _shipped_malmen_archive(model) -> bool:
    """Whether ``archives/`` holds an archive the benchmark's MALMEN hparams accept (the project's own lookup)."""
    from easyedit_agrade.bench.methods import METHODS, load_hparams
    from easyedit_agrade.models.agrade.archive import ArchiveNotFoundError, find_archive

    try:
        find_archive(model, load_hparams(METHODS["MALMEN"]))
    except ArchiveNotFoundError:
        return False
    return True


def test_preflight_and_diagnosis_messages(easyeditor_module):
    from easyedit_agrade.bench.methods import METHODS, MethodUnavailable, diagnose, load_hparams, preflight
    from easyedit_agrade.models.agrade.archive import ArchiveNotFoundError

    mend = load_hparams(METHODS["MEND"])
    mend.archive = None
    with pytest.raises(MethodUnavailable, match="archive"):
        preflight(METHODS["MEND"], mend)
    malmen = load_hparams(METHODS["MALMEN"])
    preflight(METHODS["MALMEN"], malmen)  # nothing to say before the archive lookup
    why = diagnose(METHODS["MALMEN"], malmen, ArchiveNotFoundError("no trained AGRADE archive ..."))
    assert "easyedit-agrade train hparams/TRAINING/AGRADE/smollm2-135m.yaml --preset malmen --out" in why


def test_speed_option_times_methods_side_by_side(tmp_path, shared_data, easyeditor_module, embedded_model_dir):
    """``bench --speed``: the same records for every method in one process; ROME with real key statistics."""
    from easyedit_agrade.bench import bench_main

    out = tmp_path / "speed"
    rc = bench_main(["--speed", "--speed-methods", "FT,ROME", "--speed-sizes", "1", "--stats-tokens", "512",
                     "--out", str(out), "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "speed.json").read_text())
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == {"FT", "ROME"} and res["reference"] == "FT" and res["finished"] is True
    for r in runs.values():
        assert r["status"] == "ok", r.get("error")
        assert r["n_edits"] == 1 and r["edit_seconds"] > 0 and r["peak_rss_mb"] > 0
    assert runs["FT"]["ratio_to_reference"] == 1.0
    assert runs["ROME"]["ratio_to_reference"] == runs["ROME"]["edit_seconds"] / runs["FT"]["edit_seconds"]
    assert "512 tokens of wiki.valid.tokens" in runs["ROME"]["statistics"]
    assert "| ROME | 1 |" in (out / "speed.md").read_text()


def test_speed_run_stopped_midway_keeps_what_it_measured(tmp_path, shared_data, easyeditor_module, embedded_model_dir):
    """A long ``bench --speed`` run (hours for ROME/MEMIT at 128 edits on a CPU) writes speed.json/speed.md after
    every method, so a run stopped in the middle keeps the finished methods' rows, marked ``finished: false``."""
    from easyedit_agrade.bench.runner import build_parser, resolve_config
    from easyedit_agrade.bench.speed import run_speed

    out = tmp_path / "speed"
    cfg = resolve_config(build_parser().parse_args(["--speed", "--speed-methods", "FT,ROME", "--speed-sizes", "1",
                                                    "--stats-tokens", "512", "--out", str(out), "--threads", "1"]))

    class Stopped(Exception):
        pass

    def log(line: str) -> None:
        if line.startswith("[speed ROME"):  # the second method starts: stop the run here
            raise Stopped(line)

    with pytest.raises(Stopped):
        run_speed(cfg, log=log)
    res = json.loads((out / "speed.json").read_text())
    assert res["finished"] is False
    assert [(r["method"], r["status"]) for r in res["runs"]] == [("FT", "ok")]
    md = (out / "speed.md").read_text()
    assert "| FT | 1 |" in md and "ROME" not in md
