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
