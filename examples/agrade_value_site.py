"""A value-optimised edit at the early site, batched over all facts: does it reach the GS the late site cannot?

``docs/agrade_generalization.md`` (§1–5) found that at AGRADE's edit site (layers 24–29, target rows) a
CounterFact paraphrase only gets the part of the edit its last-token key shares with the edit prompt's, and that
layers 3–7 with the subject's last token as a row carry edits to paraphrases — but a one-shot transformed
gradient cannot make the edit there (ES ≈ 0.25 after one closed-form step, §3). Its "next" is a *value-optimised*
G: MEMIT's z. This probe measures that on validation records, with no hypernetwork and no training:

1. **Values (MEMIT's z, all facts at once).** For every edit prompt, a vector δᵢ added to the residual stream
   leaving layer ``L`` (the last edited layer) at the subject's last token is optimised with Adam so that the
   unedited model predicts the new target, δᵢ ← argmin CE(target | prompt, h + δᵢ) + wd·‖δᵢ‖²/‖hᵢ‖², with
   ‖δᵢ‖ ≤ clamp·‖hᵢ‖ after each step. The δᵢ are independent, so one forward/backward over the whole batch
   (layers above ``L`` only, logits only at the target positions) steps all of them; ``--prefixes K`` adds K
   context prefixes (sentences of ``wiki.valid.tokens``, ROME's context templates) per prompt, sharing δᵢ.
2. **Spread over the layers (MEMIT's update, in eq 5's form).** For each edited ``down_proj`` l in turn, with
   the keys Kₗ (its input at the subject's last token, averaged over the prefixes) and the residual still missing
   at layer L, Rₗ = (zᵢ − h_L,i(current model)) / (layers left): ΔWₗ = (KₗᵀKₗ + λ·N·C₀ₗ)⁻¹KₗᵀRₗ — AGRADE's
   solve (eq 5 with the preserved-knowledge term) with G = Rₗ on subject rows — applied before the next layer's
   keys are taken.

Reported per (N, λ): ES / GS / LS / Score (teacher-forced, as the scaling report) and perplexity on held-out
*statistics* text (``wiki.valid.tokens`` windows after C₀'s tokens — never the test text), so λ is chosen on
validation data only. Sets as ``examples/agrade_scaling.py``: ``cf-val``, ``zsre-val``.

Example::

    python examples/agrade_value_site.py --sets cf-val --n 256 --lambdas 1 4 16 --out runs/value_site.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agrade_generalization import SETS, context_prefixes  # noqa: E402

HPARAMS = "hparams/AGRADE/smollm2-135m"


def parse_layers(spec: str) -> list[int]:
    a, _, b = spec.partition("-")
    return list(range(int(a), int(b or a) + 1))


def encode_variants(editor, recs, prefixes: list[str]):
    """Micro-batches of every (prefix, record) prompt with its target; ``record_ids`` index the variant list
    (variant v of record i is ``v·N + i``); each batch carries its subject-last-token mask."""
    from easyedit_agrade.core.editor_base import encode_micro_batches

    prompts, targets, subjects = [], [], []
    for pre in [""] + prefixes:
        for r in recs:
            prompts.append(pre + r.prompt)
            targets.append(r.target_new)
            subjects.append(r.subject)
    mbs = encode_micro_batches(editor.tok, prompts, targets, max_length=None,
                               micro_batch=editor.hparams.cache_batch_size, device=editor.device,
                               subjects=subjects, key_positions="target+subject")
    return [(mb, mb.key_mask & ~mb.predict_mask) for mb in mbs]


def subject_rows(mb, subj, n_records: int):
    """(batch index, position, record index) of every subject row of a micro-batch."""
    import torch

    b, pos = subj.nonzero(as_tuple=True)
    return b, pos, mb.record_ids[b.cpu()].to(torch.long) % n_records


def optimise_values(model, batches, n_records: int, layer: int, *, steps: int, lr: float, weight_decay: float,
                    clamp: float, stop_nll: float = 0.05, log=print):
    """δ (N, d) at the output of decoder layer ``layer``, subject's last token (module docstring, step 1), and the
    unedited hidden state there for the unprefixed prompts, h (N, d). Records without a subject row keep δ = 0."""
    import torch
    import torch.nn.functional as F

    from easyedit_agrade.core.cache import LayerStack

    top = LayerStack(model, [f"model.layers.{layer + 1}.mlp.down_proj.weight"])  # input of layer+1 = output of layer
    lowered = [(mb, subj, top.lower(mb.input_ids, mb.attention_mask)) for mb, subj in batches]
    d = lowered[0][2].shape[-1]
    h0 = torch.zeros(n_records, d)
    hnorm = torch.ones(n_records)
    for mb, subj, hid in lowered:
        b, pos, rec = subject_rows(mb, subj, n_records)
        first = mb.record_ids[b.cpu()] < n_records  # the unprefixed prompt
        h0[rec[first]] = hid[b[first], pos[first]].float()
    hnorm = h0.norm(dim=-1).clamp_min(1e-6)
    n_prompts = sum(len(mb.record_ids) for mb, _ in batches)
    delta = torch.zeros(n_records, d, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for p in model.parameters():
        p.requires_grad_(False)
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for mb, subj, hid in lowered:
            b, pos, rec = subject_rows(mb, subj, n_records)
            add = torch.zeros_like(hid)
            add[b, pos] = delta[rec].to(hid.dtype)
            logits = top.upper(hid + add, mb.input_ids, mb.attention_mask, mb.predict_mask)
            nll = F.cross_entropy(logits.float(), mb.target_labels, reduction="none")
            # mean over each prompt's target tokens, summed over prompts (each δᵢ sees only its own prompts)
            per = torch.zeros(len(mb.record_ids)).index_add(0, (mb.predict_mask.nonzero()[:, 0]).cpu(), nll.cpu())
            ntok = mb.predict_mask.sum(1).clamp_min(1).cpu()
            loss = (per / ntok).sum()
            loss.backward()
            total += float(loss.detach())
        reg = weight_decay * ((delta ** 2).sum(-1) / hnorm ** 2).sum()
        reg.backward()
        opt.step()
        with torch.no_grad():
            scale = (clamp * hnorm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
        log(f"  z step {step + 1}/{steps}: mean target NLL per prompt {total / n_prompts:.3f}")
        if total / n_prompts < stop_nll:  # MEMIT stops its value search at a loss of 5e-2 as well
            break
    return delta.detach(), h0


def spread_over_layers(model, batches, n_records: int, layers: list[int], z, C0, lam: float, apply_mode: str):
    """MEMIT's per-layer update in eq 5's form (module docstring, step 2); returns the applied ΔW per module
    and the weights to restore."""
    import torch

    from easyedit_agrade.core.weights import apply_deltas, get_module

    last = layers[-1]
    saved_all: dict = {}
    deltas: dict = {}
    for i, l in enumerate(layers):
        name = f"model.layers.{l}.mlp.down_proj"
        keys = torch.zeros(n_records, get_module(model, name).in_features, dtype=torch.float64)
        counts = torch.zeros(n_records, dtype=torch.float64)
        cur = torch.zeros_like(z, dtype=torch.float64)
        box: dict = {}
        h1 = get_module(model, name).register_forward_hook(lambda m, a, o: box.__setitem__("k", a[0].detach()))
        h2 = model.model.layers[last].register_forward_hook(
            lambda m, a, o: box.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach()))
        try:
            with torch.no_grad():
                for mb, subj in batches:
                    model.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
                    b, pos, rec = subject_rows(mb, subj, n_records)
                    keys.index_add_(0, rec, box["k"][b, pos].double())
                    counts.index_add_(0, rec, torch.ones(len(rec), dtype=torch.float64))
                    first = mb.record_ids[b.cpu()] < n_records
                    cur[rec[first]] = box["h"][b[first], pos[first]].double()
        finally:
            h1.remove()
            h2.remove()
        have = counts > 0
        K = keys[have] / counts[have, None]
        R = (z.double()[have] - cur[have]) / (len(layers) - i)
        M = K.T @ K + lam * K.shape[0] * C0[name].double()
        dW = torch.linalg.solve(M, K.T @ R)
        saved = apply_deltas(model, {name: dW.float()}, mode=apply_mode)
        saved_all.update(saved)
        deltas[name] = dW
    return deltas, saved_all


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
    p.add_argument("--sets", nargs="+", default=["cf-val"], choices=list(SETS))
    p.add_argument("--n", nargs="+", type=int, default=[256])
    p.add_argument("--layers", default="3-7")
    p.add_argument("--lambdas", nargs="+", type=float, default=[1.0, 4.0, 16.0],
                   help="weight of C0 per edit: M = KᵀK + λ·N·C₀")
    p.add_argument("--prefixes", type=int, default=0, help="context prefixes per prompt (wiki.valid sentences)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--clamp", type=float, default=4.0)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/agrade_value_site.json")
    args = p.parse_args(argv)

    import torch

    from easyedit_agrade.core.preserved_stats import preserved_second_moments, resolve_corpus
    from easyedit_agrade.core.tokenize import spread_windows
    from easyedit_agrade.core.weights import restore_weights
    from easyedit_agrade.dataset import read_records
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_eval import accuracy, argmax_at_targets, build_probes, harmonic_mean
    from easyedit_agrade.models.agrade.archive import build_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor
    from easyedit_agrade.paths import data_file

    torch.set_num_threads(args.threads)
    base = AGRADEHyperParams.from_hparams(HPARAMS)
    model, tok = load_model_and_tokenizer(str(base.model_name))
    layers = parse_layers(args.layers)
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in layers]
    hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), inner_params=names, use_preserved_cov=False,
                                          max_length=128, archive=None, preserved_change_budget=None))
    editor = AGRADEEditor(model, tok, hp, build_networks(model, hp))
    C0 = preserved_second_moments(model, tok, editor.stack.module_names, corpus=base.preserved_corpus,
                                  n_tokens=base.preserved_tokens, window=base.preserved_window,
                                  root=base.preserved_stats_dir, progress=True)
    corpus = resolve_corpus(base.preserved_corpus)
    windows = spread_windows(tok, corpus, n_windows=args.ppl_windows, window=base.preserved_window,
                             skip=base.preserved_tokens)
    ppl0 = heldout_ppl(model, windows)
    print(f"held-out perplexity (statistics text) unedited: {ppl0:.2f}", flush=True)
    prefixes = context_prefixes(corpus, args.prefixes, seed=0) if args.prefixes else []
    results: dict = {"command": " ".join(sys.argv), "unedited_heldout_ppl": ppl0, "rows": []}
    for set_name in args.sets:
        rel, fmt, start = SETS[set_name]
        for n in args.n:
            recs = read_records(data_file(rel), fmt, start=start, limit=n, skip_invalid=True)
            pr = build_probes(editor, recs)
            ref = argmax_at_targets(editor, pr.loc)
            batches = encode_variants(editor, recs, prefixes)
            t0 = time.perf_counter()
            delta, h0 = optimise_values(model, batches, len(recs), layers[-1], steps=args.steps, lr=args.lr,
                                        weight_decay=args.weight_decay, clamp=args.clamp)
            t_z = time.perf_counter() - t0
            z = h0 + delta
            for lam in args.lambdas:
                t1 = time.perf_counter()
                deltas, saved = spread_over_layers(model, batches, len(recs), layers, z, C0, lam, hp.apply_mode)
                t_w = time.perf_counter() - t1
                try:
                    row = {"set": set_name, "n": len(recs), "lambda": lam, "prefixes": args.prefixes,
                           "es": accuracy(editor, pr.edit, pr.n), "gs": accuracy(editor, pr.equiv, pr.n),
                           "ls": accuracy(editor, pr.loc, pr.n, reference=ref),
                           "heldout_ppl_ratio": heldout_ppl(model, windows) / ppl0,
                           "max_dw_ratio": max(float(d.norm() / saved[k + ".weight"].double().norm())
                                               for k, d in deltas.items()),
                           "z_seconds": t_z, "solve_seconds": t_w}
                finally:
                    restore_weights(model, saved)
                row["score"] = harmonic_mean(row["es"], row["gs"], row["ls"])
                results["rows"].append(row)
                print(f"[{set_name} N={len(recs)} λ={lam:g}] ES {row['es']:.3f} GS {row['gs']:.3f} LS {row['ls']:.3f}"
                      f" Score {row['score']:.3f} held-out ppl ×{row['heldout_ppl_ratio']:.3f}"
                      f" (z {t_z:.0f}s, solve {t_w:.0f}s)", flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
