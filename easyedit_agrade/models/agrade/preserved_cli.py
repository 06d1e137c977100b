"""``easyedit-agrade stats HPARAMS``: compute (or find) the key statistics C₀ of the preserved-knowledge term for
the model and edited modules of an AGRADE hparams YAML (mixed with the record prompts' statistics when
``preserved_records`` is set), and print where they are cached and their spectra.

Editing and training compute them on first use anyway; this verb does it ahead of time (e.g. before a benchmark)
and shows what the null-space threshold would keep.
"""
from __future__ import annotations

import argparse
import json
import sys


def stats_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="easyedit-agrade stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hparams", help="AGRADE editing or training YAML, e.g. hparams/AGRADE/smollm2-135m.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an hparam, e.g. --set preserved_tokens=50000")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from ...core.cache import LayerStack
    from ...core.preserved_stats import resolve_corpus, stats_file
    from ...hparams import HyperParamsError, parse_set_overrides
    from ...lm import load_model_and_tokenizer
    from .agrade_hparams import AGRADEHyperParams
    from .preserved_records import mixed_second_moments, records_text_for

    torch.set_num_threads(max(1, args.threads))
    try:
        hp = AGRADEHyperParams.from_hparams(args.hparams, parse_set_overrides(args.set))
        corpus = resolve_corpus(hp.preserved_corpus)
        records_text = records_text_for(hp)
    except (HyperParamsError, ValueError, FileNotFoundError) as exc:
        print(f"easyedit-agrade stats: {exc}", file=sys.stderr)
        return 2
    model, tok = load_model_and_tokenizer(str(hp.model_name))
    names = LayerStack(model, list(hp.inner_params)).module_names
    stats = mixed_second_moments(model, tok, names, hp, log=lambda s: print(s, flush=True))
    print(f"cached at {stats_file(model, corpus, hp.preserved_tokens, hp.preserved_window, hp.preserved_stats_dir)}")
    if records_text is not None:
        print(f"mixed (weight {hp.preserved_records_weight}) with the statistics of {records_text}, cached at "
              f"{stats_file(model, records_text, hp.preserved_tokens, hp.preserved_window, hp.preserved_stats_dir)}")
    for name in names:
        s = torch.linalg.eigvalsh(stats[name].double()).clamp_min(0).flip(0)
        energy = s.cumsum(0) / s.sum()
        print(json.dumps({"module": name, "trace": round(float(s.sum()), 3), "top": round(float(s[0]), 3),
                          "median": round(float(s.median()), 5),
                          "kept_by_null_space": int((s <= hp.null_space_threshold * s[0]).sum()),
                          "dims_for_90pct_energy": int((energy < 0.9).sum()) + 1}))
    return 0
