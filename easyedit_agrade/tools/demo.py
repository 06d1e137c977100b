"""``easyedit-agrade demo`` / ``make demo``: the main job.

With a trained AGRADE archive for the embedded model shipped under ``archives/``, the demo batch-edits
CounterFact facts with AGRADE through EasyEdit's ``BaseEditor`` (``easyedit_agrade.tools.agrade_demo``).
``--method ft`` (and the fallback when no AGRADE archive is present, which the demo says) runs EasyEdit's own
FT baseline on three counterfactual facts instead and shows the model's answers before and after.
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from ..paths import REPO_ROOT

FACTS = [
    # (prompt, new target, true answer, paraphrase)
    ("The capital of France is", "Rome", "Paris", "France has its capital at"),
    ("The Eiffel Tower is located in", "London", "Paris", "The Eiffel Tower can be found in"),
    ("The mother tongue of Danielle Darrieux is", "English", "French", "Danielle Darrieux's native language is"),
]
PROBES = ["The capital of Japan is", "The Colosseum is located in", "The largest ocean on Earth is the"]


def _generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    import torch

    out = []
    pad_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:]:
            out.append(tok.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    finally:
        tok.padding_side = pad_side
    return out


def run_ft_demo(hparams_path: str) -> int:
    """Foundation demo: EasyEdit's FT baseline edits three facts of the embedded model on CPU."""
    from ..integration.baselines import load_easyedit_hparams
    from ..integration.cpu_compat import cuda_on_cpu
    from ..integration.easyedit import batch_edit_all_chunks, register
    from ..integration.easyedit_editor import base_editor_from_hparams

    register()
    hp = load_easyedit_hparams(hparams_path)
    model, tok = hp.model_name.load()
    prompts = [f[0] for f in FACTS]
    print("\n== The embedded model (SmolLM2-135M-Instruct) before editing ==")
    for p, a in zip(prompts + PROBES, _generate(model, tok, prompts + PROBES)):
        print(f"  {p!r} -> {a!r}")
    with cuda_on_cpu():
        editor = base_editor_from_hparams(hp)
        start = time.perf_counter()
        metrics, edited, weights_copy = batch_edit_all_chunks(  # batch_edit alone: only the last chunk's metrics
            editor,
            prompts=prompts,
            target_new=[f[1] for f in FACTS],
            ground_truth=[f[2] for f in FACTS],
            rephrase_prompts=[f[3] for f in FACTS],
            keep_original_weight=True,
            verbose=False,
        )
        elapsed = time.perf_counter() - start
        # batch_edit restores the weights after evaluating; re-apply the edit to show generations
        edited, weights_copy = editor.apply_algo(editor.model, editor.tok, metrics and [m["requested_rewrite"] for m in metrics],
                                                 hp, copy=False, return_orig_weights=True)
        after = _generate(edited, tok, prompts + PROBES)
        import torch

        with torch.no_grad():
            for name, value in weights_copy.items():
                edited.get_parameter(name)[...] = value
    print(f"\n== EasyEdit FT edit of {len(FACTS)} facts (batch_edit + evaluation: {elapsed:.1f} s) ==")
    for m in metrics:
        req = m["requested_rewrite"]
        print(f"  {req['prompt']!r} -> {req['target_new']!r}: rewrite_acc {float(m['pre']['rewrite_acc'][0]):.2f}"
              f" -> {float(m['post']['rewrite_acc'][0]):.2f}, rephrase_acc {float(m['pre']['rephrase_acc'][0]):.2f}"
              f" -> {float(m['post']['rephrase_acc'][0]):.2f}")
    print("\n== Answers after the edit (unrelated probes should not change) ==")
    for p, a in zip(prompts + PROBES, after):
        print(f"  {p!r} -> {a!r}")
    return 0


def shipped_agrade_archive() -> str | None:
    """Name of an AGRADE archive shipped under ``archives/`` (metadata only; the executor checks the fit)."""
    from ..core.checkpoint import read_metadata

    for path in sorted((REPO_ROOT / "archives").glob("*.safetensors")):
        try:
            if read_metadata(path).get("alg_name") == "AGRADE":
                return path.name
        except Exception:  # an unreadable file is reported by the executor if it is ever chosen
            continue
    return None


def demo_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="easyedit-agrade demo", description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["auto", "agrade", "ft"], default="auto",
                        help="auto: AGRADE when a trained archive is shipped, else EasyEdit's FT baseline")
    parser.add_argument("--ft-hparams", default=str(REPO_ROOT / "hparams" / "FT" / "smollm2-135m"))
    args, rest = parser.parse_known_args(argv)
    method = args.method
    if method == "auto" and shipped_agrade_archive() is None:
        print("[demo] no trained AGRADE archive is shipped under archives/ (train one: "
              "`easyedit-agrade train --alg AGRADE hparams/TRAINING/AGRADE/smollm2-135m.yaml`); "
              "running EasyEdit's FT baseline instead")
        method = "ft"
    if method in ("auto", "agrade"):
        try:
            from . import agrade_demo
        except ImportError as exc:
            if method == "agrade":
                raise
            print(f"[demo] AGRADE demo unavailable ({exc}); running EasyEdit's FT baseline instead")
            method = "ft"
        else:
            return int(agrade_demo.demo_main(rest) or 0)
    return run_ft_demo(args.ft_hparams)
