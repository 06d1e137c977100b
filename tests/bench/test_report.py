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


def _with_generation(results):
    gen = {"rewrite": {"exact": 0.25, "prefix": 0.5, "token_acc": 0.6, "entropy": 3.0, "repetition": 0.1, "n": 4},
           "rephrase": {"exact": 0.0, "prefix": 0.25, "token_acc": 0.3, "n": 4},
           "all": {"entropy": 3.25, "repetition": 0.125, "degenerate": 0.125, "n": 8},
           "examples": {"rewrite": [{"prompt": "The capital of France is", "target": "Rome",
                                     "generation": "Rome, Rome, Rome"}]}}
    results["generation_probes"] = {"records": "the first min(N, 4) evaluated records", "max_new_tokens": 8}
    results["baseline"]["generation"] = {"rewrite": {"exact": 0.0, "prefix": 0.0}, "all": {"entropy": 4.0}}
    for r in results["runs"]:
        if r["status"] == "ok":
            r["generation"] = gen
    return results


def test_generation_section_beside_teacher_forced():
    md = markdown_report(_with_generation(_results()))
    assert "### Generation-based metrics beside the teacher-forced ones" in md
    # ES (TF) 90.0, ES gen exact 25.0 / prefix 50.0, GS (TF) 60.0, gen 0.0 / 25.0, token acc 60.0, entropy, rep, degen
    assert "| FT | 4 | 90.0 | 25.0 | 50.0 | 60.0 | 0.0 | 25.0 | 60.0 | 3.25 | 12.5 | 12.5 |" in md
    assert "| unedited | 0 | 10.0 | 0.0 | 0.0 |" in md
    assert "*The capital of France is* → `Rome, Rome, Rome` (target: Rome)" in md
    assert "Generation-based" not in markdown_report(_results())  # absent when the run had none


def test_generation_plot_is_written(tmp_path):
    paths = write_plots(_with_generation(_results()), [tmp_path])
    assert "bench_generation_vs_edits.png" in {p.name for p in paths}


def test_generation_and_statistics_options():
    cfg = resolve_config(build_parser().parse_args([]))
    assert cfg["generation"] and cfg["gen_tokens"] == 16 and cfg["gen_records"] == 64
    assert cfg["statistics"] == "wiki" and cfg["stats_tokens"] == 100_000 and not cfg["speed"]
    quick = resolve_config(build_parser().parse_args(["--quick", "--no-generation", "--statistics", "identity"]))
    assert not quick["generation"] and quick["gen_tokens"] == 8 and quick["statistics"] == "identity"
    cfg = resolve_config(build_parser().parse_args(["--gen-tokens", "5", "--gen-records", "7"]))
    assert (cfg["gen_tokens"], cfg["gen_records"]) == (5, 7)


def test_speed_options():
    cfg = resolve_config(build_parser().parse_args(["--speed"]))
    assert cfg["speed"] and cfg["speed_methods"] == ["AGRADE", "MEMIT", "ROME"] and cfg["speed_sizes"] == [16, 128]
    assert cfg["out"].endswith("bench-speed")
    cfg = resolve_config(build_parser().parse_args(["--speed", "--speed-methods", "FT,ROME", "--speed-sizes",
                                                    "4,1,4"]))
    assert cfg["speed_methods"] == ["FT", "ROME"] and cfg["speed_sizes"] == [1, 4]


import pytest  # noqa: E402


@pytest.mark.parametrize("argv, needle", [
    (["--gen-tokens", "0"], "--gen-tokens"),
    (["--gen-records", "-1"], "--gen-records"),
    (["--stats-tokens", "0"], "--stats-tokens"),
    (["--speed", "--speed-sizes", "a,b"], "--speed-sizes"),
    (["--speed", "--speed-sizes", "0"], "--speed-sizes"),
    (["--speed", "--speed-methods", "NOPE"], "--speed-methods"),
])
def test_bad_options_name_the_option(argv, needle):
    with pytest.raises(SystemExit, match=needle):
        resolve_config(build_parser().parse_args(argv))


def test_speed_rows_and_markdown():
    from easyedit_agrade.bench.speed import speed_markdown, speed_rows

    def run(method, n, secs):
        return {"method": method, "n_edits": n, "status": "ok", "edit_seconds": secs, "peak_rss_mb": 900.0,
                "rss_delta_mb": 100.0, "cuda_max_allocated_mb": None}

    runs = [run("AGRADE", 16, 2.0), run("MEMIT", 16, 10.0), run("AGRADE", 128, 4.0), run("MEMIT", 128, 80.0),
            {"method": "ROME", "n_edits": 128, "status": "failed", "error": "boom"}]
    rows = speed_rows(runs, "AGRADE")
    by = {(r["method"], r["n_edits"]): r for r in rows}
    assert by[("MEMIT", 16)]["ratio_to_reference"] == 5.0 and by[("MEMIT", 128)]["ratio_to_reference"] == 20.0
    assert by[("AGRADE", 128)]["seconds_per_edit"] == 4.0 / 128 and by[("AGRADE", 16)]["ratio_to_reference"] == 1.0
    assert "ratio_to_reference" not in by[("ROME", 128)]
    md = speed_markdown({"command": "easyedit-agrade bench --speed", "reference": "AGRADE", "environment": "cpu",
                         "runs": rows})
    assert "| MEMIT | 128 | 80.0 | 0.625 | 20.00 | 900 | 100 | – |" in md
    assert "| ROME | 128 | failed: boom |" in md


def test_upstream_rows_join_the_default_run_only_where_easyedit_has_them(monkeypatch):
    from easyedit_agrade.bench import methods as M
    from easyedit_agrade.integration import upstream_methods as U

    assert {"AlphaEdit", "UltraEdit", "EMMET", "PMET", "EAMET"} <= set(M.UPSTREAM_ROWS)
    assert resolve_config(build_parser().parse_args(["--methods", "AlphaEdit,UltraEdit"]))["methods"] == [
        "AlphaEdit", "UltraEdit"]
    monkeypatch.setattr(U, "available_upstream_methods", lambda: {})
    assert M.default_methods() == M.ALL_METHODS  # the PyPI wheel: the eight base rows
    monkeypatch.setattr(U, "available_upstream_methods", lambda: {"AlphaEdit": U.UPSTREAM_METHODS["AlphaEdit"]})
    assert M.default_methods() == M.ALL_METHODS + ("AlphaEdit",)
    assert M.METHODS["UltraEdit"].hparams_file == "UltraEdit/smollm2-135m.yaml"
    spec = M.METHODS["EAMET"]
    assert M.edit_mode(spec, None)[0] == "sequential" and M.edit_mode(M.METHODS["AlphaEdit"], None)[0] == "batch"
