"""Post-hoc calibration of a trained archive's η (eq 1) on held-out validation records, and archive export.

η sets the size of every edit (c = −η⟨H, H̃⟩ scales G, and ΔW is linear in G), so it moves an archive along the
ES/GS ↔ LS trade-off; λ (eq 3) sets how much the ridge shrinks ΔW towards the dominant directions of H
(``--lambda-shifts`` adds a constant to every log λ). Short CPU training leaves η noisy; this tool multiplies all per-module η by one factor k,
picks the k with the best validation Score among ``--factors`` (optionally only among those meeting ``--min-es`` /
``--min-ls``) (validation records only — by default the last 256 of
counterfact-val, disjoint from the first 1024 that the demo and the report edit), and writes the archive with the
scaled η and the calibration recorded in its metadata. k = 1 is always a candidate, so calibration never picks a
worse network on the validation split.

    python -m easyedit_agrade.tools.agrade_calibrate runs/agrade-smollm2/best.safetensors \
        archives/agrade-smollm2-135m-instruct.safetensors --factors 0.7 0.85 1 1.2 1.4
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import torch


def evaluate_factors(archive: str, hparams_path: str, records, factors: Sequence[float],
                     log=print, lambda_shifts: Sequence[float] = (0.0,),
                     n_batches: int = 1) -> list[dict[str, Any]]:
    """ES/GS/LS/Score of ``archive`` for every (λ shift, η factor), editing ``records`` in ``n_batches`` disjoint
    batches of equal size (each batch edited at once, the model restored in between); the metrics are averaged
    over the batches and Score is the harmonic mean of the averages."""
    from ..lm import load_model_and_tokenizer
    from ..evaluate.metrics import harmonic_mean
    from ..models.agrade.agrade_eval import build_probes, evaluate_records
    from ..models.agrade.agrade_hparams import AGRADEHyperParams
    from ..models.agrade.archive import load_networks
    from ..core.checkpoint import read_metadata
    from ..models.agrade.editor import AGRADEEditor

    base = AGRADEHyperParams.from_hparams(hparams_path)
    meta = read_metadata(archive)
    if n_batches < 1 or len(records) % n_batches:
        raise ValueError(f"val_batches={n_batches} must divide the {len(records)} validation records")
    size = len(records) // n_batches
    batches = [records[i * size:(i + 1) * size] for i in range(n_batches)]
    hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), **meta.get("hparams", {}), archive=str(archive),
                                          batch_size=max(size, base.batch_size)))
    model, tok = load_model_and_tokenizer(str(hp.model_name))
    nets = load_networks(archive, model, hp)
    editor = AGRADEEditor(model, tok, hp, nets)
    probes = [build_probes(editor, b) for b in batches]
    original = {g: (net.lr.detach().clone(), net.log_lambda.detach().clone()) for g, net in nets.nets.items()}
    rows = []
    try:
        for shift in lambda_shifts:
            for k in factors:
                with torch.no_grad():
                    for g, net in nets.nets.items():
                        net.lr.copy_(original[g][0] * k)
                        net.log_lambda.copy_(original[g][1] + shift)
                per = [evaluate_records(editor, b, probes=p, pre=False) for b, p in zip(batches, probes)]
                out = {key: sum(r[key] for r in per) / len(per) for key in per[0]}
                out["n"] = float(len(records))
                out["score"] = harmonic_mean([out["es"], out["gs"], out["ls"]])
                out["factor"], out["lambda_shift"] = float(k), float(shift)
                rows.append(out)
                log(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in out.items()}))
    finally:
        with torch.no_grad():
            for g, net in nets.nets.items():
                net.lr.copy_(original[g][0])
                net.log_lambda.copy_(original[g][1])
    return rows


def main(argv: list[str] | None = None) -> int:
    from ..core.checkpoint import load_tensors, save_tensors
    from ..dataset import read_records
    from ..paths import data_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="trained archive (e.g. <out>/best.safetensors)")
    p.add_argument("dst", help="calibrated archive to write")
    p.add_argument("--hparams", default="hparams/AGRADE/smollm2-135m")
    p.add_argument("--val-data", default="counterfact/counterfact-val.json")
    p.add_argument("--val-size", type=int, default=256, help="records per validation batch (edited at once)")
    p.add_argument("--val-batches", type=int, default=1,
                   help="disjoint validation batches: the last val_size × val_batches records of --val-data, "
                        "metrics averaged over the batches (less noise than one batch)")
    p.add_argument("--factors", type=float, nargs="+", default=[0.7, 0.85, 1.0, 1.2, 1.4])
    p.add_argument("--lambda-shifts", type=float, nargs="+", default=[0.0],
                   help="also try adding these to every log_lambda (λ of eq 3)")
    p.add_argument("--min-es", type=float, default=0.0, help="only factors reaching this validation ES qualify")
    p.add_argument("--min-ls", type=float, default=0.0, help="only factors reaching this validation LS qualify")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", default="{}", help="JSON merged into the archive's training metadata")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = read_records(data_file(args.val_data))[-args.val_size * args.val_batches:]
    factors = sorted(set(args.factors) | {1.0})
    shifts = sorted(set(args.lambda_shifts) | {0.0})
    rows = evaluate_factors(args.src, args.hparams, records, factors, lambda_shifts=shifts,
                            n_batches=args.val_batches)
    ok = [r for r in rows if r["es"] >= args.min_es and r["ls"] >= args.min_ls] or rows
    best = max(ok, key=lambda r: (r["score"], r["factor"] == 1.0 and r["lambda_shift"] == 0.0))
    tensors, meta = load_tensors(args.src)
    for key in list(tensors):
        if key.endswith(".lr"):
            tensors[key] = tensors[key] * best["factor"]
        elif key.endswith(".log_lambda"):
            tensors[key] = tensors[key] + best["lambda_shift"]
    training = meta.setdefault("training", {})
    training["eta_calibration"] = {
        "factor": best["factor"], "lambda_shift": best["lambda_shift"], "val_data": args.val_data,
        "val_records": f"last {args.val_size * args.val_batches}",
        "val_batches": f"{args.val_batches} batches of {args.val_size} edits", "constraints": {"min_es": args.min_es, "min_ls": args.min_ls},
        "candidates": [{k: round(r[k], 4) for k in ("factor", "lambda_shift", "es", "gs", "ls", "score")}
                       for r in rows]}
    training.update(json.loads(args.extra))
    save_tensors(args.dst, tensors, meta)
    print(json.dumps({"chosen_factor": best["factor"], "chosen_lambda_shift": best["lambda_shift"], "val": {k: round(best[k], 4) for k in
                                                                 ("es", "gs", "ls", "score")}, "written": args.dst}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
