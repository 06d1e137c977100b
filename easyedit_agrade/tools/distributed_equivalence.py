"""1-process vs N-process equality check for data-parallel AGRADE (editing and training), on CPU with gloo.

Runs the same edits and the same training steps once in a single process and once in ``world_size`` processes
(``torch.multiprocessing``, gloo, file rendezvous) and compares, tensor by tensor:

* ``edit/<module>`` — ΔW of one batch of edits (eqs 1–5; every rank must hold the same ΔW);
* ``rounds/…`` — the summed ΔW of two ``edit_rounds`` and the rounds' all-reduced accuracies;
* ``guard/…`` — the perplexity guard's reference NLL and ratios (held-out windows sharded over ranks);
* ``grad/<param>`` — hypernetwork gradients (body, η, λ) of one training step (eqs 6–7, after the all-reduce);
* ``state/<param or buffer>`` — hypernetwork parameters and normaliser statistics after ``--steps`` Adam steps.

::

    python -m easyedit_agrade.tools.distributed_equivalence --world-size 2                   # tiny random LLaMA, fp32
    python -m easyedit_agrade.tools.distributed_equivalence --world-size 2 --model embedded --edits 32

The single process takes the in-memory path (the T×T dual solve when T < Dh); the ranks take the streamed
primal path with all-reduced sums — so the check also covers the equality of the two solver paths. Exit code 1
when any relative error (‖a − b‖ / ‖b‖, Frobenius) exceeds ``--tol``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

_FACTS = [
    ("The capital of France is", "Rome", "France's capital city is", "The largest ocean is", "the Pacific"),
    ("Danielle Darrieux's mother tongue is", "English", "Danielle Darrieux natively speaks", "Water boils at",
     "100 degrees"),
    ("The Eiffel Tower is located in", "Berlin", "Where is the Eiffel Tower? In", "Bananas are", "yellow"),
    ("Apple was founded by", "Bill Gates", "The founder of Apple is", "The sun rises in the", "east"),
    ("The Beatles came from", "Paris", "The home town of the Beatles is", "Cats like to", "sleep a lot"),
    ("Mount Everest is in", "Chile", "Everest stands in", "Two plus two equals", "four"),
    ("Lionel Messi plays", "cricket", "Messi's sport is", "Ice is", "frozen water"),
]


def _records(spec: dict[str, Any]):
    from ..dataset import EditRecord

    if spec["model"] == "embedded":
        from ..dataset import read_records
        from ..paths import data_file

        return read_records(data_file("counterfact/counterfact-val.json"), "counterfact", limit=spec["edits"])
    out = []
    for i in range(spec["edits"]):
        p, t, r, lp, lg = _FACTS[i % len(_FACTS)]
        out.append(EditRecord(prompt=p, target_new=t, rephrase_prompt=r, locality_prompt=lp,
                              locality_ground_truth=lg, index=i, source="<equivalence>"))
    return out


def _model_and_config(spec: dict[str, Any]):
    from ..models.agrade import AGRADETrainingHyperParams

    dtype = getattr(torch, spec["dtype"])
    if spec["model"] == "embedded":
        from ..lm import load_model_and_tokenizer
        from ..models.agrade import AGRADEHyperParams

        model, tok = load_model_and_tokenizer(dtype=dtype)
        base = AGRADEHyperParams.from_hparams(spec["hparams"]).to_dict()
        params = base["inner_params"]
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ..lm import load_tokenizer

        tok = load_tokenizer()
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).to(dtype).eval()
        params = [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)]
        base = {}
    cfg = dict(base, alg_name="AGRADE", model_name="equivalence-check", inner_params=list(params),
               editor_dtype="float64" if dtype == torch.float64 else "float32", cache_batch_size=4,
               n_edits=spec["edits"], val_size=min(4, spec["edits"]), val_every=0, checkpoint_every=0,
               max_steps=spec["steps"], lr=1e-3, eta_lr=1e-3, lambda_lr=1e-2, max_length=32,
               loc_coef=0.7, gen_coef=1.0, edit_coef=0.5, train_lower_dtype=None, seed=0)
    if spec["model"] != "embedded":
        cfg.update(rank=8, n_blocks=2, eta_init=0.5, log_lambda_init=-1.0)
    allowed = set(AGRADETrainingHyperParams.__dataclass_fields__)
    return model, tok, AGRADETrainingHyperParams.from_dict({k: v for k, v in cfg.items() if k in allowed})


def _perturb(nets, seed: int = 1, scale: float = 0.1) -> None:
    """Non-trivial network weights (an untrained net starts as "normalise, then identity")."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(nets.named_parameters()):
            if name.endswith(("lr", "log_lambda")):
                continue
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def compute(spec: dict[str, Any], collective) -> dict[str, torch.Tensor]:
    """ΔW, one step's gradients and the state after ``spec['steps']`` steps, on this rank."""
    from ..models.agrade.agrade_trainer import AGRADETrainer
    from ..models.agrade.archive import load_networks
    from ..models.agrade.editor import AGRADEEditor

    torch.set_num_threads(1)
    model, tok, cfg = _model_and_config(spec)
    records = _records(spec)
    out: dict[str, torch.Tensor] = {}
    trainer = AGRADETrainer(cfg, train_set=records, val_set=records, model=model, tok=tok, progress=False,
                            log=lambda *_: None, collective=collective)
    if spec["model"] == "embedded":
        trained = load_networks(spec["archive"], model, cfg, dtype=trainer.editor.dtype)
        trainer.nets.load_state_dict(trained.state_dict())
    else:
        _perturb(trainer.nets)
    # editing: the network in eval mode (frozen normaliser), this rank's shard of the edits
    trainer.nets.eval()
    editor = AGRADEEditor(model, tok, cfg, trainer.nets)
    mine = collective.shard(records)
    result = editor.edit_deltas([r.prompt for r in mine], [r.target_new for r in mine], collective=collective,
                                subjects=[r.subject for r in mine])
    for name, delta in result.deltas.items():
        out[f"edit/{name}"] = delta.detach().clone()
    # edit_rounds: two solves, the stop check on the all-reduced accuracy (1.0: never reached on a tiny model)
    rounds_cfg = type(cfg).from_dict(dict(cfg.to_dict(), edit_rounds=2, rounds_stop_accuracy=1.0))
    two = AGRADEEditor(model, tok, rounds_cfg, trainer.nets).edit_deltas(
        [r.prompt for r in mine], [r.target_new for r in mine], collective=collective,
        subjects=[r.subject for r in mine])
    for name, delta in two.deltas.items():
        out[f"rounds/{name}"] = delta.detach().clone()
    out["rounds/accuracy_before"] = torch.tensor([r["accuracy_before"] for r in two.rounds], dtype=torch.float64)
    # the perplexity guard: the held-out windows are sharded over ranks and the NLL sums all-reduced; the limit is
    # never reached (the guarded ΔW is the 2-round one), so the reference NLL and the rounds' ratios are compared
    with tempfile.TemporaryDirectory(prefix="easyedit-agrade-heldout-") as tmp:
        over = dict(max_heldout_ppl_ratio=1e9, heldout_windows=3)
        if spec["model"] != "embedded":  # a small text of its own (the embedded model uses the statistics corpus)
            corpus = Path(tmp) / "heldout.txt"
            corpus.write_text(" ".join(f"{p} {t}. {lp} {lg}." for p, t, _r, lp, lg in _FACTS * 8), encoding="utf-8")
            over.update(preserved_corpus=str(corpus), preserved_tokens=64, preserved_window=32)
        guard_editor = AGRADEEditor(model, tok, type(cfg).from_dict(dict(rounds_cfg.to_dict(), **over)), trainer.nets)
        guarded = guard_editor.edit_deltas([r.prompt for r in mine], [r.target_new for r in mine],
                                           collective=collective, subjects=[r.subject for r in mine])
        out["guard/reference_nll"] = torch.tensor([guard_editor.heldout_text(collective)[1]], dtype=torch.float64)
    out["guard/heldout_ppl_ratio"] = torch.tensor([r["heldout_ppl_ratio"] for r in guarded.rounds],
                                                  dtype=torch.float64)
    # training: one step's gradients, then the state after `steps` Adam steps
    trainer.nets.train()
    trainer.compute_gradients(records)
    for name, p in trainer.nets.named_parameters():
        if p.grad is not None:
            out[f"grad/{name}"] = p.grad.detach().clone()
    trainer.opt.zero_grad(set_to_none=True)
    for _ in range(spec["steps"]):
        trainer.train_step(records)
    for name, t in trainer.nets.state_dict().items():
        out[f"state/{name}"] = t.detach().clone()
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str, spec: dict[str, Any]) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from ..distributed.collective import TorchCollective

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = compute(spec, TorchCollective())
        save_file({k: v.contiguous() for k, v in res.items()}, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def run_distributed(spec: dict[str, Any], world_size: int) -> list[dict[str, torch.Tensor]]:
    """``compute`` on ``world_size`` gloo processes; returns every rank's results."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="easyedit-agrade-dp-") as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        mp.spawn(_worker, args=(world_size, init_file, tmp, spec), nprocs=world_size, join=True)
        return [load_file(str(Path(tmp) / f"rank{r}.safetensors")) for r in range(world_size)]


def relative_errors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖a − b‖ / max(‖b‖, tiny) per key (Frobenius, fp64); keys must agree."""
    if set(a) != set(b):
        raise AssertionError(f"result keys differ: {sorted(set(a) ^ set(b))}")
    out = {}
    for k in sorted(b):
        x, y = a[k].double(), b[k].double()
        out[k] = float((x - y).norm() / y.norm().clamp_min(1e-30)) if y.numel() else 0.0
    return out


def check(spec: dict[str, Any], world_size: int = 2) -> dict[str, Any]:
    """Single-process vs ``world_size`` ranks; per-key relative errors and whether ranks agree exactly on ΔW."""
    from ..distributed.collective import Collective

    single = compute(spec, Collective())
    ranks = run_distributed(spec, world_size)
    errors = relative_errors(ranks[0], single)
    rank_spread = max((relative_errors(r, ranks[0])[k] for r in ranks[1:] for k in ranks[0]
                       if k.startswith("edit/")), default=0.0)
    return {"errors": errors, "rank_spread_edit": rank_spread,
            "max_error": {g: max((v for k, v in errors.items() if k.startswith(g + "/")), default=0.0)
                          for g in ("edit", "rounds", "guard", "grad", "state")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    p.add_argument("--edits", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="Adam steps compared after the gradient check")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--hparams", default="hparams/AGRADE/smollm2-135m")
    p.add_argument("--archive", default="archives/agrade-smollm2-135m-instruct.safetensors")
    p.add_argument("--tol", type=float, default=None, help="default 1e-4 (float32) / 1e-9 (float64)")
    p.add_argument("--json", help="also write the errors here")
    args = p.parse_args(argv)
    spec = {"model": args.model, "edits": args.edits, "steps": args.steps, "dtype": args.dtype,
            "hparams": args.hparams, "archive": args.archive}
    tol = args.tol if args.tol is not None else (1e-4 if args.dtype == "float32" else 1e-9)
    res = check(spec, args.world_size)
    print(f"1 process vs {args.world_size} gloo processes, {args.model} model, {args.edits} edits, "
          f"{args.dtype}: max relative error")
    for group, err in res["max_error"].items():
        print(f"  {group:5s} {err:.3e}")
    print(f"  ΔW spread across ranks: {res['rank_spread_edit']:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(res, spec=spec, world_size=args.world_size), indent=2))
    worst = max(res["max_error"].values())
    if worst > tol or res["rank_spread_edit"] != 0.0:
        print(f"FAILED: {worst:.3e} > tol {tol:g} or ranks disagree", file=sys.stderr)
        return 1
    print(f"OK (tol {tol:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
