"""What the perplexity guard costs per executor call, side by side in one run (embedded model, counterfact-val
records — validation only): the guard off, the guard with a cold store (what every call paid before
``core.heldout.HELDOUT_STORE``), the next call after the weights were restored (windows, lower pass and reference
reused) and the next call on the edited model (sequential editing: lower pass reused, reference measured again).

    python scripts/guard_cost.py --n 1 16 --repeats 3 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 16], help="edits per call")
    p.add_argument("--repeats", type=int, default=3, help="calls per cell (the median is printed)")
    p.add_argument("--yaml", default="hparams/AGRADE/smollm2-135m.yaml")
    p.add_argument("--limit", type=float, default=1.25, help="max_heldout_ppl_ratio when the guard is on")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from easyedit_agrade.core.heldout import HELDOUT_STORE
    from easyedit_agrade.core.weights import restore_weights
    from easyedit_agrade.dataset import read_records
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams, apply_agrade_to_model
    from easyedit_agrade.paths import data_file

    model, tok = load_model_and_tokenizer()
    off = AGRADEHyperParams.from_hparams(args.yaml)
    on = AGRADEHyperParams.from_dict(dict(off.to_dict(), max_heldout_ppl_ratio=args.limit))
    recs = read_records(data_file("counterfact/counterfact-val.json"), "counterfact", limit=max(args.n) * 8,
                        skip_invalid=True)

    def call(hp, requests):
        t0 = time.perf_counter()
        _, copy = apply_agrade_to_model(model, tok, requests, hp, return_orig_weights=True)
        return time.perf_counter() - t0, copy

    call(off, [{"prompt": recs[0].prompt, "target_new": recs[0].target_new}])  # archive, C₀: paid once
    print("| edits per call | guard off | guard, cold store | guard, after a restore | guard, sequential |")
    print("|---|---|---|---|---|")
    at = 0
    for n in args.n:
        cells = {k: [] for k in ("off", "cold", "restored", "sequential")}
        for _ in range(args.repeats):
            batch = recs[at:at + n]
            at += n
            requests = [{"prompt": r.prompt, "target_new": r.target_new, "subject": r.subject} for r in batch]
            dt, copy = call(off, requests)
            cells["off"].append(dt)
            restore_weights(model, copy)
            HELDOUT_STORE.clear()
            dt, copy = call(on, requests)
            cells["cold"].append(dt)
            restore_weights(model, copy)
            dt, copy = call(on, requests)
            cells["restored"].append(dt)
            dt, copy2 = call(on, requests)  # on top of the edit just made: the upper layers changed
            cells["sequential"].append(dt)
            restore_weights(model, copy2)
            restore_weights(model, copy)
        med = {k: statistics.median(v) for k, v in cells.items()}
        print(f"| {n} | {med['off']:.2f} s | {med['cold']:.2f} s | {med['restored']:.2f} s | "
              f"{med['sequential']:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
