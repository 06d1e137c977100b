"""AGRADE report (issue requirement 9): ES/GS/LS/Score of AGRADE, the ``malmen`` preset and the ablations on the
embedded SmolLM2, for 256 and 1024 CounterFact-val edits and 256 zsRE-eval edits, each set edited in one batch.

Two steps, both resumable:

1. train (optional) — one hypernetwork per variant and seed with the same budget (``--steps``), via
   ``easyedit-agrade train`` (here: ``train_main``) into ``<runs>/<variant>-s<seed>/``;
2. evaluate — every ``best.safetensors`` found (or given with ``--archive name=path``) is evaluated on the three
   sets. Tokenisation and the frozen lower layers are computed once per set and shared by all archives.

Examples::

    # evaluate the shipped archive only
    python examples/agrade_report.py --archive agrade/s0=archives/agrade-smollm2-135m-instruct.safetensors
    # ... and the same network edited without eq 4 (an inference-time ablation, no retraining)
    python examples/agrade_report.py --archive "agrade=archives/agrade-smollm2-135m-instruct.safetensors" \
        --archive "agrade-edit-without-eq4=archives/agrade-smollm2-135m-instruct.safetensors;use_weight_projection=false"
    # the full comparison (3 seeds for agrade and malmen, 1 per ablation, 300 steps each; many CPU hours)
    python examples/agrade_report.py --train --steps 300 --seeds 0 1 2 --runs runs/report

Metrics are the batched teacher-forced ones of ``easyedit_agrade.models.agrade.agrade_eval`` (ES/GS token accuracy
of the new target on the edit/paraphrase prompt, LS = agreement with the unedited model's argmax on the locality
answer, Score = harmonic mean). The table is printed as Markdown and written with the raw numbers to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HPARAMS = "hparams/AGRADE/smollm2-135m"
TRAIN_HPARAMS = "hparams/TRAINING/AGRADE/smollm2-135m.yaml"

#: variant -> training overrides (Table 2 of the paper + the malmen preset)
VARIANTS = {
    "agrade": [],
    "malmen": ["preset=malmen"],
    "no_adjustment": ["use_adjustment=false"],
    "no_regularization": ["use_regularization=false"],
    "no_weight_projection": ["use_weight_projection=false"],
    "no_gradient_projection": ["use_gradient_projection=false"],
}
SETS = {
    "cf256": ("counterfact/counterfact-val.json", "counterfact", 0, 256),
    "cf1024": ("counterfact/counterfact-val.json", "counterfact", 0, 1024),
    "zsre256": ("portability/One_Hop/zsre_mend_eval_portability_gpt4.json", "zsre", 0, 256),
}


def train_variants(args) -> None:
    from easyedit_agrade.models.agrade.agrade_trainer import train_main

    for variant in args.variants:
        seeds = args.seeds if variant in ("agrade", "malmen") else args.seeds[:1]
        for seed in seeds:
            out = Path(args.runs) / f"{variant}-s{seed}"
            argv = [TRAIN_HPARAMS, "--out", str(out), "--max-steps", str(args.steps), "--seed", str(seed),
                    "--threads", str(args.threads), "--no-progress"]
            for o in VARIANTS[variant] + [f"val_every={args.val_every}", f"val_size={args.val_size}"]:
                argv += ["--set", o]
            if (out / "checkpoints" / "latest.json").exists():
                argv.append("--resume")
            print(f"== training {variant} seed {seed}: {' '.join(argv)}", flush=True)
            train_main(argv)


def discover(args) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in args.archive:
        name, _, path = item.partition("=")
        found[name] = path  # PATH may end with ";key=value;..." edit-time overrides (inference-time ablations)
    if args.runs and Path(args.runs).is_dir():
        for best in sorted(Path(args.runs).glob("*-s*/best.safetensors")):
            variant, _, seed = best.parent.name.rpartition("-s")
            found.setdefault(f"{variant}/s{seed}", str(best))
    return found


def evaluate(args, archives: dict[str, str]) -> dict:
    import torch

    from easyedit_agrade.core.checkpoint import read_metadata
    from easyedit_agrade.dataset import read_records
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_eval import build_probes, evaluate_records, pre_edit_metrics
    from easyedit_agrade.models.agrade.archive import build_networks, load_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor
    from easyedit_agrade.paths import data_file

    torch.set_num_threads(args.threads)
    base = AGRADEHyperParams.from_hparams(HPARAMS)
    model, tok = load_model_and_tokenizer(str(base.model_name))
    probe_editor = AGRADEEditor(model, tok, base, build_networks(model, base))
    results: dict = {"archives": archives, "sets": {}, "runs": {}}
    for set_name in args.sets:
        path, fmt, start, n = SETS[set_name]
        records = read_records(data_file(path), fmt, start=start, limit=n)
        t0 = time.time()
        probes = build_probes(probe_editor, records)
        print(f"[{set_name}] {len(records)} records, probes + lower layers in {time.time() - t0:.0f} s", flush=True)
        results["sets"][set_name] = {"n": len(records), "no_edit": pre_edit_metrics(probe_editor, probes)}
        for name, spec in archives.items():
            apath, *over = spec.split(";")
            meta = read_metadata(apath)
            hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), **meta.get("hparams", {}),
                                                  archive=str(apath), batch_size=max(n, base.batch_size)))
            nets = load_networks(apath, model, hp)
            if over:  # edit with other switches than the network was trained with (labelled by NAME)
                import yaml

                extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in over)}
                hp = AGRADEHyperParams.from_dict(dict(hp.to_dict(), **extra))
            editor = AGRADEEditor(model, tok, hp, nets)
            out = evaluate_records(editor, records, probes=probes, pre=False)
            out["train_step"] = meta.get("training", {}).get("step")
            results["runs"].setdefault(name, {})[set_name] = out
            print(f"[{set_name}] {name}: ES {out['es']:.3f} GS {out['gs']:.3f} LS {out['ls']:.3f} "
                  f"Score {out['score']:.3f} (edit {out['edit_time_s']:.1f} s)", flush=True)
    return results


def _agg(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def markdown(results: dict) -> str:
    groups: dict[str, list[str]] = {}
    for name in results["runs"]:
        groups.setdefault(name.split("/")[0], []).append(name)
    lines = []
    for set_name, info in results["sets"].items():
        lines.append(f"\n**{set_name}** ({info['n']} edits in one batch; mean ± population std over seeds)\n")
        lines.append("| editor | seeds | ES | GS | LS | Score | edit time (s) |")
        lines.append("|---|---|---|---|---|---|---|")
        ne = info["no_edit"]
        lines.append(f"| no edit | – | {ne['es']:.3f} | {ne['gs']:.3f} | {ne['ls']:.3f} | {ne['score']:.3f} | – |")
        for group, names in groups.items():
            rows = [results["runs"][n][set_name] for n in names if set_name in results["runs"][n]]
            if not rows:
                continue
            cells = [_agg([r[k] for r in rows]) for k in ("es", "gs", "ls", "score", "edit_time_s")]
            lines.append(f"| {group} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train the variants first (resumes existing runs)")
    p.add_argument("--steps", type=int, default=300, help="training budget per run (steps of n_edits edits)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--val-every", type=int, default=25, help="validation interval of each training run")
    p.add_argument("--val-size", type=int, default=256, help="validation records (last N of counterfact-val)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--runs", default="runs/report", help="folder of training runs (<variant>-s<seed>/)")
    p.add_argument("--archive", action="append", default=[], metavar="NAME=PATH",
                   help="evaluate this archive too; NAME like agrade/s0 groups seeds")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/agrade_report.json")
    args = p.parse_args(argv)
    if args.train:
        train_variants(args)
    archives = discover(args)
    if not archives:
        print("no archives to evaluate (train with --train, or pass --archive NAME=PATH)", file=sys.stderr)
        return 2
    results = evaluate(args, archives)
    table = markdown(results)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results["markdown"] = table
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
