"""Training of the InstructEdit editor (MEND-style meta-learning on several tasks) — ``InstructEditTrainer`` and
``train_main``.

One update on ``n_edits`` drawn edits (task, record, description index: a pure function of seed and step; with
``balance`` every task is equally likely):

1. prompts wrapped with the record's instruction (``use_instruction: false``: not wrapped — multi-task MEND);
2. the layers below the first edited one run once, without grad, for edit / equivalent / unrelated prompts;
3. cache pass on the edit prompts (summed target CE) → u, δ per module; the normalisers observe them;
4. ΔW = −lr·ũᵀδ̃ per module **with grad** w.r.t. the hypernetwork;
5. unedited log-probs on the unrelated (locality, never wrapped) prompts;
6. with ΔW added through forward hooks: L = edit_coef·CE(equivalent) + inner_coef·CE(edit) + loc_coef·KL(unedited ‖
   edited on unrelated), mean over target tokens, backpropagated through the upper layers into the hypernetwork.

``accumulate`` updates make one Adam step (clipped). Validation every ``val_every`` steps edits ``val_per_task``
held-out records of every training task one at a time and reports Reliability / Generalization / Locality;
the best editor (mean over tasks of the three) is exported to ``<out>/best.safetensors``. Checkpoints (atomic,
safetensors + JSON) every ``checkpoint_every`` steps; ``--resume`` continues from the latest one. The loop,
checkpoints, exports and the shared command-line options are
:class:`~easyedit_agrade.core.editor_trainer.EditorTrainer`'s; this module supplies the update, the validation
and the archive.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ...core.cache import grad_only_for
from ...core.editor_trainer import EditorTrainer, run_and_report, train_cli, trainer_arg_parser
from ...distributed.collective import Collective
from ...evaluate.metrics import nanmean
from .archive import save_archive
from .editor import InstructEditEditor, build_networks, delta_hooks
from .instructedit_eval import evaluate_task, make_probe
from .instructedit_hparams import InstructEditTrainingHyperParams
from .instructions import InstructionSet, load_instructions
from .multitask import MultiTaskSampler, TaskRecord, load_split


def load_task_data(cfg: InstructEditTrainingHyperParams) -> tuple[dict[str, list[TaskRecord]], dict[str, list[TaskRecord]]]:
    """(train, validation) records per training task. Validation = the last ``val_per_task`` test records."""
    train, val = {}, {}
    for t in cfg.tasks:
        recs = load_split(t, "train", seed=cfg.seed, recent_test_size=cfg.recent_test_size)
        if cfg.max_train_per_task is not None and len(recs) > cfg.max_train_per_task:
            idx = sorted(random.Random(cfg.seed + 17).sample(range(len(recs)), cfg.max_train_per_task))
            recs = [recs[i] for i in idx]
        train[t] = recs
        test = load_split(t, "test", seed=cfg.seed, recent_test_size=cfg.recent_test_size)
        val[t] = test[-cfg.val_per_task:] if cfg.val_per_task > 0 else []
    return train, val


class InstructEditTrainer(EditorTrainer):
    """EasyEdit-style trainer: ``InstructEditTrainer(config, train_set, val_set).run()``.

    ``train_set``/``val_set``: ``{task: [TaskRecord]}`` (None: the shared data named by the config). One process
    (no data parallelism), no progress bar; a run ends with a validation of its last step, a checkpoint and
    ``last.safetensors``.
    """

    final_round_after_loop = True

    def __init__(self, config: InstructEditTrainingHyperParams, train_set: dict | None = None,
                 val_set: dict | None = None, *, model=None, tok=None, out_dir: str | None = None,
                 resume: bool = False, max_steps: int | None = None, log=print,
                 instructions: InstructionSet | None = None) -> None:
        super().__init__(config, collective=Collective(), model=model, tok=tok, out_dir=out_dir, resume=resume,
                         max_steps=max_steps, progress=False, log=log)
        cfg, model = config, self.model
        self.instructions = instructions or (load_instructions(cfg.instructions_path) if cfg.use_instruction else None)
        if train_set is None or val_set is None:
            tr, va = load_task_data(cfg)
            train_set = train_set if train_set is not None else tr
            val_set = val_set if val_set is not None else va
        self.train_set, self.val_set = train_set, val_set
        self.sampler = MultiTaskSampler(train_set, balance=cfg.balance, task_weights=cfg.task_weights, seed=cfg.seed,
                                        instructions=self.instructions, use_instruction=cfg.use_instruction)
        self.nets = self.place_networks(build_networks(model, cfg, seed=cfg.seed))
        self.editor = InstructEditEditor(model, self.tok, cfg, self.nets)
        self.use_train_lower_dtype(self.editor)
        groups = self.nets.param_groups(cfg.lr, cfg.lr_lr, 0.0)
        self.opt = torch.optim.Adam([g for g in groups if g["name"] != "lambda"])

    # -- one update ------------------------------------------------------------------------------------------
    def _pairs(self, draws: Sequence[tuple[TaskRecord, int]]):
        edit, gen, loc = [], [], []
        for rec, idx in draws:
            pr = make_probe(rec, self.instructions, idx, self.config.use_instruction)
            edit.append(pr.rel)
            gen.extend(pr.gen or [pr.rel])
            loc.extend(pr.loc)
        return edit, gen, loc

    def _loss(self, mbs, ref=None):
        total, n, hits = 0.0, 0, 0.0
        losses = []
        for i, mb in enumerate(mbs):
            logits = self.editor.stack.upper(mb.hidden, mb.input_ids, mb.attention_mask, mb.predict_mask)
            logp = torch.log_softmax(logits.float(), -1)
            if ref is None:
                losses.append(F.nll_loss(logp, mb.target_labels, reduction="sum"))
                hits += float((logits.argmax(-1) == mb.target_labels).sum())
            else:
                losses.append((ref[i].exp() * (ref[i] - logp)).sum())
                hits += float((logits.argmax(-1) == ref[i].argmax(-1)).sum())
            n += int(mb.predict_mask.sum())
        loss = torch.stack(losses).sum() / max(n, 1)
        return loss, hits / max(n, 1)

    def update(self, draws: Sequence[tuple[TaskRecord, int]], scale: float = 1.0) -> dict[str, float]:
        cfg, ed = self.config, self.editor
        edit_p, gen_p, loc_p = self._pairs(draws)
        mbs_edit, mbs_gen = ed.encode(*zip(*edit_p)), ed.encode(*zip(*gen_p))
        mbs_loc = ed.encode(*zip(*loc_p)) if loc_p else []
        for group in (mbs_edit, mbs_gen, mbs_loc):
            ed.lower(group)
        cache = ed.cache(mbs_edit)
        ed.observe(cache)
        with torch.no_grad():
            ref = [torch.log_softmax(ed.stack.upper(mb.hidden, mb.input_ids, mb.attention_mask,
                                                    mb.predict_mask).float(), -1) for mb in mbs_loc]
        with torch.enable_grad():
            deltas = ed.deltas(cache)
            with grad_only_for(self.model), delta_hooks(self.model, deltas):
                gen_loss, gs = self._loss(mbs_gen)
                edit_loss, es = self._loss(mbs_edit)
                if mbs_loc:
                    loc_loss, ls = self._loss(mbs_loc, ref)
                else:
                    loc_loss, ls = torch.zeros(()), float("nan")
                loss = cfg.edit_coef * gen_loss + cfg.inner_coef * edit_loss + cfg.loc_coef * loc_loss
                (loss * scale).backward()
        return {"loss": float(loss.detach()), "gen_loss": float(gen_loss.detach()),
                "edit_loss": float(edit_loss.detach()), "loc_loss": float(loc_loss.detach()), "es": es, "gs": gs, "ls": ls,
                "delta_norm": float(sum(float(d.detach().norm()) ** 2 for d in deltas.values()) ** 0.5)}

    def run_step(self) -> dict[str, float]:
        return self.train_step()

    def train_step(self) -> dict[str, float]:
        """``accumulate`` updates on the draws of step ``self.step``, clipping, Adam (skipped on a non-finite
        gradient norm)."""
        cfg = self.config
        self.opt.zero_grad(set_to_none=True)
        stats: list[dict[str, float]] = []
        for a in range(cfg.accumulate):
            draws = self.sampler.draw(self.step * cfg.accumulate + a, cfg.n_edits)
            stats.append(self.update(draws, 1.0 / cfg.accumulate))
        params = [p for g in self.opt.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if torch.isfinite(grad_norm):
            self.opt.step()
        out = {k: nanmean([s[k] for s in stats]) for k in stats[0]}
        out["grad_norm"] = float(grad_norm)
        return out

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        self.nets.eval()
        try:
            per_task = {t: evaluate_task(self.editor, recs, instructions=self.instructions, index=0,
                                         use_instruction=self.config.use_instruction, pre=False, fluency=False)
                        for t, recs in self.val_set.items() if recs}
        finally:
            self.nets.train()
        scores = []
        for m in per_task.values():
            vals = [m[k] for k in ("rel", "gen", "loc") if m[k] == m[k]]
            scores.append(sum(vals) / len(vals) if vals else 0.0)
        return {"score": sum(scores) / max(len(scores), 1), "tasks": per_task}

    def history_entry(self, val: dict[str, Any]) -> dict[str, Any]:
        return {"step": self.step, "score": round(val["score"], 3),
                "tasks": {t: {k: round(v, 2) for k, v in m.items() if v == v} for t, m in val["tasks"].items()},
                "wall_s": round(self.state["train_wall_s"], 1)}

    def validation_log_line(self, entry: dict[str, Any]) -> str:
        return json.dumps({"val": entry})

    # -- loop hooks, checkpoints, export -------------------------------------------------------------------------
    def on_start(self) -> None:
        self.log(json.dumps({"start_step": self.step, "proportions": self.sampler.proportions(),
                             "train_sizes": {t: len(r) for t, r in self.train_set.items()}}))

    def train_log_stats(self, window: Sequence[dict[str, float]]) -> dict[str, float]:
        return {k: round(nanmean([s[k] for s in window]), 4) for k in window[0]}

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "best": self.state["best"], "best_step": self.state["best_step"],
                "train_wall_s": round(self.state["train_wall_s"], 1)}

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"alg_name": "InstructEdit"}

    def training_facts(self, metrics: dict | None = None) -> dict[str, Any]:
        cfg = self.config
        return {"step": self.step, "seed": cfg.seed, "tasks": list(cfg.tasks), "balance": cfg.balance,
                "use_instruction": cfg.use_instruction, "n_edits": cfg.n_edits, "accumulate": cfg.accumulate,
                "train_sizes": {t: len(r) for t, r in self.train_set.items()},
                "proportions": {k: round(v, 4) for k, v in self.sampler.proportions().items()},
                "lr": cfg.lr, "train_wall_s": round(self.state["train_wall_s"], 1), "val": metrics or {}}

    def write_archive(self, path: Path, facts: dict[str, Any]) -> None:
        save_archive(path, self.nets, self.model, self.config, facts)


def build_arg_parser() -> argparse.ArgumentParser:
    return trainer_arg_parser(
        alg="InstructEdit", prog="easyedit-agrade train --alg InstructEdit",
        description="Train an InstructEdit (or multi-task MEND) editor; resumable.",
        out_help="output folder (default: results_dir)", set_help="override any hparam (YAML value)",
        after_max_steps=[(["--max-wall-s"], dict(type=float,
                                                 help="stop after this much training wall time (seconds)"))],
        after_seed=[(["--tasks"], dict(help="comma-separated training tasks (e.g. counterfact for a single-task "
                                            "editor)")),
                    (["--no-instruction"], dict(action="store_true", help="multi-task MEND: never wrap prompts")),
                    (["--no-balance"], dict(action="store_true",
                                            help="natural task proportions instead of balanced"))],
        after_threads=[(["--export-only"], dict(action="store_true", help="no training: export the latest "
                                                "checkpoint as <out>/last.safetensors and exit"))])


def load_training_config(path: str, overrides: dict[str, Any]) -> InstructEditTrainingHyperParams:
    """The training YAML at ``path`` (``.yaml`` optional) with ``overrides`` applied, validated."""
    return InstructEditTrainingHyperParams.from_hparams(path, overrides)


def _option_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    return [("max_wall_s", args.max_wall_s), ("tasks", tasks),
            ("use_instruction", False if args.no_instruction else None),
            ("balance", False if args.no_balance else None)]


def _start(cfg: InstructEditTrainingHyperParams, args: argparse.Namespace) -> int:
    trainer = InstructEditTrainer(cfg, out_dir=args.out, resume=args.resume, log=lambda s: print(s, flush=True))
    if args.export_only:
        if not trainer.load_checkpoint():
            print(f"no checkpoint under {trainer.out / 'checkpoints'}", file=sys.stderr)
            return 1
        print(json.dumps({"exported": str(trainer.export("last")), "step": trainer.step}), flush=True)
        return 0
    return run_and_report(trainer)


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``easyedit-agrade train --alg InstructEdit``; returns a process exit code."""
    return train_cli(argv, build_arg_parser(), load_training_config, _option_overrides, _start)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(train_main())
