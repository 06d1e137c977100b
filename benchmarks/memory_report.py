"""Predicted per-rank peak memory of AGRADE editing and training (``easyedit_agrade.tools.memory_plan``).

For each model (``--model``: gpt-j-6b, llama-2-7b, mistral-7b, smollm2-135m, or ``--config path/config.json`` of
any LLaMA-type / GPT-J / GPT-2 Hugging Face model) and each data-parallel world size, prints a Markdown table of
every memory term of one edit and of one training step, the predicted peak (the largest total over the phases of
the run) and the sum of all terms. Every rank holds the whole LM and caches H/∇G only for its shard of the edits;
HᵀH, HᵀG and ΔW are full-size on every rank.

``--measure`` (the embedded SmolLM2 only, CPU) also runs, each in a fresh subprocess, a real AGRADE edit (the
EasyEdit executor path with the shipped archive) and one training step (``AGRADETrainer.train_step`` with the
shipped training config) on the first N CounterFact-val records, and reports the measured peak RSS minus the RSS
right after the model was loaded next to the prediction for the same tokenised batch (its actual token counts),
leaving out the LM weights term. "Loaded" includes one 4-token forward: the weights are memory-mapped and only
become resident once read. The peak is the kernel's VmHWM, reset after loading (``/proc/self/clear_refs``); the
children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go back to the OS and RSS follows live
memory.

Examples::

    python benchmarks/memory_report.py                                   # 3 × 7B + SmolLM2, 8192 edits, W = 1 2 8
    python benchmarks/memory_report.py --model llama-2-7b --edits 4096 --world-size 1 4 --dtype bf16
    python benchmarks/memory_report.py --config path/to/config.json --edits 2048
    python benchmarks/memory_report.py --model smollm2-135m --edits 256 --measure --measure-edits 64 256
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from easyedit_agrade.tools.memory_plan import (  # noqa: E402
    EDIT_PHASES, MODELS, STEP_PHASES, TRAIN_PHASES, ModelSpec, Workload, editing_plan, fmt_bytes, markdown_table,
    training_plan)

EMBEDDED = "smollm2-135m"
EDIT_HPARAMS = "hparams/AGRADE/smollm2-135m"
TRAIN_HPARAMS = "hparams/TRAINING/AGRADE/smollm2-135m.yaml"
ARCHIVE = "archives/agrade-smollm2-135m-instruct.safetensors"
DATA = "counterfact/counterfact-val.json"
DEFAULT_MODELS = ["gpt-j-6b", "llama-2-7b", "mistral-7b", EMBEDDED]


# ------------------------------------------------------------------------------------------------------------
# RSS helpers (Linux /proc; a sampling thread where the peak cannot be reset)
# ------------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # pragma: no cover - non-Linux

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak RSS from now on: the kernel's VmHWM after resetting it, else a 1 ms sampling thread."""

    def __init__(self) -> None:
        self.method = "VmHWM (reset via /proc/self/clear_refs)"
        self._thread = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _status_kib("VmHWM") is None:
                raise OSError("no VmHWM")
        except OSError:
            import threading

            self.method = "sampled every 1 ms"
            self._peak = rss_bytes()
            self._stop = threading.Event()

            def run() -> None:
                while not self._stop.wait(0.001):
                    self._peak = max(self._peak, rss_bytes())

            self._thread = threading.Thread(target=run, daemon=True)
            self._thread.start()

    def read(self) -> int:
        if self._thread is None:
            return (_status_kib("VmHWM") or 0) * 1024
        self._peak = max(self._peak, rss_bytes())
        return self._peak

    def stop(self) -> int:
        peak = self.read()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return peak


# ------------------------------------------------------------------------------------------------------------
# measurement (child process)
# ------------------------------------------------------------------------------------------------------------
def _set_stats(mbs, n: int) -> dict:
    """Mean padded tokens per record, mean target tokens per record, longest padded length, rows."""
    padded = sum(int(mb.input_ids.shape[0]) * int(mb.input_ids.shape[1]) for mb in mbs)
    targets = sum(int(mb.predict_mask.sum()) for mb in mbs)
    return {"tokens_per_record": padded / n, "targets_per_record": targets / n,
            "max_len": max(int(mb.input_ids.shape[1]) for mb in mbs), "rows": targets}


def _make_resident(model) -> None:
    """Run one 4-token forward: the weights are memory-mapped from safetensors and only count in RSS once they
    have been read, so without this the baseline would miss most of them."""
    import torch

    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=False)


def child(mode: str, n: int, threads: int) -> dict:
    import gc
    import tempfile

    import torch

    torch.set_num_threads(threads)
    from easyedit_agrade.dataset import read_records
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.paths import data_file

    os.chdir(ROOT)
    records = read_records(data_file(DATA), "counterfact", limit=n)
    if len(records) < n:
        raise SystemExit(f"only {len(records)} records in {DATA}")
    out: dict = {"mode": mode, "n": n, "threads": threads}
    if mode == "edit":
        from easyedit_agrade.core.checkpoint import read_metadata
        from easyedit_agrade.core.weights import restore_weights
        from easyedit_agrade.models.agrade import AGRADEHyperParams
        from easyedit_agrade.models.agrade.agrade_main import execute_agrade
        from easyedit_agrade.models.agrade.archive import load_networks
        from easyedit_agrade.models.agrade.editor import AGRADEEditor

        base = AGRADEHyperParams.from_hparams(EDIT_HPARAMS)
        meta = read_metadata(ARCHIVE)
        hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), **meta.get("hparams", {}), archive=ARCHIVE,
                                              batch_size=max(n, base.batch_size)))
        model, tok = load_model_and_tokenizer(str(hp.model_name))
        requests = [{"prompt": r.prompt, "target_new": r.target_new} for r in records]
        _make_resident(model)
        gc.collect()
        out["rss_after_load"] = rss_bytes()
        peak = PeakRSS()
        t0 = time.perf_counter()
        nets = load_networks(ARCHIVE, model, hp)
        weights_copy = execute_agrade(model, tok, requests, hp, nets=nets)  # one chunk: cache, solve, apply
        out["wall_s"] = time.perf_counter() - t0
        out["peak_rss"] = peak.stop()
        out["peak_method"] = peak.method
        restore_weights(model, weights_copy)
        ed = AGRADEEditor(model, tok, hp, nets)
        out["micro_batch"] = hp.cache_batch_size
        out["sets"] = {"edit": _set_stats(ed.encode([r.prompt for r in records], [r.target_new for r in records]),
                                          n)}
    else:
        from easyedit_agrade.models.agrade.agrade_trainer import AGRADETrainer, load_training_config

        cfg = load_training_config(TRAIN_HPARAMS, {"n_edits": n, "val_size": n, "val_every": 0,
                                                   "checkpoint_every": 0})
        model, tok = load_model_and_tokenizer(str(cfg.model_name))
        _make_resident(model)
        gc.collect()
        out["rss_after_load"] = rss_bytes()
        peak = PeakRSS()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = AGRADETrainer(cfg, records, records, model=model, tok=tok, out_dir=tmp, progress=False,
                                    log=lambda *a, **k: None)
            gc.collect()
            out["setup_peak_rss"] = peak.stop()
            out["rss_after_setup"] = rss_bytes()
            step_peak = PeakRSS()  # resets the high-water mark: the step alone
            stats = trainer.train_step(records)
            out["step_peak_rss"] = step_peak.stop()
        out["wall_s"] = time.perf_counter() - t0
        out["peak_rss"] = max(out["setup_peak_rss"], out["step_peak_rss"])
        out["peak_method"] = peak.method
        out["step_delta"] = out["step_peak_rss"] - out["rss_after_setup"]
        out["train_stats"] = {k: float(v) for k, v in stats.items()}
        ed = trainer.editor
        mb = cfg.cache_batch_size
        out["micro_batch"] = mb
        out["lower_dtype"] = cfg.train_lower_dtype
        out["sets"] = {
            "edit": _set_stats(ed.encode([r.prompt for r in records], [r.target_new for r in records], mb), n),
            "equiv": _set_stats(ed.encode([r.rephrase_prompt for r in records], [r.target_new for r in records],
                                          mb), n),
            "loc": _set_stats(ed.encode([r.locality_prompt for r in records],
                                        [r.locality_ground_truth for r in records], mb, max_length=None), n),
        }
    out["delta"] = out["peak_rss"] - out["rss_after_load"]
    return out


def workload_from_sets(n: int, sets: dict) -> Workload:
    """The :class:`Workload` of a measured batch (its actual padded lengths and target counts)."""
    e = sets["edit"]
    q, lc = sets.get("equiv", e), sets.get("loc", e)
    return Workload(n_edits=n, target_tokens=e["targets_per_record"],
                    prompt_tokens=e["tokens_per_record"] - e["targets_per_record"],
                    rephrase_prompt_tokens=q["tokens_per_record"] - e["targets_per_record"],
                    loc_prompt_tokens=lc["tokens_per_record"] - lc["targets_per_record"],
                    loc_target_tokens=lc["targets_per_record"], seq_len=e["max_len"],
                    rephrase_seq_len=q["max_len"], loc_seq_len=lc["max_len"])


def predict_measured(res: dict):
    spec = MODELS[EMBEDDED]
    wl = workload_from_sets(res["n"], res["sets"])
    if res["mode"] == "edit":
        return editing_plan(spec, wl, 1, dtype="fp32", micro_batch=res["micro_batch"], rank=spec.default_rank)
    return training_plan(spec, wl, 1, dtype="fp32", micro_batch=res["micro_batch"], rank=spec.default_rank,
                         lower_dtype=res.get("lower_dtype"))


def measured_rows(res: dict) -> list[dict]:
    """(label, predicted bytes, measured bytes, predicted phase) rows for one measured run."""
    plan = predict_measured(res)

    def best(exclude: tuple[str, ...], phases) -> tuple[int, str]:
        per = {ph: sum(t.nbytes for t in plan.terms if ph in t.phases and t.key not in exclude) for ph in phases}
        ph = max(per, key=lambda p: per[p])
        return per[ph], ph

    if res["mode"] == "edit":
        pred, ph = best(("weights",), EDIT_PHASES)
        return [dict(label="edit (executor)", predicted=pred, measured=res["delta"], phase=ph, plan=plan)]
    pred, ph = best(("weights",), TRAIN_PHASES)
    rows = [dict(label="trainer setup + 1st step", predicted=pred, measured=res["delta"], phase=ph, plan=plan)]
    # step alone, from the RSS after the trainer was built (LM, lower copy and hypernetwork already resident)
    pred, ph = best(("weights", "lower_copy", "hypernet"), STEP_PHASES)
    rows.append(dict(label="1st training step alone", predicted=pred, measured=res["step_delta"], phase=ph,
                     plan=plan))
    return rows


def measured_table(results: list[dict]) -> str:
    lines = ["| run | edits | rows T | longest L | solve | predicted | measured | measured / predicted | "
             "predicted peak phase | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for row in measured_rows(res):
            lines.append(f"| {row['label']} | {res['n']} | {res['sets']['edit']['rows']} | "
                         f"{res['sets']['edit']['max_len']} | {row['plan'].method} | {fmt_bytes(row['predicted'])} | "
                         f"{fmt_bytes(row['measured'])} | {row['measured'] / row['predicted']:.2f} | {row['phase']} | "
                         f"{res['wall_s']:.0f} |")
    return "\n".join(lines)


def run_child(mode: str, n: int, threads: int, timeout: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(n), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {mode} n={n} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=sorted(MODELS) + ["all"], default=None,
                   help="models to report (default: all four unless --config is given)")
    p.add_argument("--config", action="append", default=[], metavar="PATH",
                   help="a Hugging Face config.json (or its folder); edits the last --n-edited layers' 2nd MLP linear")
    p.add_argument("--n-edited", type=int, default=6, help="edited layers for --config models (default 6)")
    p.add_argument("--edits", type=int, default=8192, help="edits in the batch (default 8192, the paper's)")
    p.add_argument("--target-tokens", type=float, default=4.0, help="average target tokens per edit (default 4)")
    p.add_argument("--prompt-tokens", type=float, default=16.0, help="average prompt tokens per edit (default 16)")
    p.add_argument("--rephrase-prompt-tokens", type=float, help="training: paraphrase prompt tokens (default: prompt)")
    p.add_argument("--loc-prompt-tokens", type=float, help="training: locality prompt tokens (default: prompt)")
    p.add_argument("--loc-target-tokens", type=float, help="training: locality answer tokens (default: target)")
    p.add_argument("--world-size", type=int, nargs="+", default=[1, 2, 8], help="data-parallel ranks (default 1 2 8)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="LM dtype (default: bf16 for 7B, fp32 for SmolLM2)")
    p.add_argument("--micro-batch", type=int, help="records per cache/loss micro-batch (default: the hparams')")
    p.add_argument("--rank", type=int, help="hypernetwork rank (default 1920 for 7B as MALMEN, 128 for SmolLM2)")
    p.add_argument("--n-blocks", type=int, default=2, help="hypernetwork blocks (default 2)")
    p.add_argument("--mode", choices=["edit", "train", "both"], default="both")
    p.add_argument("--measure", action="store_true",
                   help="also measure edit + training step on the embedded SmolLM2 (CPU, subprocesses)")
    p.add_argument("--measure-edits", type=int, nargs="+", default=[64, 256])
    p.add_argument("--measure-modes", nargs="+", choices=["edit", "train"], default=["edit", "train"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of the measured runs (default 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measured run")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.threads)), flush=True)
        return 0
    names = args.model or ([] if args.config else DEFAULT_MODELS)
    if "all" in names:
        names = DEFAULT_MODELS
    specs: list[ModelSpec] = [MODELS[n] for n in names]
    specs += [ModelSpec.from_hf_config(c, n_edited=args.n_edited) for c in args.config]
    wl = Workload(n_edits=args.edits, target_tokens=args.target_tokens, prompt_tokens=args.prompt_tokens,
                  rephrase_prompt_tokens=args.rephrase_prompt_tokens, loc_prompt_tokens=args.loc_prompt_tokens,
                  loc_target_tokens=args.loc_target_tokens)
    modes = ["edit", "train"] if args.mode == "both" else [args.mode]
    report: dict = {"workload": asdict(wl), "models": {}}
    print(f"AGRADE memory plan per rank: {wl.n_edits} edits, {wl.prompt_tokens:g} prompt + {wl.target_tokens:g} "
          f"target tokens per edit; world sizes {args.world_size}. Sizes in GiB/MiB (2^30/2^20 bytes).")
    for spec in specs:
        kw = dict(dtype=args.dtype, micro_batch=args.micro_batch, rank=args.rank, n_blocks=args.n_blocks)
        dtype = args.dtype or spec.default_dtype
        print(f"\n## {spec.name} ({spec.n_params / 1e9:.2f} B params, {dtype}; edited {spec.n_modules} × "
              f"{spec.module_template.format('N')} Dh={spec.dh} Dg={spec.dg}; K={spec.upper_layers} upper layers; "
              f"rank {args.rank or spec.default_rank})")
        report["models"][spec.name] = {}
        for mode in modes:
            make = editing_plan if mode == "edit" else training_plan
            plans = [make(spec, wl, w, **kw) for w in args.world_size]
            mb = plans[0].micro_batch
            title = ("Editing (one batch, executor path)" if mode == "edit"
                     else "Training (one step, steady state: Adam state exists)")
            print(f"\n### {title}, micro-batch {mb}\n")
            print(markdown_table(plans))
            report["models"][spec.name][mode] = [
                {"world_size": p.world_size, "method": p.method, "peak_bytes": p.peak[0], "peak_phase": p.peak[1],
                 "sum_bytes": p.sum_bytes, "terms": {t.key: t.nbytes for t in p.terms}} for p in plans]
    if args.measure:
        results = []
        for n in args.measure_edits:
            for mode in args.measure_modes:
                print(f"\n[measure] {mode} with {n} edits on {EMBEDDED} (fresh subprocess, {args.threads} thread)…",
                      file=sys.stderr, flush=True)
                results.append(run_child(mode, n, args.threads, args.timeout))
        print(f"\n## Measured vs predicted ({EMBEDDED}, fp32, CPU, one rank)\n")
        print(measured_table(results))
        print(f"\nPredicted: the plan's peak for the measured batch, without the terms already resident at the "
              f"baseline (LM weights; for the step alone also the lower-dtype copy and the hypernetwork). "
              f"Measured: peak RSS ({results[0]['peak_method']}) minus RSS after loading (after building the "
              f"trainer, for the step alone); children ran with MALLOC_MMAP_THRESHOLD_=131072 and "
              f"{args.threads} torch thread(s).")
        report["measured"] = [dict(r, rows=[{k: v for k, v in row.items() if k != "plan"}
                                            for row in measured_rows(r)]) for r in results]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
