"""Markdown report and plots from a synthetic results dict (no model needed)."""
from __future__ import annotations

import json

from easyedit_agrade.bench.report import markdown_report, write_plots
from easyedit_agrade.bench.runner import _sanitize, atomic_write_text, resolve_config, build_parser, scrub_paths


def _results():
    metrics = {"ES": 0.9, "GS": 0.6, "LS": 0.8, "Score": 0.75,
               "portability": {"One-Hop": {"acc": 0.2, "n": 3}}, "locality": {"Distract-Neighbor": {"acc": 0.7}},
               "mquake": {"edit_wise": 1.0, "instance_wise": 0.0, "multi_hop": 0.5}}
    ok = lambda n, t: {"method": "FT", "n_edits": n, "status": "ok", "mode": "batch", "metrics": metrics,  # noqa
                       "edit_seconds": t, "peak_rss_mb": 1000.0, "cuda_max_allocated_mb": None,
                       "general": {"ppl": 20.0 + n, "ppl_delta": float(n), "mc": {"acc": 0.5, "acc_norm": 0.4},
                                   "mc_acc_delta": 0.0}, "notes": ["a shim was used"]}
    return {
        "command": "easyedit-agrade bench --quick", "config": {"methods": ["FT", "MEND"], "mode": "quick",
                                                               "model": "m", "eval_cap": 4},
        "environment": {"torch": "x", "cpu_count": 2}, "data": {"pool_size": 10},
        "baseline": {"metrics": {"ES": 0.1, "GS": 0.1, "LS": 1.0, "Score": 0.14}, "general": {"ppl": 20.0}},
        "methods": {"FT": {"alg_name": "FT", "hparams": "hparams/FT/x.yaml", "mode": "batch", "mode_reason": "r"}},
        "notes": ["covariance off"],
        "runs": [ok(1, 1.0), ok(4, 3.0),
                 {"method": "MEND", "n_edits": 1, "status": "failed", "stage": "edit", "error": "AssertionError",
                  "diagnosis": "MEND needs a trained archive"},
                 {"method": "MEND", "n_edits": 4, "status": "skipped", "reason": "failed at N=1"}],
    }


def test_markdown_lists_every_method_and_failure():
    md = markdown_report(_results())
    assert "| FT | batch | 4 | ok | 90.0 | 60.0 | 80.0 | 75.0 | 3.0 | 1000 |" in md
    assert "MEND N=1: **failed** (edit): `AssertionError` — MEND needs a trained archive" in md
    assert "MEND N=4: skipped: failed at N=1" in md
    assert "covariance off" in md and "FT: a shim was used" in md
    assert "| FT | 1 | 20.0 |" in md  # pitfalls table: One-Hop column


def test_plots_are_written(tmp_path):
    paths = write_plots(_results(), [tmp_path / "a", tmp_path / "b"])
    names = {p.name for p in paths}
    assert names == {"bench_score_vs_edits.png", "bench_time_vs_edits.png", "bench_general_vs_edits.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_json_helpers(tmp_path):
    assert _sanitize({"a": float("nan"), "b": [float("inf"), 1.0]}) == {"a": None, "b": [None, 1.0]}
    target = tmp_path / "x" / "r.json"
    atomic_write_text(target, json.dumps({"ok": 1}))
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]  # no temporary left behind
    from easyedit_agrade.paths import REPO_ROOT

    assert scrub_paths(f"no archive in {REPO_ROOT}/archives") == "no archive in <repo>/archives"


def test_config_defaults():
    quick = resolve_config(build_parser().parse_args(["--quick"]))
    assert quick["sizes"] == [1, 4] and quick["eval_cap"] == 4 and "FT" in quick["methods"]
    full = resolve_config(build_parser().parse_args([]))
    assert full["sizes"] == [1, 16, 128, 512, 2048] and len(full["methods"]) == 8


def test_resume_keeps_the_right_runs():
    from easyedit_agrade.bench.runner import Bench

    cfg = resolve_config(build_parser().parse_args(["--resume", "--retry-failed", "--methods", "ROME,InstructEdit",
                                                    "--redo", "ROME"]))
    keep = Bench(cfg)._keep_previous
    assert keep({"method": "FT", "status": "ok"})
    assert keep({"method": "FT", "status": "skipped"})  # not run now: its record stays
    assert keep({"method": "MEND", "status": "failed"})
    assert not keep({"method": "InstructEdit", "status": "failed"})  # --retry-failed
    assert not keep({"method": "InstructEdit", "status": "skipped"})  # planned again
    assert not keep({"method": "ROME", "status": "ok"})  # --redo
