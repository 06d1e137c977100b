"""``easyedit-agrade bench --speed``: edit time and peak memory of several methods on the same records, one process.

The AGRADE paper's Table 3 compares editing time per method at a given number of edits. Here every method in
``--speed-methods`` edits the **same** first N records of the benchmark pool for each N in ``--speed-sizes``, each
from a freshly loaded model, in one process on one machine, so the ratios are measured side by side. Timed: the
edit call only (EasyEdit's ``batch_edit`` / ``edit`` through the bench's method layer); not timed: loading the
model and the editor (for AGRADE: the archive) and writing ROME/MEMIT's key statistics files (computed once, cached;
AGRADE's C₀ is read from the same cache inside its timed edit). Peak memory: the resident set size sampled during
the edit (and CUDA's peak allocation when on a GPU). No evaluation.
"""
from __future__ import annotations

import contextlib
import gc
import json
import time
from pathlib import Path
from typing import Any, Callable

from .methods import METHODS


def speed_rows(runs: list[dict], reference: str) -> list[dict]:
    """Per-edit seconds and the ratio to ``reference`` at the same N (runs that failed keep their error)."""
    ref = {r["n_edits"]: r for r in runs if r["method"] == reference and r.get("status") == "ok"}
    rows = []
    for r in runs:
        row = dict(r)
        if r.get("status") == "ok":
            row["seconds_per_edit"] = r["edit_seconds"] / r["n_edits"]
            base = ref.get(r["n_edits"])
            row["ratio_to_reference"] = (r["edit_seconds"] / base["edit_seconds"]
                                         if base and base["edit_seconds"] > 0 else None)
        rows.append(row)
    return rows


def speed_markdown(result: dict) -> str:
    ref = result["reference"]
    lines = [f"## Edit speed side by side (`{result['command']}`)", "",
             f"Same records for every method, one process, {result['environment']}. Ratio: edit time ÷ {ref}'s at the "
             "same N (the paper's Table 3 shape).", "",
             "| Method | N | Edit time (s) | s / edit | × " + ref + " | Peak RSS (MB) | ΔRSS (MB) | CUDA peak (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['n_edits']} | failed: {r.get('error', '')[:80]} | | | | | |")
            continue
        ratio = "–" if r.get("ratio_to_reference") is None else f"{r['ratio_to_reference']:.2f}"
        cuda = "–" if r.get("cuda_max_allocated_mb") is None else f"{r['cuda_max_allocated_mb']:.0f}"
        lines.append(f"| {r['method']} | {r['n_edits']} | {r['edit_seconds']:.1f} | {r['seconds_per_edit']:.3f} | "
                     f"{ratio} | {r['peak_rss_mb']:.0f} | {r['rss_delta_mb']:.0f} | {cuda} |")
    notes = [n for r in result["runs"] for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"


def run_speed(cfg: dict, *, log: Callable[[str], None] = print) -> dict:
    """Time ``cfg['speed_methods']`` at ``cfg['speed_sizes']`` and write ``speed.json`` / ``speed.md`` in ``out``."""
    import torch

    from ..evaluate.records import build_pool
    from ..integration.cpu_compat import cuda_on_cpu
    from ..lm import load_model_and_tokenizer
    from ..paths import data_dir
    from .methods import (MethodUnavailable, apply_edits, edit_mode, load_hparams, make_editor, method_context,
                          preflight, prepare_edit)
    from .resources import measure
    from .runner import _quiet_easyedit, _seed_everything, atomic_write_text, bench_requests, environment, error_text

    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    pool = build_pool(data_dir(), seed=cfg["seed"])
    hdir = Path(cfg["hparams_dir"]) if cfg["hparams_dir"] else None
    env = environment(cfg["seed"])
    result = {"command": "easyedit-agrade bench " + " ".join(cfg.get("argv", [])),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "reference": cfg["speed_methods"][0],
              "environment": f"{env.get('machine')}, {env.get('cpu_count')} CPUs, {env.get('torch_threads')} torch "
                             f"threads, CUDA: {env.get('cuda_device') or 'none'}", "runs": []}
    runs: list[dict] = []
    for n in cfg["speed_sizes"]:
        records = pool.take(n)
        requests = bench_requests(records)
        for name in cfg["speed_methods"]:
            spec = METHODS[name]
            entry: dict[str, Any] = {"method": name, "n_edits": len(records)}
            notes: list[str] = []
            log(f"[speed {name} N={len(records)}] ...")
            model = None
            try:
                hparams = load_hparams(spec, hdir)
                mode, _ = edit_mode(spec, hparams)
                entry["mode"] = mode
                preflight(spec, hparams)
                _seed_everything(cfg["seed"])
                model, tok = load_model_and_tokenizer(cfg["model"])
                tok.padding_side = "left"
                with open(out / f"speed-{name}-{n}.log", "w", encoding="utf-8") as logf, \
                        contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf), cuda_on_cpu():
                    _quiet_easyedit()
                    editor = make_editor(hparams, model, tok, cfg["model"])
                    stats = prepare_edit(spec, editor.model, tok, editor.hparams, statistics=cfg["statistics"],
                                         n_tokens=cfg["stats_tokens"], n_requests=len(requests), notes=notes)
                    if stats:
                        entry["statistics"] = stats
                    with method_context(spec, editor.model, editor.hparams, len(requests), notes), measure() as m:
                        apply_edits(editor, requests, mode)
                entry.update(m.as_dict(), status="ok", notes=notes)
            except MethodUnavailable as exc:
                entry.update(status="failed", error=error_text(exc))
            except Exception as exc:  # noqa: BLE001 - reported, never dropped
                entry.update(status="failed", error=error_text(exc))
            finally:
                del model
                gc.collect()
            if entry["status"] == "ok":
                log(f"[speed {name} N={len(records)}] {entry['edit_seconds']:.1f}s, peak RSS "
                    f"{entry['peak_rss_mb']:.0f} MB")
            else:
                log(f"[speed {name} N={len(records)}] failed: {entry['error'][:200]}")
            runs.append(entry)
            # after every method: a long run that is stopped keeps what it has measured
            result["runs"] = speed_rows(runs, result["reference"])
            result["finished"] = len(runs) == len(cfg["speed_sizes"]) * len(cfg["speed_methods"])
            atomic_write_text(out / "speed.json", json.dumps(result, indent=1))
            md = speed_markdown(result)
            atomic_write_text(out / "speed.md", md)
    log(speed_markdown(result))
    return result
