"""Why one-hop portability falls after a zsRE batch edit: the edit itself, or damage to facts it never touched?

Edits a batch of zsRE-eval records (``portability/One_Hop/zsre_mend_eval_portability_gpt4.json``) with the default
AGRADE YAML and archive, and measures teacher-forced one-hop portability and LS on the first ``--n-probe`` records in
two arms:

* ``edited``  — the probed records are the edited batch (records 0..N-1), as in the scaling report;
* ``control`` — a disjoint batch of the same size is edited (records ``--control-start``..), so the probed facts
  were never edited: any change in their portability accuracy is collateral damage, not reasoning over the edit.

Test records are only reported here, nothing is chosen on them. Usage::

    python scripts/portability_control.py --n 256 --n-probe 256 --control-start 256 --out runs/portability.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="edits per batch")
    p.add_argument("--n-probe", type=int, default=256, help="probed records (the first ones)")
    p.add_argument("--control-start", type=int, default=256, help="first record of the control batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/portability_control.json")
    args = p.parse_args(argv)
    if args.n_probe > args.n:
        p.error("--n-probe must be <= --n (the edited arm probes records it edited)")
    if args.control_start < args.n_probe:
        p.error("--control-start must be >= --n-probe (the control batch must not contain a probed record)")

    import torch
    from agrade_scaling import HPARAMS, read_set

    from easyedit_agrade.core.weights import apply_deltas, restore_weights
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_eval import accuracy, argmax_at_targets, build_probes
    from easyedit_agrade.models.agrade.archive import build_networks, find_archive, load_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor

    torch.set_num_threads(args.threads)
    recs, portability = read_set("zsre", args.control_start + args.n)
    if len(recs) < args.control_start + args.n:
        p.error(f"zsRE eval has {len(recs)} records; --control-start + --n = {args.control_start + args.n}")
    base = AGRADEHyperParams.from_hparams(HPARAMS)
    model, tok = load_model_and_tokenizer(str(base.model_name))
    hp = AGRADEHyperParams.from_dict(dict(base.to_dict(), batch_size=args.n))
    hp = AGRADEHyperParams.from_dict(dict(hp.to_dict(), archive=str(find_archive(model, hp))))
    nets = load_networks(hp.archive, model, hp)
    editor = AGRADEEditor(model, tok, hp, nets)
    probed = recs[:args.n_probe]
    pr = build_probes(editor, probed)
    port = editor.encode([q for q, _ in portability[:args.n_probe]], [a for _, a in portability[:args.n_probe]],
                         max_length=None)
    editor.lower(port)  # the lower layers' outputs, computed once (what accuracy() reads)
    ref = argmax_at_targets(editor, pr.loc)

    def measure() -> dict:
        return {"es": accuracy(editor, pr.edit, pr.n), "gs": accuracy(editor, pr.equiv, pr.n),
                "ls": accuracy(editor, pr.loc, pr.n, reference=ref), "portability": accuracy(editor, port, pr.n)}

    out = {"command": " ".join(sys.argv), "archive": Path(hp.archive).name, "n": args.n, "n_probe": args.n_probe,
           "unedited": measure(), "arms": {}}
    for arm, batch in (("edited", recs[:args.n]), ("control", recs[args.control_start:args.control_start + args.n])):
        with torch.enable_grad():
            result = editor.edit_deltas([r.prompt for r in batch], [r.target_new for r in batch],
                                        subjects=[r.subject for r in batch])
        weights_copy = apply_deltas(model, result.deltas, mode=hp.apply_mode)
        try:
            out["arms"][arm] = measure()
        finally:
            restore_weights(model, weights_copy)
        print(arm, json.dumps(out["arms"][arm]), flush=True)
    print("unedited", json.dumps(out["unedited"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
