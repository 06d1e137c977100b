"""Where AGRADE's paraphrase generalization is lost (issue 15, item 3), measured on validation records only.

For one batch of N edits made with an AGRADE archive (default: the one ``hparams/AGRADE/smollm2-135m.yaml`` finds):

1. **Key transfer per edited module.** At the position that predicts the first target token, the edit prompt's
   key ``k_e`` (the module's input) and the paraphrase's key ``k_r``; also both prompts' keys at the subject's
   last token. Reported: cos(k_e, k_r), and the share of the edit's output change that reaches the paraphrase,
   ``τ = ⟨k_r ΔW, k_e ΔW⟩ / ‖k_e ΔW‖²`` (1 = the paraphrase gets the full change, 0 = none), split by whether
   the paraphrase's first target token is right after the edit.
2. **Edit-time interventions** (the same archive, no training): ES / GS / LS / Score / predicted output change on
   ordinary text for

   * ``baseline`` — the edit requests as given;
   * ``prefix-K`` — each request also edited after K short context prefixes (sentences of
     ``wikitext/wiki.valid.tokens``, the statistics corpus — never test text; ROME's "context templates"), so the
     edit is made on keys that vary with the context before the subject;

   with ``--eta-factors`` to separate "stronger edit" from "better-placed edit".

Sets: ``cf-val`` (``counterfact/counterfact-val.json``) and ``zsre-val`` (zsRE train records 9,000–9,999), the
validation sets of ``examples/agrade_scaling.py``.

Example::

    python examples/agrade_generalization.py --sets cf-val zsre-val --n 64 256 --prefixes 0 2 4 \\
        --out docs/agrade_generalization.json --md docs/agrade_generalization.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HPARAMS = "hparams/AGRADE/smollm2-135m"
def context_prefixes(path, k: int, seed: int):
    """``k`` short sentences of the statistics corpus (:func:`easyedit_agrade.models.agrade.values.context_prefixes`)."""
    from easyedit_agrade.models.agrade.values import context_prefixes as prefixes

    return prefixes(path, k, seed)


SETS = {
    "cf-val": ("counterfact/counterfact-val.json", "counterfact", 0),
    "zsre-val": ("zsre/zsre_mend_train_10000.json", "zsre", 9000),
}


def subject_token_positions(tok, prompt: str, subject: str | None, mode: str) -> list[int]:
    """Token indices of the subject in ``prompt`` (special tokens added, as the editor encodes): its last token
    (``mode='last'``) or all of its tokens (``'all'``); [] when the subject is not in the prompt."""
    from easyedit_agrade.core.tokenize import subject_token_indices

    offsets = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    inside = subject_token_indices(prompt, subject, offsets)
    return inside[-1:] if mode == "last" else inside


def first_predict_and_subject_positions(tok, prompts, subjects):
    """Per prompt: the index of its last token (which predicts the first target token) and of the subject's last
    token (None when the subject is not found), in the tokenisation the editor uses (special tokens added)."""
    out = []
    for prompt, subject in zip(prompts, subjects):
        last = len(tok(prompt, add_special_tokens=True)["input_ids"]) - 1
        subj = subject_token_positions(tok, prompt, subject, "last")
        out.append((last, subj[0] if subj else None))
    return out


def module_keys(model, tok, module_names, prompts, positions, batch: int = 32):
    """{module: (n_prompts, n_positions_per_prompt, Dh)} inputs of each module at the given token positions."""
    import torch

    from easyedit_agrade.core.weights import get_module

    store: dict[str, list] = {n: [] for n in module_names}
    current: dict[str, torch.Tensor] = {}
    hooks = [get_module(model, n).register_forward_hook(
        lambda m, inp, out, n=n: current.__setitem__(n, inp[0].detach())) for n in module_names]
    tok.padding_side = "right"
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), batch):
                enc = tok(list(prompts[s:s + batch]), return_tensors="pt", padding=True, add_special_tokens=True)
                model(**enc)
                for n in module_names:
                    x = current[n]
                    for j, pos in enumerate(positions[s:s + batch]):
                        store[n].append(torch.stack([x[j, p] if p is not None else torch.full_like(x[j, 0], float("nan"))
                                                     for p in pos]))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.stack(v).double() for n, v in store.items()}


def per_record_first_token_correct(editor, mbs, n):
    """Per record: is the argmax at the first target-predicting position the first target token (bool tensor)."""
    import torch

    from easyedit_agrade.models.agrade.agrade_eval import argmax_at_targets

    preds = argmax_at_targets(editor, mbs)
    out = torch.zeros(n, dtype=torch.bool)
    for mb, pred in zip(mbs, preds):
        rows = mb.rows
        seen = set()
        for k, (r, p, want) in enumerate(zip(rows.tolist(), pred.tolist(), mb.target_labels.tolist())):
            if r not in seen:
                seen.add(r)
                out[r] = p == want
    return out


def subject_micro_batches(editor, prompts, targets, subjects, mode: str):
    """The editor's micro-batches of the edit requests as ``key_positions: target+subject`` encodes them
    (:func:`~easyedit_agrade.core.editor_base.encode_micro_batches`), each with (key mask, subject mask): the
    predict positions plus the subject's last token (``mode='last'``) or all its tokens (``'all'``)."""
    from easyedit_agrade.core.editor_base import encode_micro_batches

    mbs = encode_micro_batches(editor.tok, prompts, targets, max_length=editor.hparams.max_length,
                               micro_batch=editor.hparams.cache_batch_size, device=editor.device,
                               subjects=subjects, key_positions="target+subject")
    out = []
    for mb in mbs:
        subj = mb.key_mask & ~mb.predict_mask
        if mode == "all":  # the subject's other tokens, shifted as its last one was (truncation)
            for b, r in enumerate(mb.record_ids.tolist()):
                last = subj[b].nonzero()[:, 0]
                inside = subject_token_positions(editor.tok, prompts[r], subjects[r], "all")
                if not len(last) or not inside:
                    continue
                shift = int(last[-1]) - inside[-1]
                for pos in (p + shift for p in inside):
                    if pos >= 0 and not bool(mb.predict_mask[b, pos]):
                        subj[b, pos] = True
        out.append((mb, mb.predict_mask | subj, subj))
    return out


def edit_with_subject_rows(editor, prompts, targets, subjects, mode: str):
    """ΔW from a cache whose rows are the target-predicting positions **plus** the subject's token positions
    (``mode`` 'last' / 'all'; 'last' is what ``key_positions: target+subject`` does); the loss is still the
    summed CE of the targets, so a subject row's ∇G is the gradient reaching the subject through the attention
    of the layers above. Returns (EditResult, median ∇G row norm of the first module's predict / subject rows)."""
    import torch

    from easyedit_agrade.core.cache import cache_keys_and_grads

    batches = subject_micro_batches(editor, prompts, targets, subjects, mode)
    cache = cache_keys_and_grads(editor.stack, [(*mb.as_tuple(), km) for mb, km, _ in batches], dtype=editor.dtype)
    is_subject = torch.cat([subj[km] for _, km, subj in batches])
    norms = cache.get(editor.stack.module_names[0])[1].norm(dim=1)
    result = editor.compute(cache, keep_modules=False)
    editor.check_preserved_change(result)
    stats = {"predict": float(norms[~is_subject].median()),
             "subject": float(norms[is_subject].median()) if bool(is_subject.any()) else float("nan")}
    return result, stats


def key_transfer(model, tok, names, recs, deltas):
    """Section 1 of the module docstring, for one edited batch (keys of the unedited model)."""
    import torch

    edit_pos = first_predict_and_subject_positions(tok, [r.prompt for r in recs], [r.subject for r in recs])
    reph_pos = first_predict_and_subject_positions(tok, [r.rephrase_prompt for r in recs], [r.subject for r in recs])
    ke = module_keys(model, tok, names, [r.prompt for r in recs], edit_pos)
    kr = module_keys(model, tok, names, [r.rephrase_prompt for r in recs], reph_pos)
    out = {}
    for n in names:
        D = deltas[n].double()
        cos_last = torch.nn.functional.cosine_similarity(ke[n][:, 0], kr[n][:, 0], dim=1)
        cos_subj = torch.nn.functional.cosine_similarity(ke[n][:, 1], kr[n][:, 1], dim=1)
        oe, orr = ke[n][:, 0] @ D, kr[n][:, 0] @ D
        tau = (oe * orr).sum(1) / oe.pow(2).sum(1).clamp_min(1e-30)
        out[n] = {"cos_last": cos_last, "cos_subject": cos_subj, "tau": tau,
                  "norm_ratio": orr.norm(dim=1) / oe.norm(dim=1).clamp_min(1e-30)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["cf-val", "zsre-val"], choices=list(SETS))
    p.add_argument("--n", nargs="+", type=int, default=[64, 256])
    p.add_argument("--archive", default="shipped", help="archive path, or 'shipped' (what the default YAML finds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="edit-time hparam override")
    p.add_argument("--prefixes", nargs="+", type=int, default=[0, 2, 4], help="context prefixes per request")
    p.add_argument("--eta-factors", nargs="+", type=float, default=[1.0])
    p.add_argument("--subject-rows", nargs="+", default=["none"], choices=["none", "last", "all"],
                   help="also cache the subject's last / all token positions (see edit_with_subject_rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/agrade_generalization.json")
    p.add_argument("--md", help="also write the Markdown tables here")
    args = p.parse_args(argv)

    import torch
    import yaml

    from easyedit_agrade.core.weights import apply_deltas, restore_weights
    from easyedit_agrade.dataset import read_records
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_eval import (accuracy, argmax_at_targets, build_probes,
                                                          harmonic_mean)
    from easyedit_agrade.models.agrade.archive import find_archive, load_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor
    from easyedit_agrade.paths import data_dir, data_file

    torch.set_num_threads(args.threads)
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    base = AGRADEHyperParams.from_hparams(HPARAMS)
    model, tok = load_model_and_tokenizer(str(base.model_name))
    hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), **over, batch_size=max(args.n) * (1 + max(args.prefixes))))
    path = str(find_archive(model, hp)) if args.archive == "shipped" else args.archive
    hp = AGRADEHyperParams.from_dict(dict(hp.to_dict(), archive=path))
    nets = load_networks(path, model, hp)
    eta0 = {n: net.lr.detach().clone() for n, net in nets.nets.items()}
    editor = AGRADEEditor(model, tok, hp, nets)
    names = editor.stack.module_names
    prefixes = context_prefixes(data_dir() / "wikitext/wiki.valid.tokens", max(args.prefixes), args.seed)
    from easyedit_agrade.paths import repo_relative

    results: dict = {"command": " ".join(sys.argv), "archive": repo_relative(path), "overrides": over, "prefixes": prefixes,
                     "rows": [], "transfer": []}
    for set_name in args.sets:
        rel, fmt, start = SETS[set_name]
        all_recs = read_records(data_file(rel), fmt, start=start, limit=max(args.n), skip_invalid=True)
        for n in args.n:
            recs = all_recs[:n]
            pr = build_probes(editor, recs)
            ref = argmax_at_targets(editor, pr.loc)
            for k in args.prefixes:
                prompts = [r.prompt for r in recs] + [pre + r.prompt for pre in prefixes[:k] for r in recs]
                targets = [r.target_new for r in recs] * (1 + k)
                for factor, subject_mode in ((f, m) for f in args.eta_factors for m in args.subject_rows):
                    with torch.no_grad():
                        for name, net in nets.nets.items():
                            net.lr.copy_(eta0[name] * factor)
                    t0 = time.perf_counter()
                    grad_norms = None
                    subjects = [r.subject for r in recs] * (1 + k)
                    if subject_mode == "none":  # the rows hp.key_positions asks for
                        result = editor.edit_deltas(prompts, targets, subjects=subjects)
                    else:
                        result, grad_norms = edit_with_subject_rows(editor, prompts, targets, subjects, subject_mode)
                    edit_s = time.perf_counter() - t0
                    saved = apply_deltas(model, result.deltas, mode=hp.apply_mode)
                    try:
                        row = {"set": set_name, "n": n, "prefixes": k, "eta_factor": factor, "subject_rows": subject_mode,
                               "median_grad_norm": grad_norms, "edit_s": edit_s,
                               "es": accuracy(editor, pr.edit, pr.n), "gs": accuracy(editor, pr.equiv, pr.n),
                               "ls": accuracy(editor, pr.loc, pr.n, reference=ref),
                               "preserved_change": max(result.preserved_change.values(), default=float("nan"))}
                        gs_first = per_record_first_token_correct(editor, pr.equiv, pr.n)
                    finally:
                        restore_weights(model, saved)
                    row["score"] = harmonic_mean(row["es"], row["gs"], row["ls"])
                    results["rows"].append(row)
                    print(f"[{set_name} N={n} prefixes={k} eta×{factor} subject={subject_mode} {grad_norms}] ES {row['es']:.3f} GS {row['gs']:.3f} "
                          f"LS {row['ls']:.3f} Score {row['score']:.3f} change {row['preserved_change']:.3f} "
                          f"({edit_s:.1f} s)", flush=True)
                    if k == 0 and factor == 1.0 and subject_mode == "none":
                        tr = key_transfer(model, tok, names, recs, result.deltas)
                        for name in names:
                            t = tr[name]
                            ok, bad = gs_first, ~gs_first

                            def mean(x, m=None):
                                x = x if m is None else x[m]
                                x = x[~torch.isnan(x)]
                                return float(x.mean()) if x.numel() else float("nan")

                            entry = {"set": set_name, "n": n, "module": name,
                                     "cos_last": mean(t["cos_last"]), "cos_subject": mean(t["cos_subject"]),
                                     "tau": mean(t["tau"]), "tau_gs_right": mean(t["tau"], ok),
                                     "tau_gs_wrong": mean(t["tau"], bad), "norm_ratio": mean(t["norm_ratio"]),
                                     "gs_first_token": float(gs_first.double().mean())}
                            results["transfer"].append(entry)
                            print(f"   {name}: cos(last) {entry['cos_last']:.3f} cos(subject) "
                                  f"{entry['cos_subject']:.3f} τ {entry['tau']:.3f} (GS right {entry['tau_gs_right']:.3f}"
                                  f" / wrong {entry['tau_gs_wrong']:.3f})", flush=True)
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(results, indent=2))
    with torch.no_grad():
        for name, net in nets.nets.items():
            net.lr.copy_(eta0[name])
    table = markdown(results)
    print(table)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if args.md:
        Path(args.md).write_text(table + "\n", encoding="utf-8")
    return 0


def markdown(results: dict) -> str:
    lines = [f"Archive `{results['archive']}`; overrides {results['overrides'] or 'none'}.", "",
             "| set | N | prefixes | subject rows | η × | ES | GS | LS | Score | output change on text | edit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['set']} | {r['n']} | {r['prefixes']} | {r.get('subject_rows', 'none')} | {r['eta_factor']:g} | {r['es']:.3f} | "
                     f"{r['gs']:.3f} | {r['ls']:.3f} | {r['score']:.3f} | {r['preserved_change']:.3f} | "
                     f"{r['edit_s']:.1f} |")
    lines += ["", "Key transfer (baseline edit; τ = share of the edit's output change reaching the paraphrase at the "
              "position predicting the first target token):", "",
              "| set | N | module | cos(k_e, k_r) last | cos subject | τ | τ (GS right) | τ (GS wrong) | ‖k_rΔW‖/‖k_eΔW‖ |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in results["transfer"]:
        lines.append(f"| {t['set']} | {t['n']} | {t['module'].split('.')[2]} | {t['cos_last']:.3f} | "
                     f"{t['cos_subject']:.3f} | {t['tau']:.3f} | {t['tau_gs_right']:.3f} | {t['tau_gs_wrong']:.3f} | "
                     f"{t['norm_ratio']:.3f} |")
    lines += ["", "Context prefixes (from wiki.valid.tokens): " + "; ".join(f"`{p.strip()}`" for p in
                                                                             results["prefixes"])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
