"""AGRADE at scale: ES / GS / LS / Score / portability / WikiText-2 perplexity / edit time vs the number of edits
made in ONE batch, for several editors (archives × edit-time settings), on CounterFact and zsRE records outside
the training data. Markdown + JSON + PNG (Score and perplexity vs N, log-x), plus greedy generations of a few
edited prompts so degeneration ("India, India, India") shows.

Each editor is ``NAME=ARCHIVE[;key=value;...]`` (edit-time overrides of ``hparams/AGRADE/smollm2-135m.yaml``,
e.g. ``use_preserved_cov=true;log_mu_offset=2``, ``eta_factor=K`` to scale every η as calibrate does, and
``hparams=PATH`` to start from another YAML); ``shipped`` means the archive the YAML finds, ``none`` an untrained
network (for ``value_source: optimized``, which uses none: ``"values=none;hparams=hparams/AGRADE/smollm2-135m-values"``).

Sets (``--sets``; validation sets are the only ones to choose settings on):

* ``cf`` — ``counterfact/counterfact-edit.json`` (7,000 records; test);
* ``zsre`` — zsRE eval, ``portability/One_Hop/zsre_mend_eval_portability_gpt4.json`` (722 records; test;
  with one-hop portability questions);
* ``cf-val`` — ``counterfact/counterfact-val.json`` (1,919 records; validation);
* ``zsre-val`` — ``zsre/zsre_mend_train_10000.json`` records 9,000–9,999 (validation; never in a training pool of
  this project: the mixed pool stops at record 8,999).

For each set and N the first N records are edited in one batch (with ``--batches K``: K disjoint batches, records
[b·N, (b+1)·N) for b < K, each edited on the unedited model; the Markdown then adds each editor's mean ± sd over
the batches and its paired Score difference to the first editor — a spread from the records, not from training
seeds); ES/GS/LS/portability are measured on the first ``min(N, --eval-cap)`` of them (teacher-forced token
accuracy; LS = agreement with the unedited model), perplexity
on ``--ppl-windows`` × ``--ppl-window`` tokens of ``wikitext/wiki.test.tokens``. The model is restored bit-exactly
after every edit.

Example (the README table)::

    python examples/agrade_scaling.py --sets cf zsre --n 16 256 1024 2048 4096 \\
        --editor "default=shipped" --editor "preserved=shipped;use_preserved_cov=true" \\
        --out docs/agrade_scaling.json --md docs/agrade_scaling.md --plot docs/img/agrade_scaling.png
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

HPARAMS = "hparams/AGRADE/smollm2-135m"
SETS = {
    "cf": ("counterfact/counterfact-edit.json", "counterfact", 0),
    "zsre": ("portability/One_Hop/zsre_mend_eval_portability_gpt4.json", "zsre", 0),
    "cf-val": ("counterfact/counterfact-val.json", "counterfact", 0),
    "zsre-val": ("zsre/zsre_mend_train_10000.json", "zsre", 9000),
}


def parse_editor(spec: str) -> tuple[str, str, dict]:
    import yaml

    name, _, rest = spec.partition("=")
    archive, *over = rest.split(";")
    if not name or not archive:
        raise SystemExit(f"--editor {spec!r}: expected NAME=ARCHIVE[;key=value...]")
    return name, archive, {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in over if o)}


def read_set(name: str, n: int):
    from easyedit_agrade.dataset import read_records
    from easyedit_agrade.paths import data_file

    path, fmt, start = SETS[name]
    recs = read_records(data_file(path), fmt, start=start, limit=n, skip_invalid=True)
    portability = None
    if name == "zsre":
        raw = json.loads(data_file(path).read_text(encoding="utf-8"))
        portability = [(raw[r.index]["portability"]["New Question"], raw[r.index]["portability"]["New Answer"])
                       for r in recs]
    return recs, portability


def generation_checks(model, tok, recs, args) -> dict | None:
    """Greedy generation from the first ``--generations`` edit and paraphrase prompts (evaluate/generation.py):
    exact / prefix match of the new target, n-gram entropy, repetition, degenerate share, a few texts.
    ``--generations 0`` turns them off (None)."""
    from easyedit_agrade.evaluate.generation import generation_metrics

    if args.generations <= 0:
        return None
    chosen = recs[:args.generations]
    probes = {"rewrite": [(r.prompt, r.target_new) for r in chosen],
              "rephrase": [(r.rephrase_prompt, r.target_new) for r in chosen if r.rephrase_prompt]}
    return generation_metrics(model, tok, probes, max_new_tokens=args.gen_tokens, keep_texts=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["cf", "zsre"], choices=list(SETS))
    p.add_argument("--n", nargs="+", type=int, default=[16, 256, 1024, 2048, 4096])
    p.add_argument("--editor", action="append", default=[], metavar="NAME=ARCHIVE[;k=v...]")
    p.add_argument("--eval-cap", type=int, default=512)
    p.add_argument("--batches", type=int, default=1,
                   help="disjoint batches of N records per set and N (records [b*N, (b+1)*N)); K > 1 adds mean ± sd")
    p.add_argument("--ppl-windows", type=int, default=16,
                   help="wiki.test windows for perplexity (4 = the first 1,024 tokens, one article: noisy; the tables "
                        "before session 10 used 4)")
    p.add_argument("--ppl-window", type=int, default=256)
    p.add_argument("--generations", type=int, default=32,
                   help="edited records whose edit and paraphrase prompts are decoded greedily (generation metrics)")
    p.add_argument("--gen-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/agrade_scaling.json")
    p.add_argument("--md", help="also write the Markdown table here")
    p.add_argument("--plot", help="PNG: Score and perplexity vs N")
    args = p.parse_args(argv)
    editors = [parse_editor(s) for s in (args.editor or ["default=shipped"])]
    if args.batches < 1:
        p.error(f"--batches must be >= 1, got {args.batches}")

    import torch

    from easyedit_agrade.core.weights import apply_deltas, restore_weights
    from easyedit_agrade.evaluate.general import WIKITEXT_FILE, wikitext_windows
    from easyedit_agrade.evaluate.scoring import perplexity
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_eval import accuracy, argmax_at_targets, build_probes, harmonic_mean
    from easyedit_agrade.models.agrade.archive import build_networks, find_archive, load_networks
    from easyedit_agrade.paths import repo_relative
    from easyedit_agrade.core.preserved_stats import preserved_second_moments
    from easyedit_agrade.models.agrade.editor import AGRADEEditor, preserved_output_change
    from easyedit_agrade.paths import data_dir

    torch.set_num_threads(args.threads)
    base = AGRADEHyperParams.from_hparams(HPARAMS)
    model, tok = load_model_and_tokenizer(str(base.model_name))
    windows = wikitext_windows(tok, data_dir() / WIKITEXT_FILE, n_windows=args.ppl_windows, window=args.ppl_window)
    prepared_hp = []
    for name, archive, over in editors:
        settings = {k: v for k, v in over.items() if k != "hparams"}
        own = AGRADEHyperParams.from_hparams(over["hparams"]) if "hparams" in over else base
        prepared_hp.append(AGRADEHyperParams.from_dict(dict(own.to_dict(), **settings, batch_size=max(args.n))))
    # the probes run from the lowest edited layer of any editor, so every editor's ΔW is inside what they measure
    every_param = sorted({p for hp in prepared_hp for p in hp.inner_params},
                         key=lambda p: int(p.split(".layers.")[1].split(".")[0]) if ".layers." in p else 0)
    probe_hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), inner_params=every_param, use_preserved_cov=False,
                                                preserved_change_budget=None, archive=None))
    probe_editor = AGRADEEditor(model, tok, probe_hp, build_networks(model, probe_hp))
    # key statistics of the unedited model: every editor's predicted output change on ordinary text is reported
    stats = preserved_second_moments(model, tok, probe_editor.stack.module_names, corpus=base.preserved_corpus,
                                     n_tokens=base.preserved_tokens, window=base.preserved_window,
                                     root=base.preserved_stats_dir)
    results: dict = {"command": " ".join(sys.argv), "editors": {}, "sets": {}, "rows": [],
                     "ppl_unedited": float(perplexity(model, windows)), "ppl_tokens": int(windows.numel())}
    print(f"unedited WikiText-2 perplexity {results['ppl_unedited']:.2f} on {windows.numel()} tokens", flush=True)
    prepared = []
    for (name, archive, over), hp in zip(editors, prepared_hp):
        if archive == "none":  # an untrained network: what value_source: optimized uses (it needs none)
            path, nets = None, build_networks(model, hp)
        else:
            path = str(find_archive(model, hp)) if archive == "shipped" else archive
            hp = AGRADEHyperParams.from_dict(dict(hp.to_dict(), archive=path))
            nets = load_networks(path, model, hp)
        results["editors"][name] = {"archive": path and repo_relative(path), "overrides": over}
        prepared.append((name, hp, nets))
    for set_name in args.sets:
        all_recs, portability = read_set(set_name, max(args.n) * args.batches)
        cap = min(args.eval_cap, len(all_recs))
        ns = list(dict.fromkeys(min(n, len(all_recs)) for n in args.n))  # in the order given
        if args.batches > 1 and max(ns) * args.batches > len(all_recs):
            raise SystemExit(f"--batches {args.batches} × --n {max(ns)} needs {max(ns) * args.batches} records of "
                             f"{set_name!r}; it has {len(all_recs)}")
        results["sets"][set_name] = {"available": len(all_recs), "eval_cap": cap}
        probes_cache: dict[tuple[int, int], tuple] = {}

        def probes_for(first: int, n_eval: int):
            """Probes of records [first, first + n_eval) and the unedited model's answers to them."""
            if (first, n_eval) not in probes_cache:
                recs = all_recs[first:first + n_eval]
                pr = build_probes(probe_editor, recs)
                port = None
                if portability is not None:
                    port = probe_editor.encode([q for q, _ in portability[first:first + n_eval]],
                                               [a for _, a in portability[first:first + n_eval]], max_length=None)
                    probe_editor.lower(port)
                ref = argmax_at_targets(probe_editor, pr.loc)
                pre = {"es": accuracy(probe_editor, pr.edit, pr.n), "gs": accuracy(probe_editor, pr.equiv, pr.n),
                       "portability": accuracy(probe_editor, port, pr.n) if port is not None else None}
                probes_cache[(first, n_eval)] = (pr, port, ref, pre)
            return probes_cache[(first, n_eval)]

        for batch, n in [(b, n) for n in ns for b in range(args.batches)]:
            recs = all_recs[batch * n:(batch + 1) * n]
            pr, port, ref, pre = probes_for(batch * n, min(n, cap))
            row_pre = {"set": set_name, "n": n, "batch": batch, "editor": "unedited", "es": pre["es"],
                       "gs": pre["gs"], "ls": 1.0, "score": harmonic_mean(pre["es"], pre["gs"], 1.0),
                       "portability": pre["portability"], "ppl": results["ppl_unedited"]}
            if n == min(ns) and batch == 0:
                row_pre["generation"] = generation_checks(model, tok, recs, args)
            results["rows"].append(row_pre)
            for name, hp, nets in prepared:
                editor = AGRADEEditor(model, tok, hp, nets)
                t0 = time.perf_counter()
                try:
                    with torch.enable_grad():  # the executor's path: encode, cache, solve (× edit_rounds)
                        result = editor.edit_deltas([r.prompt for r in recs], [r.target_new for r in recs],
                                                    subjects=[r.subject for r in recs])
                except Exception as exc:  # reported in the table, never silently dropped
                    results["rows"].append({"set": set_name, "n": n, "batch": batch, "editor": name,
                                            "error": repr(exc)})
                    print(f"[{set_name} N={n} batch {batch}] {name}: FAILED {exc!r}", flush=True)
                    continue
                weights_copy = apply_deltas(model, result.deltas, mode=hp.apply_mode)
                edit_s = time.perf_counter() - t0
                try:
                    row = {"set": set_name, "n": n, "batch": batch, "editor": name, "edit_s": edit_s,
                           "edits_per_s": n / edit_s,
                           "es": accuracy(probe_editor, pr.edit, pr.n),
                           "gs": accuracy(probe_editor, pr.equiv, pr.n),
                           "ls": accuracy(probe_editor, pr.loc, pr.n, reference=ref),
                           "portability": accuracy(probe_editor, port, pr.n) if port is not None else None,
                           "ppl": float(perplexity(model, windows)),
                           "preserved_change": preserved_output_change(model, stats, result.deltas),
                           "rounds": result.rounds,
                           # value_source: optimized: the search's steps/NLL/converged and the placed share
                           "value_search": dict(result.values) or None,
                           "delta_ratio": {k: float(d.norm() / weights_copy[k + ".weight"].float().norm())
                                           for k, d in result.deltas.items()} if weights_copy else None,
                           "generation": generation_checks(model, tok, recs, args)}
                finally:
                    restore_weights(model, weights_copy)
                row["score"] = harmonic_mean(row["es"], row["gs"], row["ls"])
                row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                results["rows"].append(row)
                gen = row["generation"]
                gen_text = (f" | gen ES {gen['rewrite']['prefix']:.3f} {gen['examples']['rewrite'][0]['generation']!r}"
                            if gen else "")
                gen_text += f" | value search {value_search_text(row['value_search'])}" if row["value_search"] else ""
                port_text = row["portability"] if row["portability"] is None else round(row["portability"], 3)
                print(f"[{set_name} N={n} batch {batch}] {name}: ES {row['es']:.3f} GS {row['gs']:.3f} "
                      f"LS {row['ls']:.3f} Score {row['score']:.3f} port {port_text} "
                      f"ppl {row['ppl']:.1f} edit {edit_s:.1f} s{gen_text}", flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    print(table)
    results["markdown"] = table
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    if args.md:
        Path(args.md).write_text(table + "\n", encoding="utf-8")
    if args.plot:
        plot(results, args.plot)
    return 0


def value_search_text(info: dict) -> str:
    """One cell: the value search's steps, converged requests, mean target NLL and the placed share of the values."""
    parts = [f"{info.get('steps', '?')} steps"]
    if info.get("converged") is not None:
        parts.append(f"{info['converged']} converged")
    if info.get("nll_start") is not None and info.get("nll_end") is not None:
        parts.append(f"NLL {info['nll_start']:.2f}→{info['nll_end']:.2f}")
    if info.get("met_median") is not None:
        parts.append(f"met {info['met_median']:.2f} (q10 {info.get('met_q10', float('nan')):.2f})")
    if info.get("delta_ratio_median") is not None:
        parts.append(f"‖δ‖/‖h‖ {info['delta_ratio_median']:.2f}")
    return ", ".join(parts)


SUMMARY_METRICS = ("es", "gs", "ls", "score", "ppl")


def several_batches(rows: list[dict]) -> bool:
    """Whether the rows come from ``--batches`` > 1 (rows of older JSON have no batch field: batch 0)."""
    return any(r.get("batch", 0) for r in rows)


def batch_summary(rows: list[dict], metrics: Sequence[str] = SUMMARY_METRICS) -> list[dict]:
    """One entry per (set, N, editor) over its batches (one batch without ``--batches``) — ``batches``, ``mean``
    and sample ``sd`` (None for one batch) of ``metrics`` (ES, GS, LS, Score and perplexity), and for every editor
    after the first edited one its Score difference to that one on the same batches (``paired``: mean, sd, how many
    batches it scored higher). Failed rows are left out."""
    import statistics

    ok = [r for r in rows if "error" not in r]
    groups: dict[tuple, list[dict]] = {}
    first_edited: dict[tuple, str] = {}
    for r in ok:
        groups.setdefault((r["set"], r["n"], r["editor"]), []).append(r)
        if r["editor"] != "unedited":
            first_edited.setdefault((r["set"], r["n"]), r["editor"])
    out = []
    for (set_name, n, editor), rs in groups.items():
        entry = {"set": set_name, "n": n, "editor": editor, "batches": len(rs),
                 "mean": {k: statistics.fmean(r[k] for r in rs) for k in metrics},
                 "sd": {k: statistics.stdev([r[k] for r in rs]) if len(rs) > 1 else None for k in metrics}}
        ref_name = first_edited.get((set_name, n))
        if editor not in ("unedited", ref_name) and ref_name is not None:
            ref = {r.get("batch", 0): r["score"] for r in groups[(set_name, n, ref_name)]}
            diffs = [r["score"] - ref[r.get("batch", 0)] for r in rs if r.get("batch", 0) in ref]
            entry["paired"] = {"against": ref_name, "mean": statistics.fmean(diffs) if diffs else None,
                               "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                               "wins": sum(d > 0 for d in diffs), "batches": len(diffs)}
        out.append(entry)
    return out


def batch_summary_markdown(results: dict) -> list[str]:
    """The Markdown of :func:`batch_summary` (empty when every row is batch 0)."""
    if not several_batches(results["rows"]):
        return []
    return ["", "Over the disjoint batches (mean ± sample sd; paired = Score minus the first editor's on the same "
            "batches, and in how many batches it was higher):", "",
            *summary_table(batch_summary(results["rows"]), SUMMARY_METRICS, "editor", "ppl × unedited",
                           {"ppl": results["ppl_unedited"]})]


def summary_table(summary: list[dict], metrics: Sequence[str], who: str, last_metric: str,
                  scale: dict[str, float] | None = None) -> list[str]:
    """Markdown table of :func:`batch_summary`'s entries: set, N, ``who`` (the editor column's title), batches,
    mean ± sd of each of ``metrics`` (ES, GS, LS, Score, then one titled ``last_metric``; divided by
    ``scale[metric]`` where given) and the paired Score difference."""
    scale = scale or {}

    def cell(e, k):
        sd, s = e["sd"][k], scale.get(k, 1.0)
        return f"{e['mean'][k] / s:.3f}" + ("" if sd is None else f" ± {sd / s:.3f}")

    lines = [f"| set | N | {who} | batches | ES | GS | LS | Score | {last_metric} | paired Score difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        pair = e.get("paired")
        pair_text = "–" if not pair or pair["mean"] is None else (
            f"{pair['mean']:+.3f}" + ("" if pair["sd"] is None else f" ± {pair['sd']:.3f}")
            + f" vs {pair['against']} ({pair['wins']}/{pair['batches']} higher)")
        lines.append(f"| {e['set']} | {e['n']} | {e['editor']} | {e['batches']} | "
                     + " | ".join(cell(e, k) for k in metrics) + f" | {pair_text} |")
    return lines


def markdown(results: dict) -> str:
    lines = [f"Unedited WikiText-2 perplexity {results['ppl_unedited']:.2f} ({results['ppl_tokens']} test tokens). "
             "ES/GS/LS/portability on the first min(N, eval cap) edits of each batch.", ""]
    batched = several_batches(results["rows"])

    def who(r):  # the editor, and its batch when there are several
        return f"{r['editor']} [batch {r.get('batch', 0)}]" if batched else r["editor"]

    lines.append("| set | N | editor | ES | GS | LS | Score | portability | ppl (× unedited) | edit s | edits/s | "
                 "max ‖ΔW‖/‖W‖ | max output change on text | peak RSS MB | rounds | value search |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['set']} | {r['n']} | {who(r)} | failed: {r['error'][:80]} |" + " |" * 12)
            continue
        port = "–" if r.get("portability") is None else f"{r['portability']:.3f}"
        ratio = "–" if not r.get("delta_ratio") else f"{max(r['delta_ratio'].values()):.3f}"
        rel = r["ppl"] / results["ppl_unedited"]
        change = "–" if not r.get("preserved_change") else f"{max(r['preserved_change'].values()):.3g}"
        # solves made (edit_rounds; the rows before the option existed, and the unedited ones, have none recorded)
        solved = "–" if r["editor"] == "unedited" else str(sum(x["solved"] for x in r.get("rounds") or []) or 1)
        lines.append(f"| {r['set']} | {r['n']} | {who(r)} | {r['es']:.3f} | {r['gs']:.3f} | {r['ls']:.3f} | "
                     f"{r['score']:.3f} | {port} | {r['ppl']:.1f} ({rel:.2f}×) | "
                     f"{r.get('edit_s', 0):.1f} | {r.get('edits_per_s', 0):.1f} | {ratio} | {change} | "
                     f"{r.get('peak_rss_mb', 0):.0f} | {solved} | "
                     f"{value_search_text(r['value_search']) if r.get('value_search') else '–'} |")
    lines += batch_summary_markdown(results)
    gens = [r for r in results["rows"] if r.get("generation")]
    if gens:
        lines += ["", "Generation-based checks (greedy, first edited records; prefix = the generation starts with the new "
                  "target, entropy = ROME/EasyEdit bi-/tri-gram entropy, degenerate = more than half the bigrams "
                  "repeated):", "",
                  "| set | N | editor | ES TF | ES gen exact | ES gen prefix | GS TF | GS gen prefix | entropy | "
                  "repetition | degenerate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in gens:
            g = r["generation"]
            rw, rp, al = g["rewrite"], g.get("rephrase", {}), g["all"]
            lines.append(f"| {r['set']} | {r['n']} | {who(r)} | {r['es']:.3f} | {rw['exact']:.3f} | "
                         f"{rw['prefix']:.3f} | {r['gs']:.3f} | {rp.get('prefix', float('nan')):.3f} | "
                         f"{al['entropy']:.2f} | {al['repetition']:.3f} | {al['degenerate']:.3f} |")
        lines += ["", "Greedy generations (first edited prompts):", ""]
        for r in gens:
            for e in r["generation"]["examples"]["rewrite"][:2]:
                lines.append(f"- {r['set']} N={r['n']} {who(r)}: {e['prompt']!r} → {e['generation']!r}")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in results["rows"] if "error" not in r and r["editor"] != "unedited"]
    means = {(e["set"], e["editor"], e["n"]): e["mean"] for e in batch_summary(rows)}  # over --batches
    for key in sorted({(r["set"], r["editor"]) for r in rows}):
        pts = sorted((n, m["score"], m["ppl"]) for (s, e, n), m in means.items() if (s, e) == key)
        label = f"{key[0]} · {key[1]}"
        axes[0].plot([x[0] for x in pts], [x[1] for x in pts], marker="o", label=label)
        axes[1].plot([x[0] for x in pts], [x[2] / results["ppl_unedited"] for x in pts], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="edits in one batch", ylabel="Editing Score", title="Score vs N")
    axes[1].set(xscale="log", yscale="log", xlabel="edits in one batch", ylabel="perplexity / unedited",
                title="WikiText-2 perplexity vs N")
    axes[1].axhline(1.3, color="grey", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
