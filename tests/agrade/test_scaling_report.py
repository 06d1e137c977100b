"""The scaling report's Markdown (examples/agrade_scaling.py) from a synthetic results dict: no model needed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "agrade_scaling.py"


def _script():
    spec = importlib.util.spec_from_file_location("agrade_scaling_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(editor, **extra):
    return dict({"set": "cf", "n": 256, "editor": editor, "es": 0.9, "gs": 0.3, "ls": 0.8, "score": 0.5,
                 "portability": None, "ppl": 27.0, "edit_s": 10.0, "edits_per_s": 25.6,
                 "delta_ratio": {"m": 0.5}, "preserved_change": {"m": 0.08}, "peak_rss_mb": 4000.0,
                 "rounds": [{"solved": 1}]}, **extra)


def test_value_search_column_and_equal_cells():
    mod = _script()
    info = {"steps": 25, "nll_start": 6.123, "nll_end": 0.049, "converged": 238, "met_median": 0.81,
            "met_q10": 0.62}
    results = {"ppl_unedited": 25.0, "ppl_tokens": 1024,
               "rows": [_row("hypernetwork", value_search=None), _row("values", value_search=info),
                        {"set": "cf", "n": 256, "editor": "broken", "error": "RuntimeError('x')"}]}
    table = mod.markdown(results).splitlines()
    head = next(line for line in table if line.startswith("| set |"))
    assert head.rstrip().endswith("| value search |")
    body = [line for line in table if line.startswith("| cf |")]
    assert len(body) == 3
    assert {line.count("|") for line in body + [head]} == {head.count("|")}  # every row fills every column
    assert body[0].rstrip().endswith("| – |")
    assert "25 steps, 238 converged, NLL 6.12→0.05, met 0.81 (q10 0.62)" in body[1]


def test_value_search_text_tolerates_a_partial_report():
    mod = _script()
    assert mod.value_search_text({"steps": 3}) == "3 steps"
    assert mod.value_search_text({"steps": 3, "delta_ratio_median": 0.687}) == "3 steps, ‖δ‖/‖h‖ 0.69"


def test_batch_summary_means_sds_and_paired_differences():
    mod = _script()
    rows = []
    for b, (a, m) in enumerate([(0.50, 0.56), (0.40, 0.38), (0.60, 0.67)]):
        rows.append(_row("unedited", batch=b, score=0.05, ppl=25.0))
        rows.append(_row("agrade", batch=b, score=a, ppl=26.0 + b))
        rows.append(_row("malmen", batch=b, score=m, ppl=27.0))
    rows.append({"set": "cf", "n": 256, "batch": 1, "editor": "malmen-broken", "error": "RuntimeError('x')"})
    summary = {e["editor"]: e for e in mod.batch_summary(rows)}
    assert set(summary) == {"unedited", "agrade", "malmen"}  # the failed row is left out
    assert summary["agrade"]["batches"] == 3
    assert abs(summary["agrade"]["mean"]["score"] - 0.5) < 1e-12
    assert abs(summary["agrade"]["sd"]["score"] - 0.1) < 1e-12  # sample sd of 0.4, 0.5, 0.6
    assert abs(summary["agrade"]["mean"]["ppl"] - 27.0) < 1e-12
    assert "paired" not in summary["agrade"] and "paired" not in summary["unedited"]
    pair = summary["malmen"]["paired"]
    assert pair["against"] == "agrade" and pair["batches"] == 3 and pair["wins"] == 2  # +.06, -.02, +.07
    assert abs(pair["mean"] - 0.11 / 3) < 1e-12


def test_batch_summary_markdown_only_with_several_batches():
    mod = _script()
    one = {"ppl_unedited": 25.0, "ppl_tokens": 1024, "rows": [_row("agrade", batch=0), _row("malmen", batch=0)]}
    assert "disjoint batches" not in mod.markdown(one)
    assert "[batch 0]" not in mod.markdown(one)
    rows = [_row(e, batch=b, score=0.5 + 0.01 * b + (0.02 if e == "malmen" else 0.0)) for b in range(2)
            for e in ("agrade", "malmen")]
    text = mod.markdown({"ppl_unedited": 25.0, "ppl_tokens": 1024, "rows": rows})
    assert "| agrade [batch 1] |" in text
    line = next(x for x in text.splitlines() if x.startswith("| cf | 256 | malmen | 2 |"))
    assert "+0.020 ± 0.000 vs agrade (2/2 higher)" in line
    assert "0.525 ± 0.007" in line  # Score mean and sd over the 2 batches


def test_plot_draws_the_mean_over_batches(tmp_path, monkeypatch):
    mod = _script()
    import matplotlib.axes

    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def recording_plot(self, x, y, *args, **kwargs):
        drawn.append((list(x), list(y)))
        return real_plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    rows = [_row("agrade", n=n, batch=b, score=s, ppl=25.0 * (1 + b))
            for n, scores in ((16, (0.4, 0.6)), (256, (0.2, 0.3))) for b, s in enumerate(scores)]
    rows.append({"set": "cf", "n": 256, "editor": "old", "es": 0.5, "gs": 0.1, "ls": 0.5, "score": 0.2, "ppl": 30.0})
    mod.plot({"ppl_unedited": 25.0, "rows": rows}, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 0
    assert ([16, 256], [0.5, 0.25]) in drawn  # Score: one point per N, the batches' mean
    assert ([16, 256], [1.5, 1.5]) in drawn  # perplexity ratio, averaged the same way
    assert ([256], [0.2]) in drawn  # a row without a batch field (older JSON) still plots


def test_value_site_summary_averages_heldout_perplexity_per_setting():
    spec = importlib.util.spec_from_file_location("agrade_value_site_script", SCRIPT.parent / "agrade_value_site.py")
    site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(site)
    rows = [{"set": "cf-val", "n": 256, "batch": b, "editor": "value_preserved_weight=10, sweeps=1",
             "es": 0.9, "gs": g, "ls": 0.8, "score": s, "heldout_ppl_ratio": p}
            for b, (g, s, p) in enumerate([(0.30, 0.55, 1.04), (0.34, 0.57, 1.06)])] + [
            {"set": "cf-val", "n": 256, "batch": b, "editor": "value_preserved_weight=5, sweeps=1",
             "es": 0.9, "gs": 0.35, "ls": 0.75, "score": s, "heldout_ppl_ratio": 1.07}
            for b, s in enumerate([0.58, 0.56])]
    lines = site.summary_lines(_script().batch_summary(rows, metrics=site.SUMMARY_METRICS))
    assert lines[0].startswith("| set | N | setting | batches |") and len(lines) == 4
    first, second = lines[2], lines[3]
    assert "| 0.320 ± 0.028 |" in first  # GS mean ± sample sd of 0.30, 0.34
    assert first.count("|") == second.count("|") == lines[0].count("|")
    assert "| 1.050 ± 0.014 |" in first  # held-out perplexity ratio, not a test-text one
    assert "+0.010 ± 0.028 vs value_preserved_weight=10, sweeps=1 (1/2 higher)" in second
