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
    assert mend["status"] == "failed" and "archive" in mend["diagnosis"]
    env = res["environment"]
    assert env["seed"] == 0 and env["torch"] and env["easyeditor"] == "0.0.1.dev0"
    assert res["baseline"]["metrics"]["LS"] == 1.0
    md = (out / "bench.md").read_text()
    assert "| FT | batch | 1 | ok |" in md and "MEND N=1: **failed**" in md
    assert "covariance adjustment off" in md
    assert (tmp_path / "img" / "bench_score_vs_edits.png").exists()
    assert (out / "bench_time_vs_edits.png").exists()
    from easyedit_agrade.paths import REPO_ROOT

    assert str(REPO_ROOT) not in (out / "results.json").read_text()  # no machine paths in the output
