"""Choosing ``value_source: optimized``'s settings on validation records: one value search per set and N, then the
spread over the edited modules for every C₀ weight — ``value_preserved_weight`` per edit (``--lambdas``, λ = w·N) or
``value_preserved_keys`` (``--preserved-keys``, λ constant) — and ``value_sweeps`` asked for (issue 15, item 3).

``docs/agrade_generalization.md`` (§1–5) found that at AGRADE's edit site (layers 24–29, target rows) a
CounterFact paraphrase only gets the part of the edit its last-token key shares with the edit prompt's, and that
layers 3–7 with the subject's last token as a row carry edits to paraphrases — but a one-shot transformed
gradient cannot make the edit there. Its "next" was a *value-optimised* G (MEMIT's z), now
``easyedit_agrade/models/agrade/values.py``. The search does not depend on λ, so this script runs it once and
solves for each λ (the executor does both per call), reporting ES / GS / LS / Score (teacher-forced, as the
scaling report) and perplexity on held-out *statistics* text (``wiki.valid.tokens`` windows after C₀'s tokens —
never the test text). Sets as ``examples/agrade_scaling.py``: ``cf-val``, ``zsre-val``, and ``cf-train`` (CounterFact's
training split: no setting of the value path was trained on it, so it chooses settings for batches larger than
counterfact-val; ``--eval-cap`` then scores the first records of the batch only). ``--batches K`` repeats every
set and N on K disjoint record batches (records [b·N, (b+1)·N), each on the unedited model) and prints each
setting's mean ± sd and its paired Score difference to the first setting — one validation batch moves by
±0.02–0.03, so a choice should hold across batches (``agrade_scaling.batch_summary``). ``--network-etas F …``
also measures every solve followed by the trained network's edit of the value-edited model (``network_stage``,
the network of ``--network-hparams``) with its η times each F (``network_stage_eta_factor``).

Example::

    python examples/agrade_value_site.py --sets cf-val zsre-val --n 256 --lambdas 3 10 30 --prefixes 2 \\
        --out docs/generalization/value_site_256.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agrade_generalization import SETS  # noqa: E402
from agrade_scaling import batch_summary, summary_table  # noqa: E402

#: the value path has no trained network, so CounterFact's training split is not seen by any of its settings and
#: can choose them where counterfact-val (1,919 records) is too small (4,096 edits in one batch); the hypernetwork
#: archives were trained on it, so it is never used to compare them
VALUE_SETS = dict(SETS, **{"cf-train": ("counterfact/counterfact-train.json", "counterfact", 0)})

HPARAMS = "hparams/AGRADE/smollm2-135m"


def parse_layers(spec: str) -> list[int]:
    a, _, b = spec.partition("-")
    return list(range(int(a), int(b or a) + 1))


def heldout_ppl(model, windows, micro: int = 4) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(windows), micro):
            ids = windows[s:s + micro]
            out = model(input_ids=ids, labels=ids, use_cache=False)
            k = ids.numel() - ids.shape[0]
            nll += float(out.loss) * k
            n += k
    return math.exp(nll / n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["cf-val"], choices=list(VALUE_SETS))
    p.add_argument("--n", nargs="+", type=int, default=[256])
    p.add_argument("--layers", default="3-7")
    p.add_argument("--lambdas", nargs="+", type=float, default=[],
                   help="value_preserved_weight, C₀'s weight per edit: M = KᵀK + w·N·C₀")
    p.add_argument("--preserved-keys", nargs="+", type=float, default=[],
                   help="value_preserved_keys, a constant weight of C₀ (MEMIT's mom2_update_weight): M = KᵀK + λ·C₀")
    p.add_argument("--sweeps", nargs="+", type=int, default=[1],
                   help="passes of the spread over the modules (value_sweeps); every λ is solved with each")
    p.add_argument("--prefixes", type=int, default=0, help="context prefixes per prompt (wiki.valid sentences)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--clamp", type=float, default=4.0)
    p.add_argument("--stop-nll", type=float, default=0.05)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--eval-cap", type=int, default=None,
                   help="ES/GS/LS on the first this many edits of each batch (default: all of them)")
    p.add_argument("--batches", type=int, default=1,
                   help="disjoint batches of N records per set and N (records [b*N, (b+1)*N)); K > 1 adds mean ± sd")
    p.add_argument("--first-batch", type=int, default=0,
                   help="start at this batch (batches already measured by an earlier run; its JSON rows combine)")
    p.add_argument("--network-etas", nargs="+", type=float, default=[],
                   help="also measure each solve followed by the trained network's edit (network_stage) with its η "
                        "times each of these factors (network_stage_eta_factor)")
    p.add_argument("--network-hparams", default=HPARAMS,
                   help="the network_stage's YAML (its modules, archive and guards; default: the shipped network)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/agrade_value_site.json")
    args = p.parse_args(argv)
    # (the hparams field, its value, preserved_c0_weight's keyword for it)
    weights = ([("value_preserved_weight", w, "per_edit") for w in args.lambdas]
               + [("value_preserved_keys", k, "keys") for k in args.preserved_keys])
    if not weights:
        p.error("give --lambdas and/or --preserved-keys")
    if any(not f > 0 for f in args.network_etas):
        p.error(f"--network-etas must be > 0, got {args.network_etas}")
    if args.batches < 1:
        p.error(f"--batches must be >= 1, got {args.batches}")
    if not 0 <= args.first_batch < args.batches:
        p.error(f"--first-batch must be in [0, --batches), got {args.first_batch}")

    import torch

    from easyedit_agrade.core.preserved_stats import preserved_second_moments, resolve_corpus
    from easyedit_agrade.core.tokenize import spread_windows
    from easyedit_agrade.core.weights import apply_deltas, restore_weights
    from easyedit_agrade.models.agrade import values
    from easyedit_agrade.dataset import read_records
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_eval import accuracy, argmax_at_targets, build_probes, harmonic_mean
    from easyedit_agrade.models.agrade.archive import build_networks, find_archive, load_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor, network_stage_deltas
    from easyedit_agrade.paths import data_file

    torch.set_num_threads(args.threads)
    base = AGRADEHyperParams.from_hparams(HPARAMS)
    model, tok = load_model_and_tokenizer(str(base.model_name))
    layers = parse_layers(args.layers)
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in layers]
    hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), inner_params=names, use_preserved_cov=False,
                                          max_length=128, archive=None, preserved_change_budget=None))
    editor = AGRADEEditor(model, tok, hp, build_networks(model, hp))
    stage_editors = {}  # the network_stage per η factor, built on the unedited model (its archive, its C₀)
    if args.network_etas:
        stage_hp = AGRADEHyperParams.from_hparams(args.network_hparams)
        stage_nets = load_networks(str(find_archive(model, stage_hp)), model, stage_hp)
        stage_editors = {f: AGRADEEditor(model, tok, AGRADEHyperParams.from_dict(dict(stage_hp.to_dict(),
                                                                                  eta_factor=f)), stage_nets)
                         for f in args.network_etas}
    C0 = preserved_second_moments(model, tok, editor.stack.module_names, corpus=base.preserved_corpus,
                                  n_tokens=base.preserved_tokens, window=base.preserved_window,
                                  root=base.preserved_stats_dir, progress=True)
    corpus = resolve_corpus(base.preserved_corpus)
    windows = spread_windows(tok, corpus, n_windows=args.ppl_windows, window=base.preserved_window,
                             skip=base.preserved_tokens)
    ppl0 = heldout_ppl(model, windows)
    print(f"held-out perplexity (statistics text) unedited: {ppl0:.2f}", flush=True)
    prefixes = values.context_prefixes(corpus, args.prefixes)
    last = layers[-1]
    results: dict = {"command": " ".join(sys.argv), "unedited_heldout_ppl": ppl0, "rows": []}
    for set_name in args.sets:
        rel, fmt, start = VALUE_SETS[set_name]
        all_recs = read_records(data_file(rel), fmt, start=start, limit=max(args.n) * args.batches,
                                skip_invalid=True)
        if args.batches > 1 and max(args.n) * args.batches > len(all_recs):
            raise SystemExit(f"--batches {args.batches} × --n {max(args.n)} needs {max(args.n) * args.batches} "
                             f"records of {set_name!r}; it has {len(all_recs)}")
        for n, batch in [(n, b) for n in args.n for b in range(args.first_batch, args.batches)]:
            recs = all_recs[batch * n:(batch + 1) * n]
            pr = build_probes(editor, recs[:args.eval_cap])  # None: all of them
            ref = argmax_at_targets(editor, pr.loc)
            batches = values.encode_value_batches(tok, [r.prompt for r in recs], [r.target_new for r in recs],
                                                  [r.subject for r in recs], prefixes, micro_batch=64,
                                                  device=editor.device)
            t0 = time.perf_counter()
            delta, h, info = values.optimise_values(model, batches, len(recs), last, steps=args.steps, lr=args.lr,
                                                    weight_decay=args.weight_decay, clamp=args.clamp,
                                                    stop_nll=args.stop_nll)
            t_z = time.perf_counter() - t0
            print(f"[{set_name} N={len(recs)} batch {batch}] value search: {info} in {t_z:.0f}s", flush=True)
            for (field, w, kw), sweeps in [(w, s) for w in weights for s in args.sweeps]:
                lam = values.preserved_c0_weight(len(recs), **{kw: w})
                t1 = time.perf_counter()
                deltas = values.spread_values(model, batches, len(recs), editor.stack.module_names,
                                              editor.stack.layers[last], h + delta, C0, lam, sweeps=sweeps)
                t_w = time.perf_counter() - t1
                met = values.met_summary(values.met_share(model, batches, len(recs), editor.stack.module_names,
                                                          editor.stack.layers[last], h + delta, h, deltas))
                for eta in [None, *args.network_etas]:
                    total, t2 = dict(deltas), time.perf_counter()
                    if eta is not None:  # the executor's add_network_stage: the network's edit of the edited model
                        total, _ = network_stage_deltas(model, stage_editors[eta], deltas, [r.prompt for r in recs],
                                                        [r.target_new for r in recs], [r.subject for r in recs])
                    t_n = time.perf_counter() - t2
                    label = f"{field}={w:g}, sweeps={sweeps}" + (f", network η×{eta:g}" if eta is not None else "")
                    saved = apply_deltas(model, {k: d.float() for k, d in total.items()})
                    try:
                        row = {"set": set_name, "n": len(recs), "batch": batch, "editor": label, field: w,
                               "c0_weight": lam, "sweeps": sweeps, "network_eta": eta, "prefixes": args.prefixes,
                               "n_evaluated": pr.n, "es": accuracy(editor, pr.edit, pr.n),
                               "gs": accuracy(editor, pr.equiv, pr.n),
                               "ls": accuracy(editor, pr.loc, pr.n, reference=ref),
                               "heldout_ppl_ratio": heldout_ppl(model, windows) / ppl0,
                               "max_dw_ratio": max(float(d.norm() / saved[k + ".weight"].double().norm())
                                                   for k, d in total.items()),
                               **met, "search": info, "z_seconds": t_z, "solve_seconds": t_w,
                               "network_seconds": t_n if eta is not None else None}
                    finally:
                        restore_weights(model, saved)
                    row["score"] = harmonic_mean(row["es"], row["gs"], row["ls"])
                    results["rows"].append(row)
                    print(f"[{set_name} N={len(recs)} batch {batch} {label} (λ {lam:g})] "
                          f"ES {row['es']:.3f} GS {row['gs']:.3f} LS {row['ls']:.3f}"
                          f" Score {row['score']:.3f} held-out ppl ×{row['heldout_ppl_ratio']:.3f} max ‖ΔW‖/‖W‖ "
                          f"{row['max_dw_ratio']:.3f} value met (median) {row['met_median']:.2f} "
                          f"(search {t_z:.0f}s, spread {t_w:.0f}s, network {t_n:.0f}s)", flush=True)
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(results, indent=2))
    if args.batches > 1:
        results["summary"] = batch_summary(results["rows"], metrics=SUMMARY_METRICS)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print("\n".join(summary_lines(results["summary"])), flush=True)
    return 0


#: what the --batches summary averages (held-out perplexity on statistics text, never the test text)
SUMMARY_METRICS = ("es", "gs", "ls", "score", "heldout_ppl_ratio")


def summary_lines(summary: list[dict]) -> list[str]:
    """Markdown of ``--batches``' summary: per set, N and setting the mean ± sd and the paired Score difference."""
    return summary_table(summary, SUMMARY_METRICS, "setting", "held-out ppl ×")


if __name__ == "__main__":
    raise SystemExit(main())
