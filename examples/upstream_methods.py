"""EasyEdit upstream's AlphaEdit / UltraEdit (/ EMMET / PMET) on the embedded SmolLM2: N CounterFact-val records
edited in one batch through upstream ``BaseEditor.batch_edit``, scored with this project's teacher-forced scorers.

Needs an EasyEdit source checkout on the path (the ``make test-upstream`` environment)::

    EASYEDIT_SRC=/path/to/EasyEdit UPSTREAM_VENV=.venv-upstream bash scripts/test_upstream.sh   # builds the venv
    PYTHONPATH=/path/to/EasyEdit:. .venv-upstream/bin/python examples/upstream_methods.py -n 16 \\
        --methods AlphaEdit UltraEdit --out runs/upstream-methods/n16.json

Per method and N: ES / GS / LS / Score as the bench computes them (``easyedit_agrade.evaluate.suite.Evaluator``:
ES/GS = token accuracy of the new target on the edit / first paraphrase prompt, LS = agreement of the argmax on the
neighbourhood answers with the unedited model, Score = harmonic mean), the exact-match variants, EasyEdit's own
``rewrite_acc`` from ``batch_edit``, the edit seconds (EasyEdit's timing of the ``apply_algo`` call) and the
preparation seconds (mom2 export, AlphaEdit's projection: once per machine, then cached). The records are the first
N usable records (subject in the prompt) of ``counterfact/counterfact-val.json``; the weights are restored after
every method and checked bit-exact. The checkout's commit is recorded when ``EASYEDIT_SRC`` (or ``--src``) names it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def checkout_commit(src: str | None) -> str | None:
    if not src:
        return None
    try:
        return subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--n-edits", type=int, nargs="+", default=[16], help="batch sizes (default 16)")
    p.add_argument("--methods", nargs="+", default=["AlphaEdit", "UltraEdit"])
    p.add_argument("--data", default="counterfact/counterfact-val.json", help="records, under the shared data dir")
    p.add_argument("--hparams-dir", default="hparams")
    p.add_argument("--stats-dir", default=None, help="EasyEdit mom2 cache (default: the project's cache)")
    p.add_argument("--stats-tokens", type=int, default=100_000, help="wiki.valid.tokens tokens for mom2")
    p.add_argument("--device", default=None, help="override the YAMLs' device (e.g. cuda:0)")
    p.add_argument("--src", default=os.environ.get("EASYEDIT_SRC"), help="the EasyEdit checkout (for its commit)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0, help="seeds torch/numpy/random (AlphaEdit samples its context "
                   "templates)")
    args = p.parse_args(argv)

    import random

    import numpy as np
    import torch

    random.seed(args.seed)
    np.random.seed(args.seed)

    from easyedit_agrade.evaluate.records import load_records
    from easyedit_agrade.evaluate.suite import Evaluator
    from easyedit_agrade.integration.baselines import load_easyedit_hparams
    from easyedit_agrade.integration.upstream_methods import (UPSTREAM_METHODS, batch_edit_upstream,
                                                               unavailable_reason)
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.paths import data_file

    import easyeditor

    records, _ = load_records(data_file(args.data))
    records = [r for r in records if r.subject and r.subject in r.prompt and r.target_new.strip()]
    if max(args.n_edits) > len(records):
        p.error(f"{args.data} has {len(records)} usable records, fewer than {max(args.n_edits)}")
    model, tok = load_model_and_tokenizer()
    if args.device:
        model.to(args.device)
    evaluator = Evaluator(tok)
    out: dict = {"easyeditor": str(Path(easyeditor.__file__).parent),
                 "checkout_commit": checkout_commit(args.src), "data": args.data, "torch": torch.__version__,
                 "device": str(next(model.parameters()).device), "seed": args.seed, "runs": []}
    print(f"EasyEdit checkout commit: {out['checkout_commit']}", flush=True)
    pre_cache: dict = {}
    for n in args.n_edits:
        subset = records[:n]
        with torch.no_grad():
            pre_cache = evaluator.score(model, subset, known=pre_cache)
        before = evaluator.summarize(subset, [], pre_cache, pre_cache)
        for name in args.methods:
            torch.manual_seed(args.seed)
            method = UPSTREAM_METHODS[name]
            why = unavailable_reason(method)
            row: dict = {"method": name, "n": n}
            if why:
                row.update(status="unavailable", reason=why)
                out["runs"].append(row)
                print(f"[{name} N={n}] {why}", flush=True)
                continue
            hparams = load_easyedit_hparams(Path(args.hparams_dir) / method.hparams_file(), model=model, tok=tok)
            if args.device:
                hparams.device = args.device
            t0 = time.perf_counter()
            edit = batch_edit_upstream(method, hparams, model, tok, [r.to_request() for r in subset],
                                       stats_dir=args.stats_dir, n_tokens=args.stats_tokens, log=print)
            wall = time.perf_counter() - t0
            with torch.no_grad():
                post = evaluator.score(edit.model, subset)
            metrics = evaluator.summarize(subset, [], post, pre_cache)
            changed = any(not torch.equal(edit.originals[k], dict(edit.model.named_parameters())[k])
                          for k in edit.originals)
            edit.restore()
            params = dict(model.named_parameters())
            restored = all(torch.equal(edit.originals[k], params[k]) for k in edit.originals)
            ee = [m["post"].get("rewrite_acc") for m in edit.easyedit_metrics]
            ee_acc = [float(sum(a) / len(a)) if isinstance(a, list) else float(a) for a in ee if a is not None]
            row.update(status="ok", ES=metrics["ES"], GS=metrics["GS"], LS=metrics["LS"], Score=metrics["Score"],
                       ES_exact=metrics["ES_exact"], GS_exact=metrics["GS_exact"],
                       easyedit_rewrite_acc=sum(ee_acc) / len(ee_acc) if ee_acc else None,
                       edit_seconds=edit.edit_seconds, prepare_seconds=edit.prepare_seconds,
                       wall_seconds_with_easyedit_eval=wall, weights_changed=changed, weights_restored=restored,
                       edited_parameters=sorted(edit.originals), notes=edit.notes,
                       before={k: before[k] for k in ("ES", "GS", "LS", "Score")})
            out["runs"].append(row)
            print(f"[{name} N={n}] ES {row['ES']:.3f} GS {row['GS']:.3f} LS {row['LS']:.3f} Score {row['Score']:.3f} "
                  f"| edit {row['edit_seconds']:.1f}s (prepare {row['prepare_seconds']:.1f}s) | changed {changed} "
                  f"restored {restored}", flush=True)
            if not restored:
                print(f"[{name} N={n}] weights NOT restored", file=sys.stderr)
                return 1
    print("\n| method | N | ES | GS | LS | Score | edit s |\n|---|---|---|---|---|---|---|")
    for r in out["runs"]:
        if r["status"] == "ok":
            print(f"| {r['method']} | {r['n']} | {r['ES']:.3f} | {r['GS']:.3f} | {r['LS']:.3f} | {r['Score']:.3f} | "
                  f"{r['edit_seconds']:.1f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
