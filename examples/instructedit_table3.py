"""The InstructEdit paper's Table 3 protocol on the embedded SmolLM2-135M-Instruct (CPU).

Editors (trained with ``easyedit-agrade train --alg InstructEdit ...``, see docs/instructedit.md):

* InstructEdit — multi-task (CounterFact + WikiRecent + ConvSent, balanced) with instructions;
* Multi-task MEND — the same code and data with ``--no-instruction``;
* Single-task MEND — CounterFact only, no instructions.

Each editor edits, one record at a time, the first ``--n`` test records of every training task (multi-task editing
setting) and of held-out zsRE (hold-out setting), and InstructEdit is evaluated again with the unseen description
(index 9). Metrics (percent): Reliability, Generalization, Locality, Portability (teacher-forced token accuracy, as
EasyEdit), and for ConvSent the log-likelihood sentiment preference, Locality and Fluency (n-gram entropy, bits).
"Base" is the unedited model on the un-instructed prompts. Writes ``table3.md`` and ``table3.json`` to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python examples/instructedit_table3.py --n 25 --out results/instructedit_table3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_EDITORS = [
    "InstructEdit=archives/instructedit-smollm2-135m.safetensors",
    "Multi-task MEND=runs/mend-multitask-smollm2/best.safetensors",
    "Single-task MEND (CF)=runs/mend-single-cf-smollm2/best.safetensors",
]
TASKS = ("counterfact", "wikirecent", "convsent", "zsre")
NAMES = {"counterfact": "CounterFact", "wikirecent": "Recent", "convsent": "ConvSent", "zsre": "ZsRE (held out)"}
METRICS = {"counterfact": ("rel", "gen", "loc"), "wikirecent": ("rel", "loc", "port"),
           "convsent": ("rel", "loc", "fluency"), "zsre": ("rel", "gen", "loc", "port")}
LABELS = {"rel": "Reliability", "gen": "Generalization", "loc": "Locality", "port": "Portability", "fluency": "Fluency"}


def fmt(v) -> str:
    return "—" if v is None or v != v else f"{v:.2f}"


def markdown(results: dict, editors: list[str], n: int) -> str:
    cols = ["Base"] + editors + ["InstructEdit, unseen instruction"]
    lines = [f"| Dataset | Metric | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 2)]
    for task in TASKS:
        for i, m in enumerate(METRICS[task]):
            base = results["base"][task].get({"rel": "pre_rel", "gen": "pre_gen", "port": "pre_port",
                                               "fluency": "pre_fluency"}.get(m, ""), 100.0 if m == "loc" else None)
            row = [fmt(base)] + [fmt(results["editors"][e].get(task, {}).get(m)) for e in editors]
            row.append(fmt(results.get("unseen", {}).get(task, {}).get(m)))
            lines.append(f"| {NAMES[task] if i == 0 else ''} | {LABELS[m]} | {' | '.join(row)} |")
    lines.append("")
    lines.append(f"n = {n} test edits per dataset, each edited alone and restored. ConvSent Reliability = share of "
                 "topics where the edited model gives the target-sentiment responses a higher mean log-likelihood "
                 "than the opposite ones; Fluency = weighted bi/tri-gram entropy (bits) of a 24-token greedy "
                 "generation.")
    return "\n".join(lines)


def merge(paths: list[str], out: Path) -> int:
    """One table from several ``table3.json`` files (editors in the given order)."""
    merged: dict = {"n": None, "editors": {}, "base": {}, "unseen": {}, "archives": {}, "seconds": {}}
    for path in paths:
        r = json.loads(Path(path).read_text())
        if merged["n"] not in (None, r["n"]):
            raise SystemExit(f"{path}: n={r['n']} differs from {merged['n']}")
        merged["n"] = r["n"]
        for label, per_task in r["editors"].items():  # per-task merge: one editor may come from several runs
            merged["editors"].setdefault(label, {}).update(per_task)
        for key in ("archives", "seconds"):
            merged[key].update(r[key])
        for key in ("base", "unseen"):
            for task, v in r.get(key, {}).items():
                if v and not merged[key].get(task):
                    merged[key][task] = v
    for task in TASKS:
        merged["base"].setdefault(task, {})
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(merged, list(merged["editors"]), merged["n"])
    (out / "table3.md").write_text(md + "\n")
    (out / "table3.json").write_text(json.dumps(merged, indent=1))
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editor", action="append", metavar="LABEL=ARCHIVE", help="editors (default: the three above)")
    p.add_argument("--n", type=int, default=25, help="test edits per dataset")
    p.add_argument("--out", default="results/instructedit_table3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-unseen", action="store_true", help="skip the unseen-instruction run")
    p.add_argument("--tasks", default=",".join(TASKS), help="subset of tasks to evaluate (merge runs afterwards)")
    p.add_argument("--unseen-only", action="store_true", help="only the unseen-instruction run of an instructed editor")
    p.add_argument("--from-json", nargs="+", metavar="TABLE3_JSON",
                   help="only merge earlier runs' table3.json files (e.g. one process per editor) into one table")
    args = p.parse_args(argv)
    if args.from_json:
        return merge(args.from_json, Path(args.out))

    import torch

    from easyedit_agrade.core.checkpoint import read_metadata
    from easyedit_agrade.lm import load_model_and_tokenizer
    from easyedit_agrade.models.instructedit.archive import load_networks
    from easyedit_agrade.models.instructedit.editor import InstructEditEditor
    from easyedit_agrade.models.instructedit.instructedit_eval import evaluate_task
    from easyedit_agrade.models.instructedit.instructedit_hparams import InstructEditHyperParams
    from easyedit_agrade.models.instructedit.instructions import HELD_OUT_INDEX, load_instructions
    from easyedit_agrade.models.instructedit.multitask import load_split

    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    model.eval()
    ins = load_instructions(None)
    tasks = [t for t in args.tasks.split(",") if t]
    data = {t: load_split(t, "test")[: args.n] for t in tasks}
    editors = [e.split("=", 1) for e in (args.editor or DEFAULT_EDITORS)]
    results: dict = {"n": args.n, "editors": {}, "base": {}, "unseen": {}, "archives": {}, "seconds": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def editor_for(path: str):
        meta = read_metadata(path)
        hp = InstructEditHyperParams.from_dict({"model_name": "smollm2-135m-instruct", "archive": path,
                                                **meta["hparams"]})
        return InstructEditEditor(model, tok, hp, load_networks(path, model, hp)), hp, meta

    for k, (label, path) in enumerate(editors):
        if not Path(path).is_file():
            print(f"skipping {label}: {path} does not exist", file=sys.stderr)
            continue
        ed, hp, meta = editor_for(path)
        results["archives"][label] = {"path": path, "use_instruction": hp.use_instruction,
                                      "training": meta.get("training", {})}
        results["editors"][label] = {}
        t0 = time.time()
        for task in ([] if args.unseen_only else tasks):
            want_base = not results["base"].get(task) and not hp.use_instruction
            r = evaluate_task(ed, data[task], instructions=ins, index=0, use_instruction=hp.use_instruction,
                              pre=want_base)
            if want_base:
                results["base"][task] = {k2: v for k2, v in r.items() if k2.startswith("pre_")}
            results["editors"][label][task] = r
            print(json.dumps({"editor": label, "task": task, **{k2: round(v, 2) for k2, v in r.items() if v == v}}),
                  flush=True)
        results["seconds"][f"{label} [{args.tasks}]"] = round(time.time() - t0, 1)
        if hp.use_instruction and not args.no_unseen and not results["unseen"]:
            t0 = time.time()
            for task in tasks:
                r = evaluate_task(ed, data[task], instructions=ins, index=HELD_OUT_INDEX, use_instruction=True,
                                  pre=False)
                results["unseen"][task] = r
                print(json.dumps({"editor": label + " (unseen instruction)", "task": task,
                                  **{k2: round(v, 2) for k2, v in r.items() if v == v}}), flush=True)
            results["seconds"][f"{label} unseen [{args.tasks}]"] = round(time.time() - t0, 1)
        (out / "table3.json").write_text(json.dumps(results, indent=1))
    for task in TASKS:
        results["base"].setdefault(task, {})
    names = list(results["editors"])
    md = markdown(results, names, args.n)
    (out / "table3.md").write_text(md + "\n")
    (out / "table3.json").write_text(json.dumps(results, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
