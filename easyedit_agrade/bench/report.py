"""Markdown tables and PNG plots from a benchmark's ``results.json`` (matplotlib is imported only for plots)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

PORTABILITY_COLUMNS = (("One-Hop", "One-Hop"), ("Subject-Replace", "Subj-Repl"), ("Inverse-Relation", "Inverse"),
                       ("Reasoning", "KE-Reason"), ("Subject_Aliasing", "KE-Alias"),
                       ("Logical_Generalization", "KE-Logic"))
LOCALITY_COLUMNS = (("Other-Attribution", "Other-Attr"), ("Distract-Neighbor", "Distract-N"),
                    ("Forgetfulness", "KE-Forget"))


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ordered_runs(results: dict) -> list[dict]:
    methods = results.get("config", {}).get("methods") or []
    order = {m: i for i, m in enumerate(methods)}
    return sorted(results.get("runs", []), key=lambda r: (order.get(r["method"], 99), r["n_edits"]))


def markdown_report(results: dict) -> str:
    """The benchmark as markdown: headline table, pitfalls table, general ability, failures and notes."""
    runs = _ordered_runs(results)
    env = results.get("environment", {})
    cfg = results.get("config", {})
    base = results.get("baseline", {})
    out = [f"## Benchmark ({cfg.get('mode', '?')} mode) on `{cfg.get('model', '?')}`", ""]
    invocations = results.get("invocations") or [{"command": results.get("command", "")}]
    if len(invocations) > 1:
        out.append("Commands (a resumed benchmark): " + "; then ".join(f"`{i['command']}`" for i in invocations)
                   + "  ")
    else:
        out.append(f"Command: `{invocations[0]['command']}`  ")
    out.append(f"Environment: easyedit-agrade {env.get('easyedit_agrade')}, torch {env.get('torch')}, transformers "
               f"{env.get('transformers')}, easyeditor {env.get('easyeditor')}, peft {env.get('peft')}; "
               f"{env.get('machine')} with {env.get('cpu_count')} CPUs ({env.get('torch_threads')} torch threads), "
               f"CUDA: {env.get('cuda_device') or 'none'}; seed {env.get('seed')}.  ")
    data = results.get("data", {})
    out.append(f"Edits: the first N records of a {data.get('pool_size')}-record pool mixing zsRE, CounterFact, "
               f"KnowEdit and MQuAKE; metrics on the first min(N, {cfg.get('eval_cap')}) of them. Values in %.")
    out.append("")
    bm = base.get("metrics", {})
    bg = base.get("general", {})
    header = ["Method", "Mode", "N", "Status", "ES", "GS", "LS", "Score", "Edit time (s)", "Peak RSS (MB)"]
    rows = [["unedited", "–", "0", "ok", _pct(bm.get("ES")), _pct(bm.get("GS")), _pct(bm.get("LS")),
             _pct(bm.get("Score")), "–", "–"]]
    for r in runs:
        m = r.get("metrics", {})
        mem = r.get("peak_rss_mb")
        if r.get("cuda_max_allocated_mb") is not None:
            mem = f"{r['peak_rss_mb']:.0f} / CUDA {r['cuda_max_allocated_mb']:.0f}"
        elif mem is not None:
            mem = f"{mem:.0f}"
        rows.append([r["method"], r.get("mode", "–"), str(r["n_edits"]), r["status"], _pct(m.get("ES")),
                     _pct(m.get("GS")), _pct(m.get("LS")), _pct(m.get("Score")),
                     _f(r.get("edit_seconds"), 1), mem or "–"])
    out += ["### Edit quality (AGRADE paper metrics)", "", _table(header, rows), ""]

    ok = [r for r in runs if r["status"] == "ok"]
    header = (["Method", "N"] + [c for _, c in PORTABILITY_COLUMNS] + [c for _, c in LOCALITY_COLUMNS]
              + ["MQuAKE EW", "MQuAKE IW", "MQuAKE MH"])

    def pit_row(name: str, n: str, m: dict) -> list[str]:
        port, loc, mq = m.get("portability", {}), m.get("locality", {}), m.get("mquake", {})
        return ([name, n] + [_pct(port.get(k, {}).get("acc")) for k, _ in PORTABILITY_COLUMNS]
                + [_pct(loc.get(k, {}).get("acc")) for k, _ in LOCALITY_COLUMNS]
                + [_pct(mq.get("edit_wise")), _pct(mq.get("instance_wise")), _pct(mq.get("multi_hop"))])

    rows = [pit_row("unedited", "0", bm)] + [pit_row(r["method"], str(r["n_edits"]), r["metrics"]) for r in ok]
    out += ["### Pitfalls suite (portability, locality beyond neighbours, multi-hop)", "",
            "Portability: token accuracy on the new answer; KE-* are KnowEdit's. Other-Attr / Distract-N / KE-Forget: "
            "agreement with the unedited model (100 = unchanged). MQuAKE: edit-wise, instance-wise, multi-hop "
            "accuracy (exact match, any alias).", "", _table(header, rows), ""]

    header = ["Method", "N", "WikiText-2 PPL", "ΔPPL", "MC acc", "ΔMC acc", "MC acc (len-norm)"]
    rows = [["unedited", "0", _f(bg.get("ppl"), 2), "–", _pct(bg.get("mc", {}).get("acc")), "–",
             _pct(bg.get("mc", {}).get("acc_norm"))]]
    for r in ok:
        g = r.get("general", {})
        rows.append([r["method"], str(r["n_edits"]), _f(g.get("ppl"), 2), _f(g.get("ppl_delta"), 2),
                     _pct(g.get("mc", {}).get("acc")),
                     "–" if g.get("mc_acc_delta") is None else f"{100 * g['mc_acc_delta']:+.1f}",
                     _pct(g.get("mc", {}).get("acc_norm"))])
    out += ["### General ability after editing", "", _table(header, rows), ""]

    out += generation_section(results, ok)

    methods = results.get("methods", {})
    if methods:
        out += ["### Methods", ""]
        for name, info in methods.items():
            out.append(f"- **{name}** ({info.get('alg_name')}, `{info.get('hparams')}`): {info.get('mode')} — "
                       f"{info.get('mode_reason')}")
        out.append("")
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        out += ["### Failed and skipped runs", ""]
        for r in bad:
            if r["status"] == "failed":
                why = f" — {r['diagnosis']}" if r.get("diagnosis") else ""
                out.append(f"- {r['method']} N={r['n_edits']}: **failed** ({r.get('stage')}): "
                           f"`{r['error'][:400]}`{why}")
            else:
                out.append(f"- {r['method']} N={r['n_edits']}: skipped: {r.get('reason', '')[:400]}")
        out.append("")
    notes = list(results.get("notes", []))
    for r in ok:
        for n in r.get("notes", []):
            text = f"{r['method']}: {n}" if not n.startswith(r["method"]) else n
            if text not in notes:
                notes.append(text)
    if notes:
        out += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def generation_section(results: dict, ok: Sequence[dict]) -> list[str]:
    """The generation-based table beside the teacher-forced ES/GS (empty when the run had no generation)."""
    base = results.get("baseline", {})
    if not base.get("generation") and not any(r.get("generation") for r in ok):
        return []
    probes = results.get("generation_probes") or {}
    header = ["Method", "N", "ES (TF)", "ES gen exact", "ES gen prefix", "GS (TF)", "GS gen exact", "GS gen prefix",
              "gen token acc", "n-gram entropy", "repetition", "degenerate"]

    def row(name: str, n: str, m: dict, g: dict | None) -> list[str]:
        g = g or {}
        rw, rp, al = g.get("rewrite", {}), g.get("rephrase", {}), g.get("all", {})
        return [name, n, _pct(m.get("ES")), _pct(rw.get("exact")), _pct(rw.get("prefix")), _pct(m.get("GS")),
                _pct(rp.get("exact")), _pct(rp.get("prefix")), _pct(rw.get("token_acc")), _f(al.get("entropy"), 2),
                _pct(al.get("repetition")), _pct(al.get("degenerate"))]

    rows = [row("unedited", "0", base.get("metrics", {}), base.get("generation"))]
    rows += [row(r["method"], str(r["n_edits"]), r.get("metrics", {}), r.get("generation")) for r in ok]
    out = ["### Generation-based metrics beside the teacher-forced ones", "",
           f"Greedy decoding of {probes.get('max_new_tokens', '?')} new tokens from the edit prompt (ES) and the first "
           f"paraphrase (GS), on {probes.get('records', 'the evaluated records')}. TF = teacher-forced token "
           "accuracy (the tables above). *exact*: the answer up to the first newline / sentence end equals the new "
           "target (normalised); *prefix*: the generation starts with it; *token acc*: target tokens reproduced at "
           "their positions without teacher forcing. Fluency: ROME/EasyEdit's weighted bi-/tri-gram entropy (bits) "
           "and the share of repeated bigrams; *degenerate*: generations with more than half their bigrams "
           "repeated.", "", _table(header, rows), ""]
    examples = [(r, r["generation"].get("examples", {})) for r in ok if r.get("generation")]
    shown = [(r, ex) for r, ex in examples if ex.get("rewrite")][-3:]
    if shown:
        out += ["Examples (first edits of the largest runs):", ""]
        for r, ex in shown:
            e = ex["rewrite"][0]
            text = e["generation"].replace("\n", " ").replace("|", "/")[:120]
            out.append(f"- {r['method']} N={r['n_edits']}: *{e['prompt']}* → `{text}` (target: {e['target']})")
        out.append("")
    return out


def write_plots(results: dict, dirs: Sequence[Path]) -> list[Path]:
    """Score vs #edits, edit time vs #edits (log-log), general ability vs #edits; PNGs written to every dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in _ordered_runs(results) if r["status"] == "ok"]
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    figures = {}

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rs in by_method.items():
        pts = [(r["n_edits"], r["metrics"]["Score"]) for r in rs if r["metrics"].get("Score") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("number of edits (log scale)")
    ax.set_ylabel("Editing Score (harmonic mean of ES, GS, LS)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Editing Score vs number of edits")
    figures["bench_score_vs_edits.png"] = fig

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rs in by_method.items():
        pts = [(r["n_edits"], max(r["edit_seconds"], 1e-3)) for r in rs]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of edits (log scale)")
    ax.set_ylabel("edit wall time, s (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Edit time vs number of edits")
    figures["bench_time_vs_edits.png"] = fig

    base = results.get("baseline", {}).get("general", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for name, rs in by_method.items():
        ppl = [(r["n_edits"], r["general"]["ppl"]) for r in rs if r.get("general", {}).get("ppl") is not None]
        mc = [(r["n_edits"], r["general"]["mc"]["acc"]) for r in rs if r.get("general", {}).get("mc")]
        if ppl:
            ax1.plot(*zip(*ppl), marker="o", label=name)
        if mc:
            ax2.plot(*zip(*mc), marker="o", label=name)
    if base.get("ppl") is not None:
        ax1.axhline(base["ppl"], color="gray", ls="--", label="unedited")
    if base.get("mc"):
        ax2.axhline(base["mc"]["acc"], color="gray", ls="--", label="unedited")
    for ax, title in ((ax1, "WikiText-2 perplexity"), (ax2, "multiple-choice probe accuracy")):
        ax.set_xscale("log")
        ax.set_xlabel("number of edits (log scale)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    figures["bench_general_vs_edits.png"] = fig

    gen_runs = {name: [r for r in rs if r.get("generation")] for name, rs in by_method.items()}
    if any(gen_runs.values()):
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharey=True)
        for ax, (metric, kind, title) in zip(axes, (("ES", "rewrite", "edit prompt"),
                                                     ("GS", "rephrase", "paraphrase"))):
            for i, (name, rs) in enumerate(gen_runs.items()):
                if not rs:
                    continue
                color = f"C{i % 10}"
                tf = [(r["n_edits"], r["metrics"].get(metric)) for r in rs if r["metrics"].get(metric) is not None]
                gen = [(r["n_edits"], r["generation"][kind].get("prefix")) for r in rs
                       if r["generation"].get(kind, {}).get("prefix") is not None]
                if tf:
                    ax.plot(*zip(*tf), marker="o", color=color, label=f"{name} teacher-forced")
                if gen:
                    ax.plot(*zip(*gen), marker="s", ls="--", color=color, label=f"{name} generated (prefix)")
            ax.set_xscale("log")
            ax.set_xlabel("number of edits (log scale)")
            ax.set_title(f"{metric}: {title}, teacher-forced vs generated")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        figures["bench_generation_vs_edits.png"] = fig

    paths = []
    for d in dirs:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        for fname, f in figures.items():
            f.savefig(d / fname, dpi=110, bbox_inches="tight")
            paths.append(d / fname)
    for f in figures.values():
        plt.close(f)
    return paths
