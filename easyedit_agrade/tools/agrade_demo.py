"""The main job (``make demo``): edit ≥256 CounterFact validation facts in one batch through EasyEdit's ``BaseEditor``
with the shipped AGRADE archive, and print ES/GS/LS/Score before and after plus a few generated answers.

Metrics are EasyEdit's own (``BaseEditor.batch_edit``): ES = mean ``rewrite_acc``, GS = mean ``rephrase_acc``
(teacher-forced token accuracy of ``target_new``), LS = share of locality-answer tokens whose post-edit argmax equals
the pre-edit argmax (the paper's LS: agreement with the unedited model), Score = harmonic mean of the three.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

DEFAULT_HPARAMS = "hparams/AGRADE/smollm2-135m"


def _mean(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_easyedit_metrics(metrics: list[dict]) -> dict[str, float]:
    """ES/GS/LS/Score (post) and their pre-edit values from ``BaseEditor.batch_edit`` output."""
    import numpy as np

    from ..models.agrade.agrade_eval import harmonic_mean

    def acc(side: str, key: str) -> float:
        return _mean([_mean(m[side][key]) if isinstance(m[side][key], list) else m[side][key] for m in metrics])

    ls_vals = []
    for m in metrics:
        post = m["post"].get("locality", {}).get("neighborhood_output")
        pre = m["pre"].get("locality", {}).get("neighborhood_output")
        if post is None or pre is None:
            continue
        ls_vals.append(float(np.mean([np.mean(np.equal(a, b)) for a, b in zip(post, pre)])))
    out = {"es": acc("post", "rewrite_acc"), "gs": acc("post", "rephrase_acc"), "ls": _mean(ls_vals),
           "pre_es": acc("pre", "rewrite_acc"), "pre_gs": acc("pre", "rephrase_acc"), "pre_ls": 1.0}
    out["score"] = harmonic_mean(out["es"], out["gs"], out["ls"])
    out["pre_score"] = harmonic_mean(out["pre_es"], out["pre_gs"], out["pre_ls"])
    return out


def generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    import torch

    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = side
    return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().split("\n")[0]
            for o in out]


def locality_kwargs(records) -> dict[str, Any]:
    """Locality probes for ``BaseEditor.batch_edit``. EasyEdit 0.0.1.dev0 forwards ``locality_prompts``
    positionally into ``_prepare_requests``' ``locality_inputs`` slot, so there it must be the
    ``{"neighborhood": {"prompt": [...], "ground_truth": [...]}}`` dict; upstream takes ``locality_inputs=``."""
    from ..integration.easyedit import easyedit_generation

    inputs = {"neighborhood": {"prompt": [r.locality_prompt for r in records],
                               "ground_truth": [r.locality_ground_truth for r in records]}}
    if easyedit_generation() == "upstream":
        return {"locality_inputs": inputs}
    return {"locality_prompts": inputs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="easyedit-agrade demo",
                                description="Edit CounterFact facts in the embedded model with AGRADE via EasyEdit.")
    p.add_argument("--hparams", default=DEFAULT_HPARAMS, help=f"editing hparams (default {DEFAULT_HPARAMS})")
    p.add_argument("--n", type=int, default=256, help="CounterFact validation facts edited in one batch (>= 1)")
    p.add_argument("--start", type=int, default=0, help="first record of counterfact-val.json")
    p.add_argument("--archive", help="override the archive (default: the shipped one)")
    p.add_argument("--examples", type=int, default=4, help="generated answers shown before vs after")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--fast-metrics", action="store_true",
                   help="edit through BaseEditor.apply_algo and score with the batched teacher-forced evaluator "
                        "(same ES/GS/LS definitions) instead of BaseEditor.batch_edit's per-request evaluation "
                        "(use on a busy CPU)")
    return p


def demo_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from ..dataset.readers import read_counterfact_mend
    from ..integration.cpu_compat import cuda_on_cpu
    from ..paths import data_file
    from ..models.agrade.agrade_hparams import AGRADEHyperParams

    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    t_start = time.time()
    records = read_counterfact_mend(data_file("counterfact/counterfact-val.json"), start=args.start, limit=args.n)
    hparams = AGRADEHyperParams.from_hparams(args.hparams)
    if args.archive:
        hparams.archive = args.archive
    hparams.batch_size = max(hparams.batch_size, len(records))  # one batch: a single solve for all facts
    print(f"AGRADE demo: {len(records)} CounterFact validation facts, one batch, model {str(hparams.model_name)!r}")

    from ..integration.easyedit import register
    from ..integration.easyedit_editor import base_editor_from_hparams

    register()
    with cuda_on_cpu():
        editor = base_editor_from_hparams(hparams)
        model, tok = editor.model, editor.tok
        from ..models.agrade.agrade_main import _networks_for

        _, archive_path = _networks_for(model, hparams)  # fail fast (with the retraining hint) if none matches
        print(f"archive: {archive_path}")
        shown = records[: args.examples]
        gen_prompts = [p for r in shown for p in (r.prompt, r.rephrase_prompt)]
        before = generate(model, tok, gen_prompts)

        if args.fast_metrics:
            s, edit_time, eval_wall = _fast_metrics(editor, hparams, records)
        else:
            s, edit_time, eval_wall = _easyedit_metrics(editor, records, tqdm)
        # generations after: apply the same batch again through BaseEditor's algorithm, then restore exactly
        reqs = [r.to_request() for r in records]
        _, weights_copy = editor.apply_algo(model, tok, reqs, hparams, copy=False, return_orig_weights=True,
                                            keep_original_weight=True)
        try:
            after = generate(model, tok, gen_prompts)
        finally:
            from ..core.weights import restore_weights

            restore_weights(model, weights_copy)

    print()
    print(f"{'':8s}{'ES':>8s}{'GS':>8s}{'LS':>8s}{'Score':>8s}")
    print(f"{'before':8s}{s['pre_es']:8.3f}{s['pre_gs']:8.3f}{s['pre_ls']:8.3f}{s['pre_score']:8.3f}")
    print(f"{'after':8s}{s['es']:8.3f}{s['gs']:8.3f}{s['ls']:8.3f}{s['score']:8.3f}")
    how = "batched evaluation" if args.fast_metrics else "EasyEdit evaluation"
    print(f"edit wall time for {len(records)} facts: {edit_time:.1f} s ({how} {eval_wall:.0f} s)")
    print()
    for i, r in enumerate(shown):
        print(f"[{i}] {r.prompt!r} -> new target {r.target_new!r} (was {r.ground_truth!r})")
        print(f"     before: {before[2 * i]!r}   after: {after[2 * i]!r}")
        print(f"     paraphrase {r.rephrase_prompt!r}")
        print(f"     before: {before[2 * i + 1]!r}   after: {after[2 * i + 1]!r}")
    s.update(n=len(records), edit_time_s=edit_time, total_wall_s=time.time() - t_start, archive=str(archive_path))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(s, f, indent=2)
    print(f"\ntotal wall time {s['total_wall_s']:.0f} s")
    return 0


def _easyedit_metrics(editor, records, tqdm) -> tuple[dict[str, float], float, float]:
    """``BaseEditor.batch_edit`` (one batch) with EasyEdit's own per-request post/pre evaluation."""
    from ..integration.easyedit_editor import counting_edit_evaluations

    with tqdm(total=2 * len(records), desc="edit + EasyEdit evaluation (post, pre)", dynamic_ncols=True) as bar, \
            counting_edit_evaluations(bar):
        t0 = time.time()
        from ..integration.easyedit import batch_edit_all_chunks

        metrics, _, _ = batch_edit_all_chunks(  # batch_edit alone returns only the last chunk's metrics
            editor,
            prompts=[r.prompt for r in records],
            target_new=[r.target_new for r in records],
            ground_truth=[r.ground_truth or "<|endoftext|>" for r in records],
            rephrase_prompts=[r.rephrase_prompt for r in records],
            keep_original_weight=True,
            verbose=False,
            **locality_kwargs(records),
        )
        eval_wall = time.time() - t0
    edit_time = float(metrics[0]["time"]) if metrics else float("nan")
    return summarize_easyedit_metrics(metrics), edit_time, eval_wall


def _fast_metrics(editor, hparams, records) -> tuple[dict[str, float], float, float]:
    """Edit through ``BaseEditor.apply_algo`` (the registered AGRADE executor) and score with batched
    teacher-forced ES/GS/LS on the same model (``agrade_eval``; same definitions as EasyEdit's)."""
    import torch
    from tqdm.auto import tqdm

    from ..core.weights import restore_weights
    from ..models.agrade.agrade_eval import accuracy, argmax_at_targets, build_probes, harmonic_mean, pre_edit_metrics
    from ..models.agrade.agrade_main import _networks_for
    from ..models.agrade.editor import AGRADEEditor

    t0 = time.time()
    nets, _ = _networks_for(editor.model, hparams)
    ev = AGRADEEditor(editor.model, editor.tok, hparams, nets)
    with tqdm(total=4, desc="probes, edit, evaluation", dynamic_ncols=True) as bar:
        probes = build_probes(ev, records)
        ref_loc = argmax_at_targets(ev, probes.loc)
        out = {f"pre_{k}": v for k, v in pre_edit_metrics(ev, probes).items()}
        bar.update(1)
        t1 = time.time()
        _, weights_copy = editor.apply_algo(editor.model, editor.tok, [r.to_request() for r in records], hparams,
                                            copy=False, return_orig_weights=True, keep_original_weight=True)
        edit_time = time.time() - t1
        bar.update(1)
        try:
            with torch.no_grad():
                out["es"] = accuracy(ev, probes.edit, probes.n)
                out["gs"] = accuracy(ev, probes.equiv, probes.n)
                bar.update(1)
                out["ls"] = accuracy(ev, probes.loc, probes.n, reference=ref_loc)
                bar.update(1)
        finally:
            restore_weights(editor.model, weights_copy)
    out["score"] = harmonic_mean(out["es"], out["gs"], out["ls"])
    return out, edit_time, time.time() - t0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(demo_main())
