"""Where should a hypernetwork edit go for paraphrases to follow? A training-free probe (issue 15, item 3).

AGRADE edits the ``mlp.down_proj`` of the last 6 layers on the rows that predict target tokens (the paper's and
MALMEN's choice). ``examples/agrade_generalization.py`` shows that on CounterFact the paraphrase's key at those
rows is far from the edit's (cos ≈ 0.45), while the subject's keys agree. This script asks which **layers** and
which **rows** carry an edit to paraphrases, with no hypernetwork at all, so that the answer does not depend on
a trained network: per layer set and row set it makes the closed-form edit of eq 5 with the hypernetwork replaced
by the identity and the preserved-knowledge term on,

    ΔW_l = η · (H_lᵀH_l + T_l · C₀_l)⁻¹ H_lᵀ(−∇G_l)        (T_l rows; C₀_l = E[kkᵀ] over wiki.valid.tokens)

(every module's rows from one forward/backward, summed target CE), repeated — rows re-cached on the edited
model, ΔW accumulated — until the edit prompts' ES reaches ``--stop-es`` (at most ``--steps``; a single
gradient step is a poor proxy for the layers far below the output), for each step size η; it reports ES / GS /
LS / Score where it stopped — validation records only (``cf-val``, ``zsre-val`` as in
``examples/agrade_scaling.py``). Rows: ``target`` = positions predicting a target token; ``+subject`` = also the
subject's last token; ``subject`` = only the subject's last token.

Example (docs/agrade_generalization.md)::

    python examples/agrade_edit_site.py --sets cf-val zsre-val --n 64 \\
        --layers 24-29 18-23 12-17 6-11 3-7 --rows target +subject subject \\
        --out docs/agrade_edit_site.json --md docs/agrade_edit_site.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agrade_generalization import SETS, subject_micro_batches  # noqa: E402

HPARAMS = "hparams/AGRADE/smollm2-135m"


def parse_layers(spec: str) -> list[int]:
    a, _, b = spec.partition("-")
    return list(range(int(a), int(b or a) + 1))


def cache_rows(editor, recs, row_mode: str):
    """{module: (H, −∇G)} over the edit prompts of ``recs`` for ``row_mode`` (module docstring)."""
    import torch

    from easyedit_agrade.core.cache import cache_keys_and_grads

    batches = subject_micro_batches(editor, [r.prompt for r in recs], [r.target_new for r in recs],
                                    [r.subject for r in recs], "last")
    chosen = {"target": lambda mb, km, subj: mb.predict_mask, "+subject": lambda mb, km, subj: km,
              "subject": lambda mb, km, subj: subj}[row_mode]
    cache = cache_keys_and_grads(editor.stack, [(*mb.as_tuple(), chosen(mb, km, subj)) for mb, km, subj in batches],
                                 dtype=torch.float64)
    return {n: (H, -g) for n in editor.stack.module_names for H, g in [cache.get(n)]}


def unit_deltas(rows, C0):
    """Per module (HᵀH + T·C₀)⁻¹HᵀR (the η = 1 edit), fp64."""
    import torch

    out = {}
    for n, (H, R) in rows.items():
        T = max(H.shape[0], 1)
        M = H.T @ H + T * C0[n].double()
        out[n] = torch.linalg.solve(M, H.T @ R)
    return out


def iterate_edit(editor, recs, row_mode, C0, eta, steps, stop_es, pr, ref) -> dict:
    """Up to ``steps`` closed-form steps (rows re-cached on the edited model each time, ΔW accumulated) until
    the edit prompts' ES reaches ``stop_es``; ES / GS / LS there. The model is restored before returning."""
    from easyedit_agrade.core.weights import apply_deltas, restore_weights
    from easyedit_agrade.models.agrade.agrade_eval import accuracy, harmonic_mean

    original = None
    row: dict = {}
    try:
        for step in range(1, steps + 1):
            unit = unit_deltas(cache_rows(editor, recs, row_mode), C0)
            saved = apply_deltas(editor.model, {n: (eta * d).float() for n, d in unit.items()},
                                 mode=editor.hparams.apply_mode)
            original = saved if original is None else original
            es = accuracy(editor, pr.edit, pr.n)
            if es >= stop_es or step == steps:
                row = {"steps": step, "es": es, "gs": accuracy(editor, pr.equiv, pr.n),
                       "ls": accuracy(editor, pr.loc, pr.n, reference=ref)}
                break
    finally:
        if original is not None:
            restore_weights(editor.model, original)
    row["score"] = harmonic_mean(row["es"], row["gs"], row["ls"])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["cf-val", "zsre-val"], choices=list(SETS))
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--layers", nargs="+", default=["24-29", "18-23", "12-17", "6-11", "3-7"])
    p.add_argument("--rows", nargs="+", default=["target", "+subject", "subject"],
                   choices=["target", "+subject", "subject"])
    p.add_argument("--etas", nargs="+", type=float, default=[3, 10, 30])
    p.add_argument("--steps", type=int, default=8, help="closed-form steps at most (rows re-cached each step)")
    p.add_argument("--stop-es", type=float, default=0.9, help="stop stepping once the edit prompts' ES reaches this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/agrade_edit_site.json")
    p.add_argument("--md")
    args = p.parse_args(argv)

    import torch

    from easyedit_agrade.core.preserved_stats import preserved_second_moments
    from easyedit_agrade.dataset import read_records
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_eval import argmax_at_targets, build_probes
    from easyedit_agrade.models.agrade.archive import build_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor
    from easyedit_agrade.paths import data_file

    torch.set_num_threads(args.threads)
    base = AGRADEHyperParams.from_hparams(HPARAMS)
    model, tok = load_model_and_tokenizer(str(base.model_name))
    results: dict = {"command": " ".join(sys.argv), "rows": []}
    every = sorted({l for spec in args.layers for l in parse_layers(spec)})
    # one pass over the corpus for every layer asked for (the cache file is extended once)
    preserved_second_moments(model, tok, [f"model.layers.{l}.mlp.down_proj" for l in every],
                             corpus=base.preserved_corpus, n_tokens=base.preserved_tokens,
                             window=base.preserved_window, root=base.preserved_stats_dir, progress=True)
    for set_name in args.sets:
        rel, fmt, start = SETS[set_name]
        recs = read_records(data_file(rel), fmt, start=start, limit=args.n, skip_invalid=True)
        for spec in args.layers:
            names = [f"model.layers.{l}.mlp.down_proj.weight" for l in parse_layers(spec)]
            hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), inner_params=names, use_preserved_cov=False,
                                                  max_length=128, archive=None,
                                                  preserved_change_budget=None))
            editor = AGRADEEditor(model, tok, hp, build_networks(model, hp))
            C0 = preserved_second_moments(model, tok, editor.stack.module_names, corpus=base.preserved_corpus,
                                          n_tokens=base.preserved_tokens, window=base.preserved_window,
                                          root=base.preserved_stats_dir)
            pr = build_probes(editor, recs)
            ref = argmax_at_targets(editor, pr.loc)
            for row_mode in args.rows:
                for eta in args.etas:
                    row = iterate_edit(editor, recs, row_mode, C0, eta, args.steps, args.stop_es, pr, ref)
                    row.update({"set": set_name, "n": args.n, "layers": spec, "rows": row_mode, "eta": eta})
                    results["rows"].append(row)
                    print(f"[{set_name} layers {spec} rows {row_mode} η {eta:g}] steps {row['steps']} ES {row['es']:.3f}"
                          f" GS {row['gs']:.3f} LS {row['ls']:.3f} Score {row['score']:.3f}", flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2))
    table = markdown(results)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n", encoding="utf-8")
    return 0


def markdown(results: dict) -> str:
    """Per (set, layers, rows): the η with the best Score, and the GS at the smallest η reaching ES ≥ 0.9."""
    # (rows carry "steps": closed-form steps taken)
    groups: dict = {}
    for r in results["rows"]:
        groups.setdefault((r["set"], r["layers"], r["rows"]), []).append(r)
    lines = ["| set | layers | rows | best η | ES | GS | LS | Score | GS at first η with ES ≥ 0.9 (LS) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (s, layers, rows), rs in groups.items():
        best = max(rs, key=lambda r: r["score"])
        hit = next((r for r in sorted(rs, key=lambda r: r["eta"]) if r["es"] >= 0.9), None)
        hit_s = f"{hit['gs']:.3f} ({hit['ls']:.3f}, η {hit['eta']:g})" if hit else "ES < 0.9 at every η"
        lines.append(f"| {s} | {layers} | {rows} | {best['eta']:g} | {best['es']:.3f} | {best['gs']:.3f} | "
                     f"{best['ls']:.3f} | {best['score']:.3f} | {hit_s} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
