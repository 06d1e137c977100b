"""``easyedit-agrade bench``: every method on the same model and data, side by side.

For each number of edits N (outer loop) and each method (inner loop, so partial runs still compare methods):

1. a fresh copy of the model is loaded and the first N records of the benchmark pool are edited through EasyEdit's
   ``BaseEditor`` (batch or sequential, see :mod:`.methods`), timing the edit and sampling its peak memory;
2. the first ``min(N, eval_cap)`` edited records are evaluated (ES/GS/LS/Editing Score, EasyEdit's metrics, the
   pitfalls suite) with :class:`easyedit_agrade.evaluate.Evaluator`, plus MQuAKE cases whose edits are all in;
3. general ability is measured (WikiText-2 perplexity on a fixed slice, the multiple-choice probe).

Failures are recorded with their error and traceback, never dropped. Results are written after every run
(``results.json``, atomically), so an interrupted run keeps what it measured and ``--resume`` continues it.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_write_text  # noqa: F401  (re-exported: edit_cli and tests import it from here)
from .methods import ALL_METHODS, METHODS, UPSTREAM_ROWS, covariance_note, default_methods

SCHEMA = "easyedit-agrade-bench/1"
FULL_SIZES = (1, 16, 128, 512, 2048)
QUICK_SIZES = (1, 4)
QUICK_METHODS = ("AGRADE", "MALMEN", "InstructEdit", "FT", "MEND")
#: a run whose WikiText-2 perplexity exceeds this many times the unedited model's is flagged ``collapsed``
COLLAPSE_PPL_FACTOR = 10.0
#: InstructEdit task name per data family (requests carry it as "task"; other methods ignore the key)
FAMILY_TASK = {"zsre": "zsre", "counterfact": "counterfact", "wiki_counterfact": "counterfact",
               "wiki_recent": "wikirecent", "mquake": "counterfact"}


def bench_requests(records: Sequence[Any]) -> list[dict]:
    """EasyEdit request dicts for pool records, each with the InstructEdit ``task`` of its data family."""
    return [{**r.to_request(), "task": FAMILY_TASK.get(r.family, r.family)} for r in records]


def build_parser(prog: str = "easyedit-agrade bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark AGRADE, the MALMEN preset, InstructEdit and EasyEdit's FT, LoRA, MEND, ROME and "
        "MEMIT through EasyEdit's BaseEditor on one model: ES/GS/LS/Editing Score, EasyEdit's metrics, the pitfalls "
        "suite (portability, Other-Attribution, Distract-Neighbor, MQuAKE), general-ability decay, edit time and "
        "peak memory. Writes results.json, bench.md and PNG plots.",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke test: sizes {QUICK_SIZES}, methods {', '.join(QUICK_METHODS)}, tiny evaluation")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join(ALL_METHODS)} and, with an EasyEdit source checkout, "
                        f"{', '.join(UPSTREAM_ROWS)} (default: all the installed EasyEdit has; --quick: a fast "
                        "subset)")
    p.add_argument("--sizes", default=None, help=f"comma-separated edit counts (default {FULL_SIZES})")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model alias or local Hugging Face directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--hparams-dir", default=None, help="folder with <METHOD>/smollm2-135m.yaml (default: hparams/)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench-full or runs/bench-quick)")
    p.add_argument("--plots-dir", default=None, help="also write the PNG plots here (e.g. docs/img)")
    p.add_argument("--eval-cap", type=int, default=None,
                   help="evaluate at most this many of the edited records (default 256; --quick 4)")
    p.add_argument("--max-probes", type=int, default=2, help="probes per locality/portability key and record")
    p.add_argument("--ppl-windows", type=int, default=None, help="WikiText-2 windows (default 8; --quick 1)")
    p.add_argument("--ppl-window", type=int, default=None, help="tokens per window (default 256; --quick 64)")
    p.add_argument("--mc-questions", type=int, default=None,
                   help="questions of the multiple-choice probe to use (default all 40; --quick 8)")
    p.add_argument("--max-edit-seconds", type=float, default=None,
                   help="skip a size when the edit time projected linearly from the method's previous size exceeds "
                        "this (default 3600; --quick 120)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="token budget of one evaluation forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--resume", action="store_true",
                   help="keep finished runs (ok and failed) from an existing results.json and run the rest")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: run failed methods again")
    p.add_argument("--redo", default=None,
                   help="with --resume: comma-separated methods whose finished runs are discarded and run again")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g = p.add_argument_group("generation-based metrics (greedy decoding of the edit and paraphrase prompts)")
    g.add_argument("--gen-tokens", type=int, default=None,
                   help="new tokens per greedy generation (default 16; --quick 8)")
    g.add_argument("--gen-records", type=int, default=None,
                   help="edited records generated from per run (default 64; --quick 4)")
    g.add_argument("--no-generation", action="store_true", help="teacher-forced metrics only")
    s = p.add_argument_group("key statistics of ROME / MEMIT (EasyEdit's mom2)")
    s.add_argument("--statistics", choices=("wiki", "identity"), default="wiki",
                   help="wiki: second moments over --stats-tokens tokens of wikitext/wiki.valid.tokens (one cache "
                        "with AGRADE's C0); identity: covariance adjustment off (default wiki)")
    s.add_argument("--stats-tokens", type=int, default=100_000, help="tokens of wiki.valid.tokens (default 100000)")
    t = p.add_argument_group("speed (the AGRADE paper's Table 3 shape)")
    t.add_argument("--speed", action="store_true",
                   help="time --speed-methods on the same records at --speed-sizes in one process and print "
                        "per-edit time ratios and peak memory (no evaluation); writes speed.json / speed.md")
    t.add_argument("--speed-methods", default="AGRADE,MEMIT,ROME", help="methods timed by --speed")
    t.add_argument("--speed-sizes", default="16,128", help="edit counts timed by --speed")
    return p


def _csv(text: str | None, default: Sequence) -> list:
    if not text:
        return list(default)
    return [x.strip() for x in text.split(",") if x.strip()]


def resolve_config(args: argparse.Namespace) -> dict:
    quick = bool(args.quick)
    methods = _csv(args.methods, QUICK_METHODS if quick else default_methods())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    redo = _csv(args.redo, ())
    if [m for m in redo if m not in METHODS]:
        raise SystemExit(f"unknown method(s) in --redo {redo}; choose from {', '.join(METHODS)}")
    sizes = sorted({int(s) for s in _csv(args.sizes, QUICK_SIZES if quick else FULL_SIZES)})
    if not sizes or sizes[0] < 1:
        raise SystemExit("--sizes must be positive integers")

    def pick(value, quick_default, full_default):
        return value if value is not None else (quick_default if quick else full_default)

    for option, value in (("--gen-tokens", args.gen_tokens), ("--gen-records", args.gen_records),
                          ("--stats-tokens", args.stats_tokens)):
        if value is not None and value < 1:
            raise SystemExit(f"{option} must be a positive integer, got {value}")
    speed_methods = _csv(args.speed_methods, ())
    if [m for m in speed_methods if m not in METHODS]:
        raise SystemExit(f"unknown method(s) in --speed-methods {speed_methods}; choose from {', '.join(METHODS)}")
    try:
        speed_sizes = sorted({int(x) for x in _csv(args.speed_sizes, ())})
    except ValueError:
        raise SystemExit(f"--speed-sizes must be comma-separated positive integers, got {args.speed_sizes!r}")
    if args.speed and (not speed_sizes or speed_sizes[0] < 1 or not speed_methods):
        raise SystemExit("--speed needs positive --speed-sizes and at least one --speed-methods entry")

    return {
        "mode": "quick" if quick else "full",
        "methods": methods,
        "sizes": sizes,
        "model": args.model,
        "hparams_dir": args.hparams_dir,
        "out": args.out or os.path.join("runs", "bench-speed" if args.speed else "bench-quick" if quick
                                        else "bench-full"),
        "plots_dir": args.plots_dir,
        "eval_cap": pick(args.eval_cap, 4, 256),
        "max_probes": args.max_probes,
        "ppl_windows": pick(args.ppl_windows, 1, 8),
        "ppl_window": pick(args.ppl_window, 64, 256),
        "mc_questions": pick(args.mc_questions, 8, None),
        "max_edit_seconds": pick(args.max_edit_seconds, 120.0, 3600.0),
        "batch_tokens": args.batch_tokens,
        "seed": args.seed,
        "threads": args.threads,
        "resume": bool(args.resume),
        "retry_failed": bool(args.retry_failed),
        "redo": _csv(args.redo, ()),
        "plots": not args.no_plots,
        "generation": not args.no_generation,
        "gen_tokens": pick(args.gen_tokens, 8, 16),
        "gen_records": pick(args.gen_records, 4, 64),
        "statistics": args.statistics,
        "stats_tokens": args.stats_tokens,
        "speed": bool(args.speed),
        "speed_methods": speed_methods,
        "speed_sizes": speed_sizes,
    }


def environment(seed: int) -> dict:
    """Versions, machine and seed (no paths)."""
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    from .. import __version__

    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        mem_gb = None
    env = {
        "easyedit_agrade": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "memory_gb": mem_gb,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "seed": seed,
    }
    for pkg in ("transformers", "easyeditor", "peft", "numpy"):
        env[pkg] = version(pkg)
    try:
        from ..integration.easyedit import easyedit_generation

        env["easyedit_generation"] = easyedit_generation()
    except Exception:  # pragma: no cover
        env["easyedit_generation"] = None
    return env


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _quiet_easyedit() -> None:
    """EasyEdit configures root logging at INFO and adds file handlers per editor: keep the console readable."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    for name in ("easyeditor", "easyeditor.editors.editor"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.WARNING)
        for h in list(lg.handlers):
            lg.removeHandler(h)


def scrub_paths(text: str) -> str:
    """Replace machine-specific folders in messages (repository, interpreter prefix, data, cache, home)."""
    from ..paths import REPO_ROOT, cache_dir, shared_dir

    pairs = [(str(REPO_ROOT), "<repo>"), (sys.prefix, "<python>"), (sys.base_prefix, "<python>"),
             (str(shared_dir()), "<shared>"), (str(cache_dir()), "<cache>"), (str(Path.home()), "~")]
    for old, new in sorted(pairs, key=lambda p: -len(p[0])):
        if old and len(old) > 1:
            text = text.replace(old, new)
    return text


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip()
    return scrub_paths(f"{type(exc).__name__}: {msg}" if msg else f"{type(exc).__name__} (no message)")


def _traceback_tail(exc: BaseException, lines: int = 12) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return scrub_paths("\n".join(text.rstrip().splitlines()[-lines:]))


class Bench:
    """State of one benchmark invocation (pool, probes, the unedited model's cached scores, results)."""

    def __init__(self, cfg: dict, log=print) -> None:
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg["out"])
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch

        from ..evaluate.general import WIKITEXT_FILE, load_mc_probe, wikitext_windows
        from ..evaluate.records import build_pool
        from ..evaluate.suite import Evaluator
        from ..lm import load_model_and_tokenizer
        from ..paths import data_dir

        cfg = self.cfg
        if cfg["threads"]:
            torch.set_num_threads(int(cfg["threads"]))
        _seed_everything(cfg["seed"])
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "edit-logs").mkdir(exist_ok=True)
        t0 = time.perf_counter()
        self.pool = build_pool(data_dir(), seed=cfg["seed"])
        max_n = max(cfg["sizes"])
        if len(self.pool.records) < max_n:
            self.log(f"note: the pool has {len(self.pool.records)} records; sizes above it are capped")
        self.eval_records_max = self.pool.take(min(max_n, cfg["eval_cap"]))
        self.cases_all = self.pool.cases_within(self.pool.take(max_n))
        self.model_alias = cfg["model"]
        model, self.tok = load_model_and_tokenizer(self.model_alias)
        self.tok.padding_side = "left"
        self.evaluator = Evaluator(self.tok, max_probes_per_key=cfg["max_probes"],
                                   batch_tokens=cfg["batch_tokens"])
        questions = load_mc_probe()
        if cfg["mc_questions"]:
            questions = questions[: cfg["mc_questions"]]
        self.questions = questions
        self.windows = wikitext_windows(self.tok, data_dir() / WIKITEXT_FILE, n_windows=cfg["ppl_windows"],
                                        window=cfg["ppl_window"])
        self.log(f"pool: {len(self.pool.records)} records from {len(self.pool.sources)} sources; evaluating up to "
                 f"{len(self.eval_records_max)} records per run; computing the unedited model's scores ...")
        self.pre = self.evaluator.score(model, self.eval_records_max, self.cases_all)
        self.baseline_general = self._general(model)
        self.baseline_generation = self._generation(model, self.eval_records_max)
        baseline = self.evaluator.summarize(self.eval_records_max, self.cases_all, self.pre, self.pre)
        del model
        gc.collect()
        self.log(f"setup done in {time.perf_counter() - t0:.0f}s (unedited: ES {baseline['ES']:.3f}, "
                 f"ppl {self.baseline_general.get('ppl', float('nan')):.2f}, "
                 f"MC acc {self.baseline_general.get('mc', {}).get('acc')})")
        previous = self._load_previous() if cfg["resume"] else {}
        command = "easyedit-agrade bench " + " ".join(self.cfg.get("argv", []))
        config = {k: v for k, v in cfg.items() if k != "argv"}
        if previous:  # a resumed benchmark reports every method and size of all its invocations
            old = previous.get("config", {})
            config["methods"] = [m for m in METHODS if m in set(old.get("methods", [])) | set(cfg["methods"])]
            config["sizes"] = sorted(set(old.get("sizes", [])) | set(cfg["sizes"]))
        invocations = list(previous.get("invocations") or
                           ([{"command": previous["command"]}] if previous.get("command") else []))
        invocations.append({"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.results = {
            "schema": SCHEMA,
            "command": command,
            "invocations": invocations,
            "config": config,
            "environment": environment(cfg["seed"]),
            "data": {"pool_size": len(self.pool.records), "sources": self.pool.sources, "notes": self.pool.notes,
                     "eval_records": "the first min(N, eval_cap) edited records; every size re-measures the same "
                                     "records under more edits",
                     "mquake_cases": len(self.cases_all)},
            "general_probes": {"perplexity": f"WikiText-2 test, first {cfg['ppl_windows']} x {cfg['ppl_window']} "
                                             "tokens", "mc_questions": len(self.questions)},
            "notes": [covariance_note(cfg["statistics"], cfg["stats_tokens"])],
            "generation_probes": ({"records": f"the first min(N, {cfg['gen_records']}) evaluated records",
                                   "max_new_tokens": cfg["gen_tokens"], "decoding": "greedy",
                                   "kinds": "rewrite (edit prompt), rephrase (first paraphrase)"}
                                  if cfg["generation"] else None),
            "baseline": {"metrics": baseline, "general": self.baseline_general,
                         "generation": self.baseline_generation},
            "methods": dict(previous.get("methods", {})),
            "runs": [r for r in previous.get("runs", []) if self._keep_previous(r)],
        }
        self.save()

    def _keep_previous(self, run: dict) -> bool:
        """On --resume: keep ok runs, failed ones (unless --retry-failed for a method run now), and skipped ones
        of methods not run now (the others are planned again)."""
        status, rerun = run.get("status"), run.get("method") in self.cfg["methods"]
        if run.get("method") in self.cfg.get("redo", ()):
            return False
        if status == "ok":
            return True
        if status == "failed":
            return not (self.cfg.get("retry_failed") and rerun)
        return not rerun

    def _load_previous(self) -> dict:
        path = self.out / "results.json"
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
        if data.get("schema") != SCHEMA:
            return {}
        return data

    def _general(self, model: Any) -> dict:
        from ..evaluate.general import general_ability

        return general_ability(model, self.tok, windows=self.windows, questions=self.questions,
                               batch_tokens=self.cfg["batch_tokens"])

    # ------------------------------------------------------------------ one run
    def _generation(self, model: Any, records: Sequence[Any]) -> dict | None:
        """Greedy-generation metrics on the first ``gen_records`` of ``records`` (None when switched off)."""
        if not self.cfg["generation"]:
            return None
        from ..evaluate.generation import generation_metrics

        chosen = list(records)[: self.cfg["gen_records"]]
        probes = {"rewrite": [(r.prompt, r.target_new) for r in chosen],
                  "rephrase": [(r.rephrase[0], r.target_new) for r in chosen if r.rephrase]}
        return generation_metrics(model, self.tok, probes, max_new_tokens=self.cfg["gen_tokens"], keep_texts=3)

    def _done(self, method: str, n: int) -> dict | None:
        for r in self.results["runs"]:
            if r["method"] == method and r["n_edits"] == n:
                return r
        return None

    def run(self) -> dict:
        for n in self.cfg["sizes"]:
            for name in self.cfg["methods"]:
                if self._done(name, n):
                    continue
                entry = self._plan_or_run(name, n)
                self.results["runs"].append(entry)
                self.save()
                self._print_run(entry)
        return self.results

    def _previous_runs(self, name: str, n: int) -> list[dict]:
        return sorted((r for r in self.results["runs"] if r["method"] == name and r["n_edits"] < n),
                      key=lambda r: r["n_edits"])

    def _plan_or_run(self, name: str, n: int) -> dict:
        spec = METHODS[name]
        entry: dict[str, Any] = {"method": name, "alg_name": spec.alg_name, "n_edits": n}
        prev = self._previous_runs(name, n)
        failed = [r for r in prev if r["status"] == "failed"]
        if failed:
            entry.update(status="skipped", reason=f"failed at N={failed[-1]['n_edits']}: {failed[-1]['error']}")
            return entry
        ok = [r for r in prev if r["status"] == "ok"]
        if ok:
            last = ok[-1]
            projected = last["edit_seconds"] * n / max(last["n_edits"], 1)
            if projected > self.cfg["max_edit_seconds"]:
                entry.update(status="skipped", reason=(
                    f"projected edit time {projected:.0f}s (linear from {last['edit_seconds']:.0f}s at "
                    f"N={last['n_edits']}) exceeds --max-edit-seconds {self.cfg['max_edit_seconds']:.0f}"))
                return entry
        skipped = [r for r in prev if r["status"] == "skipped"]
        if skipped and not ok:
            entry.update(status="skipped", reason=skipped[-1]["reason"])
            return entry
        if n > len(self.pool.records):
            entry.update(status="skipped", reason=f"the pool has only {len(self.pool.records)} records")
            return entry
        return self._run_one(name, n, entry)

    def _run_one(self, name: str, n: int, entry: dict) -> dict:
        import torch

        from ..integration.cpu_compat import cuda_on_cpu
        from ..lm import load_model_and_tokenizer
        from .methods import (MethodUnavailable, apply_edits, diagnose, edit_mode, load_hparams, make_editor,
                              method_context, preflight, prepare_edit)
        from .resources import measure

        spec = METHODS[name]
        self.log(f"[{name} N={n}] loading hparams and a fresh model ...")
        hdir = Path(self.cfg["hparams_dir"]) if self.cfg["hparams_dir"] else None
        try:
            hparams = load_hparams(spec, hdir)
        except Exception as exc:
            entry.update(status="failed", stage="hparams", error=error_text(exc),
                         traceback=_traceback_tail(exc), diagnosis=None)
            return entry
        mode, why = edit_mode(spec, hparams)
        self.results["methods"][name] = {"alg_name": spec.alg_name, "description": spec.description,
                                         "hparams": str(spec.hparams_path(hdir or Path("hparams"))), "mode": mode,
                                         "mode_reason": why, "overrides": dict(spec.overrides)}
        entry["mode"] = mode
        try:
            preflight(spec, hparams)
        except MethodUnavailable as exc:  # known not to run: say why, without loading a model
            entry.update(status="failed", stage="preflight", error=error_text(exc), traceback=None,
                         diagnosis=diagnose(spec, hparams, exc))
            return entry
        _seed_everything(self.cfg["seed"])
        model, tok = load_model_and_tokenizer(self.model_alias)
        tok.padding_side = "left"
        records = self.pool.take(n)
        requests = bench_requests(records)
        notes: list[str] = []
        log_path = self.out / "edit-logs" / f"{name}-{n}.log"
        edited = None
        with open(log_path, "w", encoding="utf-8") as logf:
            try:
                with contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf), cuda_on_cpu():
                    _quiet_easyedit()
                    editor = make_editor(hparams, model, tok, self.model_alias)
                    _quiet_easyedit()
                    statistics = prepare_edit(spec, editor.model, tok, editor.hparams,
                                              statistics=self.cfg["statistics"], n_tokens=self.cfg["stats_tokens"],
                                              n_requests=n, notes=notes)
                    if statistics:
                        entry["statistics"] = statistics
                    with method_context(spec, editor.model, editor.hparams, n, notes), measure() as m:
                        edited = apply_edits(editor, requests, mode)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, never dropped
                traceback.print_exc(file=logf)
                entry.update(status="failed", stage="edit", error=error_text(exc),
                             traceback=_traceback_tail(exc), diagnosis=diagnose(spec, hparams, exc), notes=notes,
                             log=str(log_path.relative_to(self.out)))
                del model
                gc.collect()
                return entry
        entry.update(m.as_dict())
        entry["notes"] = notes
        entry["log"] = str(log_path.relative_to(self.out))
        self.log(f"[{name} N={n}] edited in {m.seconds:.1f}s ({mode}); evaluating ...")
        t0 = time.perf_counter()
        try:
            eval_records = records[: min(n, self.cfg["eval_cap"])]
            cases = self.pool.cases_within(records)
            with torch.no_grad():
                post = self.evaluator.score(edited, eval_records, cases)
                metrics = self.evaluator.summarize(eval_records, cases, post, self.pre)
                before = self.evaluator.summarize(eval_records, cases, self.pre, self.pre)
                general = self._general(edited)
                generation = self._generation(edited, eval_records)
        except Exception as exc:  # noqa: BLE001
            entry.update(status="failed", stage="evaluate", error=error_text(exc),
                         traceback=_traceback_tail(exc), diagnosis=None)
            return entry
        finally:
            del edited, model
            gc.collect()
        base = self.baseline_general
        if "ppl" in general and "ppl" in base:
            general["ppl_delta"] = general["ppl"] - base["ppl"]
            if general["ppl"] > COLLAPSE_PPL_FACTOR * base["ppl"]:
                entry["collapsed"] = True
                notes.append(f"{name} N={n}: the edit broke the model (WikiText-2 perplexity {general['ppl']:.4g}, "
                             f"unedited {base['ppl']:.4g}); near-zero ES/GS/LS in this run measure a broken model, "
                             "not a faulty evaluation")
        if "mc" in general and "mc" in base:
            general["mc_acc_delta"] = general["mc"]["acc"] - base["mc"]["acc"]
        entry.update(status="ok", eval_seconds=time.perf_counter() - t0, n_eval_records=len(eval_records),
                     metrics=metrics, before={k: before[k] for k in ("ES", "GS", "LS", "Score")}, general=general)
        if generation is not None:
            entry["generation"] = generation
        return entry

    # ------------------------------------------------------------------ output
    def _print_run(self, e: dict) -> None:
        if e["status"] == "ok":
            mt = e["metrics"]

            def f(x):
                return "n/a" if x is None else f"{x:.3f}"

            self.log(f"[{e['method']} N={e['n_edits']}] ok: ES {f(mt['ES'])} GS {f(mt['GS'])} LS {f(mt['LS'])} "
                     f"Score {f(mt['Score'])}; edit {e['edit_seconds']:.1f}s, peak RSS {e['peak_rss_mb']:.0f} MB")
        elif e["status"] == "failed":
            self.log(f"[{e['method']} N={e['n_edits']}] FAILED ({e.get('stage')}): {e['error'][:300]}")
        else:
            self.log(f"[{e['method']} N={e['n_edits']}] skipped: {e['reason'][:300]}")

    def save(self) -> None:
        atomic_write_text(self.out / "results.json",
                          json.dumps(_sanitize(self.results), indent=1, default=_json_default, allow_nan=False))

    def finish(self) -> None:
        from .report import markdown_report, write_plots

        self.save()
        md = markdown_report(self.results)
        atomic_write_text(self.out / "bench.md", md)
        if self.cfg["plots"]:
            dirs = [self.out] + ([Path(self.cfg["plots_dir"])] if self.cfg["plots_dir"] else [])
            paths = write_plots(self.results, dirs)
            self.results["plots"] = [str(p) for p in paths]
            self.save()
        self.log(md)


def _sanitize(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def bench_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``easyedit-agrade bench`` (returns the exit status)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    cfg["argv"] = argv
    if cfg["speed"]:
        from .speed import run_speed

        run_speed(cfg, log=lambda msg: print(msg, flush=True))
        print(f"results: {Path(cfg['out']) / 'speed.json'}", flush=True)
        return 0
    bench = Bench(cfg, log=lambda msg: print(msg, flush=True))
    bench.setup()
    bench.run()
    bench.finish()
    print(f"results: {Path(cfg['out']) / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(bench_main())
