"""Training of the AGRADE hypernetwork (eqs 6–7) — ``AGRADETrainer`` (EasyEdit-style) and ``train_main``.

One training step on ``n_edits`` records:

1. the layers below the first edited one run once, without grad, for the edit, equivalent and unrelated prompts;
2. cache pass on the edit prompts (summed CE) → H, ∇G per module; the normaliser observes them (train mode only);
3. ΔW per module without grad (eqs 1–5, :class:`~.editor.AGRADEEditor`);
4. unedited reference distributions on the unrelated prompts (upper layers only, no grad);
5. ΔW added through fp32 forward hooks as leaves (``core.weights.delta_leaves``; the LM weights are never
   written, whatever their dtype); L = gen_coef·CE(equivalent) + edit_coef·CE(edit) + loc_coef·KL(unedited ‖
   edited on unrelated) backpropagated **once** through the upper layers → g_θ = ∂L/∂ΔW = leaf.grad;
6. per module: P = H M⁻¹ g_θ (eq 6, same factorisation as the edit), ∂L/∂λ = −e^λ⟨M⁻¹g_θ, ΔW⟩, and the
   surrogate L_AGRADE = Σ P ⊙ G (eq 7) with G recomputed with grad (eqs 1, 2, 4) → hypernetwork and η grads;
7. gradient clipping, Adam step (separate groups and rates for the body, η and λ).

Validation every ``val_every`` steps edits ``val_size`` held-out records in one batch and reports ES/GS/LS/Score
(teacher-forced) — the best network is exported to ``<out>/best.safetensors``; early stopping on
``early_stop_key``. Checkpoints (safetensors + JSON, atomic) every ``checkpoint_every`` steps; ``--resume``
continues from ``<out>/latest.json`` to the same result as an uninterrupted run (data order is a pure function of
seed and step; no other randomness is used). The loop, checkpoints, exports and the shared command-line options are
:class:`~easyedit_agrade.core.editor_trainer.EditorTrainer`'s; this module supplies the step, the validation and
the archive.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ...core.cache import grad_only_for
from ...core.editor_trainer import EditorTrainer, jsonable, run_and_report, train_cli, trainer_arg_parser
from ...core.weights import delta_leaves
from ...dataset.readers import EditRecord, read_pool, records_from_requests
from ...distributed.collective import Collective, get_collective
from . import equations as eq
from .agrade_eval import Probes, build_probes, evaluate_records, harmonic_mean, per_record_mean
from .agrade_hparams import AGRADETrainingHyperParams
from .archive import build_networks, save_archive
from .editor import AGRADEEditor, MicroBatch


def _resolve_data(path: str) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    from ...paths import data_file

    return data_file(path)


def as_records(data: Any, fmt: str = "auto") -> list[EditRecord]:
    """Records from a path, a list of :class:`EditRecord`, a list of EasyEdit request dicts, or an EasyEdit
    dataset object (``ZsreDataset``/``CounterFactDataset``, whose ``_data`` holds request-like dicts)."""
    if isinstance(data, (str, os.PathLike)) or (isinstance(data, (list, tuple)) and data
                                                 and all(isinstance(d, str) for d in data)):
        # one file, or a mixed pool of "path[@start:stop]" entries (balanced, interleaved)
        return read_pool(data, _resolve_data, fmt=fmt)  # type: ignore[arg-type]
    if hasattr(data, "_data") and not isinstance(data, list):
        data = list(data._data)
    data = list(data)
    if data and isinstance(data[0], EditRecord):
        return data
    reqs = []
    for d in data:
        if "locality" not in d and "locality_prompt" in d:
            d = dict(d, locality={"neighborhood": {"prompt": d["locality_prompt"],
                                                   "ground_truth": d["locality_ground_truth"]}})
        reqs.append(d)
    return records_from_requests(reqs)


class AGRADETrainer(EditorTrainer):
    """EasyEdit-style trainer: ``AGRADETrainer(config, train_set, val_set).run()``.

    ``config`` is an :class:`AGRADETrainingHyperParams`; ``train_set``/``val_set`` are anything
    :func:`as_records` accepts (None: the paths in the config). ``model``/``tok`` may be passed to reuse a loaded
    model. ``out_dir`` overrides ``config.results_dir``.

    Data-parallel training (``torchrun`` / ``accelerate launch``; ``collective`` defaults to the initialised
    process group, see :mod:`easyedit_agrade.distributed`): every rank builds the same step batch and works on its
    shard (``records[rank::world_size]``); the normaliser statistics, HᵀH, HᵀG, eq 4's inner products, the token
    counts that normalise the losses, g_θ and finally the hypernetwork gradients are summed over ranks, so each
    rank takes the same Adam step as one process on the whole batch. Validation, checkpoints, logs and exports
    happen on rank 0; its decisions (best, early stopping) are broadcast.
    """

    progress_desc = "AGRADE train"

    def __init__(self, config: AGRADETrainingHyperParams, train_set: Any = None, val_set: Any = None, *,
                 model=None, tok=None, out_dir: str | os.PathLike[str] | None = None, resume: bool = False,
                 max_steps: int | None = None, progress: bool = True, log=print,
                 collective: Collective | None = None) -> None:
        super().__init__(config, collective=collective if collective is not None else get_collective(),
                         model=model, tok=tok, out_dir=out_dir, resume=resume, max_steps=max_steps,
                         progress=progress, log=log)
        model = self.model
        self.train_records = as_records(train_set if train_set is not None else config.train_data, config.data_format)
        val_all = as_records(val_set if val_set is not None else config.val_data, config.data_format)
        if config.val_start is None:
            self.val_records = val_all[-config.val_size:]
        else:
            self.val_records = val_all[config.val_start:config.val_start + config.val_size]
        if len(self.train_records) < config.n_edits:
            raise ValueError(f"{len(self.train_records)} training records < n_edits={config.n_edits}")
        if config.n_edits < self.coll.world_size:
            raise ValueError(f"n_edits={config.n_edits} < world_size={self.coll.world_size}: every rank needs at "
                             "least one edit per step")
        self.nets = self.place_networks(build_networks(model, config, seed=config.seed))
        self.editor = AGRADEEditor(model, self.tok, config, self.nets)
        self.use_train_lower_dtype(self.editor)
        if config.init_archive:
            self._init_from_archive(config.init_archive)
        self.opt = torch.optim.Adam(self.nets.param_groups(config.lr, config.eta_lr, config.lambda_lr,
                                                           mu_lr=config.mu_lr))
        self._val_probes: Probes | None = None

    def _init_from_archive(self, path: str) -> None:
        """Start from a trained archive's network (``init_archive``; a fresh optimiser): e.g. continue a shipped
        archive with the preserved-knowledge term switched on (its μ then starts at ``log_mu_init``)."""
        from .archive import load_networks

        trained = load_networks(path, self.model, self.config, dtype=next(self.nets.parameters()).dtype)
        self.nets.load_state_dict(trained.state_dict(), strict=True)
        self.nets.train()
        self.log(f"initialised the networks from {path}")

    # -- data --------------------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """Record indices of training step ``step`` (0-based): a pure function of (seed, step)."""
        n, k = len(self.train_records), self.config.n_edits
        per_epoch = n // k
        epoch, b = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        return perm[b * k:(b + 1) * k].tolist()

    # -- one step ----------------------------------------------------------------------------------------
    def run_step(self) -> dict[str, float]:
        """The loop's step ``self.step``: :meth:`train_step` on :meth:`batch_indices`."""
        return self.train_step([self.train_records[i] for i in self.batch_indices(self.step)])

    def _global_tokens(self, mbs: Sequence[MicroBatch]) -> int:
        """Target tokens of ``mbs`` summed over ranks (the losses are means over the *global* batch)."""
        t = torch.tensor([float(sum(int(mb.predict_mask.sum()) for mb in mbs))], dtype=torch.float64)
        return int(self.coll.all_reduce_(t)[0])

    def _edited_loss(self, mbs: Sequence[MicroBatch], n_tokens: int, coef: float, n: int,
                     ref: Sequence[torch.Tensor] | None = None) -> tuple[float, float]:
        """Backward coef·mean-token loss over ``mbs`` (CE, or KL to ``ref`` log-probs), normalised by the global
        ``n_tokens``; returns (loss summed over ranks / n_tokens, per-record metric averaged over all ranks'
        records)."""
        total, vals, rows = 0.0, [], []
        for i, mb in enumerate(mbs):
            logits = self.editor.stack.upper(mb.hidden, mb.input_ids, mb.attention_mask, mb.predict_mask)
            logp = torch.log_softmax(logits.to(self.editor.dtype), -1)
            if ref is None:
                loss = F.nll_loss(logp, mb.target_labels, reduction="sum")
                vals.append((logits.argmax(-1) == mb.target_labels).double().detach())
            else:
                loss = (ref[i].exp() * (ref[i] - logp)).sum()
                vals.append((logits.argmax(-1) == ref[i].argmax(-1)).double().detach())
            rows.append(mb.rows)
            if coef != 0.0:
                (loss * (coef / n_tokens)).backward()
            total += float(loss.detach())
        metric = per_record_mean(torch.cat(vals), torch.cat(rows), n)
        metric = metric[~torch.isnan(metric)]
        sums = torch.tensor([total, float(metric.sum()), float(metric.numel())], dtype=torch.float64)
        if self.coll.is_distributed:
            self.coll.all_reduce_(sums)
            total = float(sums[0])
        return total / max(n_tokens, 1), float(sums[1] / sums[2]) if float(sums[2]) else float("nan")

    def train_step(self, records: Sequence[EditRecord]) -> dict[str, float]:
        """One optimisation step: :meth:`compute_gradients`, clipping, Adam."""
        stats = self.compute_gradients(records)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                                   self.config.max_grad_norm)
        self.opt.step()
        stats["grad_norm"] = float(grad_norm)
        return stats

    def compute_gradients(self, records: Sequence[EditRecord]) -> dict[str, float]:
        """Steps 1–6 of the module docstring: leaves ∂L/∂(network parameters, η, λ) in ``.grad``."""
        cfg, ed, sw, coll = self.config, self.editor, self.editor.switches, self.coll
        records = coll.shard(records)  # this rank's share of the step batch (all of it in one process)
        probes = build_probes(ed, records)
        # 2. cache pass, normaliser update (training mode only; statistics of the global batch)
        cache = ed.cache(probes.edit)
        for name in ed.stack.module_names:
            self.nets.observe(name, *cache.get(name), coll)
        # 3. ΔW without grad (Gram, HᵀG and eq 4's products summed over ranks)
        result = ed.compute(cache, coll)
        # 4. unedited reference on unrelated prompts
        with torch.no_grad():
            ref = [torch.log_softmax(ed.stack.upper(mb.hidden, mb.input_ids, mb.attention_mask,
                                                    mb.predict_mask).to(ed.dtype), -1) for mb in probes.loc]
        # 5. ΔW added through forward hooks as editor-dtype leaves (the LM weights are never written, whatever
        #    their dtype); one backward through the upper layers gives g_θ = ∂L/∂ΔW = leaf.grad (editor layout)
        with torch.enable_grad(), grad_only_for(self.model), \
                delta_leaves(self.model, result.deltas, dtype=ed.dtype) as leaves:
            n_tok = self._global_tokens
            gen_loss, gs = self._edited_loss(probes.equiv, n_tok(probes.equiv), cfg.gen_coef, probes.n)
            edit_loss, es = self._edited_loss(probes.edit, n_tok(probes.edit), cfg.edit_coef, probes.n)
            loc_loss, ls = self._edited_loss(probes.loc, n_tok(probes.loc), cfg.loc_coef, probes.n, ref=ref)
        g_theta = {n: (d.grad if d.grad is not None else torch.zeros_like(d)).detach() for n, d in leaves.items()}
        for g in g_theta.values():  # each rank's loss share → the global ∂L/∂ΔW
            coll.all_reduce_(g)
        # 6. surrogate (eq 7) per module, local on each rank (P = H_rank M⁻¹ g_θ); λ gradient (global quantities,
        #    identical on every rank) added after the gradient all-reduce
        self.opt.zero_grad(set_to_none=True)
        surrogate_total = 0.0
        ridge_grads: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        for me in result.modules:
            g = g_theta[me.name]
            P, lam_grad, mu_grad = eq.eq6_and_ridge_gradients(me.fact, me.H, g, me.delta,
                                                              use_gradient_projection=sw.gradient_projection,
                                                              regularization=sw.regularization)
            ridge_grads.append((me.name, lam_grad, mu_grad))
            with torch.enable_grad():
                G = ed.module_G(me.name, me.H, me.grad, me.G_prev, coll, me.key_reference)
                surrogate = eq.eq7_surrogate_loss(P, G)
                surrogate.backward()
            surrogate_total += float(surrogate.detach())
        if coll.is_distributed:
            coll.all_reduce_grads_([p for group in self.opt.param_groups for p in group["params"]])
            surrogate_total = float(coll.all_reduce_(torch.tensor([surrogate_total], dtype=torch.float64))[0])
        for name, lam_grad, mu_grad in ridge_grads:
            slot = self.nets.slot(name)
            for param, grad in ((self.nets.nets[slot.group].log_lambda, lam_grad),
                                (None if self.nets.log_mu_params is None else self.nets.log_mu_params[slot.group],
                                 mu_grad)):
                if param is None or grad is None:
                    continue
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad[slot.index] += grad.to(param.dtype)
        return {"gen_loss": gen_loss, "edit_loss": edit_loss, "loc_loss": loc_loss,
                "loss": cfg.gen_coef * gen_loss + cfg.edit_coef * edit_loss + cfg.loc_coef * loc_loss,
                "surrogate": surrogate_total, "es": es, "gs": gs, "ls": ls, "score": harmonic_mean(es, gs, ls),
                "cache_loss": result.cache_loss, "tokens": float(result.n_tokens)}

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        self.nets.eval()
        try:
            if self._val_probes is None:
                self._val_probes = build_probes(self.editor, self.val_records)
            out = evaluate_records(self.editor, self.val_records, pre=False, probes=self._val_probes)
        finally:
            self.nets.train()
        out["loss"] = -out["score"]  # placeholder key for early_stop_key=loss compat: lower is better
        return out

    def history_entry(self, val: dict[str, float]) -> dict[str, Any]:
        scalars = self.nets.per_module_scalars()
        entry = {"step": self.step, "val": _round(val), "wall_s": round(self.state["train_wall_s"], 1),
                 "eta": _round({k: v["eta"] for k, v in scalars.items()}),
                 "log_lambda": _round({k: v["log_lambda"] for k, v in scalars.items()})}
        if self.nets.log_mu_params is not None:
            entry["log_mu"] = _round({k: v["log_mu"] for k, v in scalars.items()})
        return entry

    # -- loop hooks, checkpoints, export -------------------------------------------------------------------
    def train_log_stats(self, window: Sequence[dict[str, float]]) -> dict[str, float]:
        return _round(window[-1])

    def progress_postfix(self, stats: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{stats['loss']:.3f}", "es": f"{stats['es']:.2f}", "gs": f"{stats['gs']:.2f}",
                "ls": f"{stats['ls']:.2f}"}

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, **{k: self.state[k] for k in ("best", "best_step", "stopped_early")}}

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"alg_name": "AGRADE", "config": jsonable(self.config.to_dict())}

    def archive_metrics(self, val: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        return _round(val)

    def training_facts(self, metrics: dict | None = None) -> dict[str, Any]:
        return {"step": self.step, "seed": self.config.seed, "n_edits": self.config.n_edits,
                "train_data": self.config.train_data, "val_data": self.config.val_data,
                "val_size": len(self.val_records), "metrics": metrics,
                "train_wall_s": self.state["train_wall_s"]}

    def write_archive(self, path: Path, facts: dict[str, Any]) -> None:
        save_archive(path, self.nets, self.model, self.config, facts)

    def export_best(self, metrics: dict[str, float]) -> None:
        self.export("best", metrics)


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in d.items()}


def build_arg_parser() -> argparse.ArgumentParser:
    return trainer_arg_parser(
        alg="AGRADE", prog="easyedit-agrade train",
        description="Train an AGRADE hypernetwork (resumable; see docs/agrade.md).",
        out_help="output folder for checkpoints and best.safetensors (default: results_dir)",
        set_help="override any hparam (YAML value), e.g. --set use_weight_projection=false",
        after_seed=[(["--n-edits"], dict(type=int, help="override n_edits (edits per step)")),
                    (["--val-every"], dict(type=int, help="override val_every")),
                    (["--preset"], dict(choices=["agrade", "malmen"], help="override preset")),
                    (["--init-from"], dict(metavar="ARCHIVE",
                                           help="start from this trained archive (sets init_archive)"))],
        after_threads=[(["--no-progress"], dict(action="store_true", help="no tqdm bar"))])


def load_training_config(path: str, overrides: dict[str, Any]) -> AGRADETrainingHyperParams:
    """The training YAML at ``path`` (``.yaml`` optional) with ``overrides`` applied, validated."""
    return AGRADETrainingHyperParams.from_hparams(path, overrides)


def _option_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    return [("n_edits", args.n_edits), ("val_every", args.val_every), ("preset", args.preset),
            ("init_archive", args.init_from)]


def _start(cfg: AGRADETrainingHyperParams, args: argparse.Namespace) -> int:
    from ...distributed.collective import init_from_env

    coll = init_from_env()  # torchrun / accelerate launch: one process per rank, gloo on CPU, NCCL on GPU
    trainer = AGRADETrainer(cfg, out_dir=args.out or cfg.results_dir, resume=args.resume,
                            progress=not args.no_progress, log=lambda s: print(s, flush=True), collective=coll)
    return run_and_report(trainer)


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``easyedit-agrade train``; returns a process exit code."""
    return train_cli(argv, build_arg_parser(), load_training_config, _option_overrides, _start)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(train_main())
