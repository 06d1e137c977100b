"""How well does the perplexity guard's held-out ratio predict the scaling report's WikiText-2 *test* ratio?

The guard (``max_heldout_ppl_ratio``) measures perplexity on ``heldout_windows`` × ``preserved_window`` tokens of the
statistics corpus (``wiki.valid.tokens`` after C₀'s tokens); the report measures ``--ppl-windows`` × 256 tokens at
the start of ``wiki.test.tokens``. For one edit per set (settings of ``--editor``, guard off so the full ΔW is
kept), this scales the ΔW by each ``--steps`` value and prints, side by side, the perplexity ratio (edited /
unedited) on: the guard's windows (contiguous after C₀'s tokens as session 9 took them; spread as now; spread ×4);
the report's first ``--report-windows`` test windows; ``--test-windows`` test
windows; and as many further wiki.valid windows (after the guard's). Validation sets only. Writes JSON.

    python scripts/guard_calibration.py --sets cf-val zsre-val --n 1919 999 \\
        --editor "edit_rounds=6;rounds_stop_accuracy=0.9;preserved_change_budget=0.1" --out runs/guard/calib.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from agrade_scaling import HPARAMS, parse_editor, read_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["cf-val", "zsre-val"])
    p.add_argument("--n", nargs="+", type=int, default=[1919, 999], help="one N per set")
    p.add_argument("--editor", default="", help="edit-time overrides k=v;k=v of the default YAML")
    p.add_argument("--steps", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--report-windows", type=int, default=4)
    p.add_argument("--test-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if len(args.n) != len(args.sets):
        raise SystemExit("--n: give one N per --sets entry")
    if not all(s.endswith("-val") for s in args.sets):
        raise SystemExit("--sets: validation sets only (cf-val, zsre-val)")

    import torch

    from easyedit_agrade.core.heldout import HeldOutText, combined
    from easyedit_agrade.core.preserved_stats import resolve_corpus
    from easyedit_agrade.core.tokenize import spread_windows, text_windows
    from easyedit_agrade.core.weights import apply_deltas, restore_weights
    from easyedit_agrade.evaluate.general import WIKITEXT_FILE
    from easyedit_agrade.evaluate.scoring import perplexity
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.archive import find_archive, load_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor
    from easyedit_agrade.paths import data_dir

    torch.set_num_threads(args.threads)
    _, _, over = parse_editor("calib=shipped;" + args.editor)
    base = AGRADEHyperParams.from_hparams(HPARAMS)
    hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), **over, max_heldout_ppl_ratio=None,
                                          batch_size=max(args.n)))
    model, tok = load_model_and_tokenizer(str(hp.model_name))
    hp = AGRADEHyperParams.from_dict(dict(hp.to_dict(), archive=str(find_archive(model, hp))))
    nets = load_networks(hp.archive, model, hp)
    window = int(hp.preserved_window)
    test = text_windows(tok, data_dir() / WIKITEXT_FILE, n_windows=args.test_windows, window=window)
    guard_skip = int(hp.preserved_tokens)
    guard_n = int(hp.heldout_windows)
    valid_more = text_windows(tok, resolve_corpus(hp.preserved_corpus), n_windows=args.test_windows, window=window,
                              skip=guard_skip + guard_n * window)
    probes = {f"test first {args.report_windows}": test[:args.report_windows],
              f"test {args.test_windows}": test, f"valid next {args.test_windows}": valid_more}
    base_ppl = {k: float(perplexity(model, w)) for k, w in probes.items()}
    out: dict = {"command": " ".join(sys.argv), "overrides": over, "window": window, "unedited": base_ppl,
                 "rows": []}
    for set_name, n in zip(args.sets, args.n):
        recs, _ = read_set(set_name, n)
        editor = AGRADEEditor(model, tok, hp, nets)
        corpus = resolve_corpus(hp.preserved_corpus)
        guards = {  # the guard's windows as session 9 took them (contiguous) and as it takes them now (spread)
            f"guard contiguous {guard_n}": text_windows(tok, corpus, n_windows=guard_n, window=window, skip=guard_skip),
            f"guard spread {guard_n}": spread_windows(tok, corpus, n_windows=guard_n, window=window, skip=guard_skip),
            f"guard spread {4 * guard_n}": spread_windows(tok, corpus, n_windows=4 * guard_n, window=window,
                                                           skip=guard_skip)}
        held = {k: HeldOutText.from_windows(editor, w) for k, w in guards.items()}
        refs = {k: h.nll(None) for k, h in held.items()}
        t0 = time.perf_counter()
        with torch.enable_grad():
            result = editor.edit_deltas([r.prompt for r in recs], [r.target_new for r in recs],
                                        subjects=[r.subject for r in recs])
        edit_s = time.perf_counter() - t0
        for t in args.steps:
            deltas = combined({}, result.deltas, t)
            row = {"set": set_name, "n": len(recs), "step": t, "edit_s": edit_s,
                   **{k: math.exp(h.nll(deltas) - refs[k]) for k, h in held.items()}}
            saved = apply_deltas(model, deltas, mode=hp.apply_mode)
            try:
                for k, w in probes.items():
                    row[k] = float(perplexity(model, w)) / base_ppl[k]
            finally:
                restore_weights(model, saved)
            out["rows"].append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
