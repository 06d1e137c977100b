"""One training loop for the hypernetwork editors (the MALMEN ``editor/base.py`` / MEND trainer pattern).

:class:`EditorTrainer` owns everything a method's trainer shares: the model hand-over, placing the networks,
resume from ``<out>/checkpoints/latest.json``, the loop (progress bar, a JSON log line every 10 steps, validation
every ``val_every`` steps, early stopping on ``early_stop_key`` with ``patience``, an optional wall-time budget,
periodic checkpoints), the export of ``best.safetensors`` (+ ``best.json``) on every improvement, and the parts of
the ``train`` command line that every method has. A method subclass builds its networks, editor and optimiser in
``__init__`` (after ``super().__init__``; it sets ``self.nets`` and ``self.opt``) and supplies:

* :meth:`run_step` — one optimisation step, the batch a pure function of ``(seed, self.step)``;
* :meth:`validate` — held-out scores, ``early_stop_key`` among them;
* :meth:`history_entry` — what a validation adds to ``state["history"]``;
* :meth:`training_facts` and :meth:`write_archive` — the archive's training block and the archive itself;
* :meth:`checkpoint_metadata` — the metadata of a checkpoint's ``model.safetensors``.

No randomness is drawn here: a method's data order and network initialisation are pure functions of its seed, so
a resumed run continues exactly as an uninterrupted one (the loop's state is the checkpoint's ``state.json``).

The command line: :func:`trainer_arg_parser` (the shared options with a method's own ones at their places) and
:func:`train_cli` (threads, ``--set`` and option overrides, the YAML config, then the method's start).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .checkpoint import latest_checkpoint, load_training_checkpoint, save_json, save_training_checkpoint


def jsonable(d: dict) -> dict:
    """``d`` as plain JSON values (anything else becomes its ``str``)."""
    return json.loads(json.dumps(d, default=str))


def editor_torch_dtype(config: Any) -> torch.dtype:
    """The dtype the editor computes in (``editor_dtype``: float64 or float32)."""
    return torch.float64 if config.editor_dtype == "float64" else torch.float32


class EditorTrainer:
    """Base class of the hypernetwork-editor trainers; see the module docstring for what a method supplies.

    ``out_dir`` overrides ``config.results_dir``; ``max_steps`` overrides ``config.max_steps``; ``model``/``tok``
    reuse a loaded model (None: loaded from ``config.model_name``, float64 when ``editor_dtype`` is float64).
    ``collective`` (:mod:`easyedit_agrade.distributed.collective`) decides who logs, validates and writes: rank 0;
    the other ranks take its decisions by broadcast.
    """

    #: tqdm description
    progress_desc: str = "train"
    #: how a run ends. False: the last step (``max_steps`` or an early stop) is validated and checkpointed inside
    #: the loop like a periodic one. True: after the loop (also when the wall-time budget stops it) the last step is
    #: validated unless it just was, a checkpoint is always written, and the networks go to ``last.safetensors``.
    final_round_after_loop: bool = False

    def __init__(self, config: Any, *, collective: Any, model=None, tok=None,
                 out_dir: str | Path | None = None, resume: bool = False, max_steps: int | None = None,
                 progress: bool = True, log: Callable[..., Any] = print) -> None:
        self.config = config
        self.coll = collective
        self.out = Path(out_dir or config.results_dir)
        self.resume = resume
        self.max_steps = int(max_steps if max_steps is not None else config.max_steps)
        self.progress = progress and self.coll.is_main
        self.log = log if self.coll.is_main else (lambda *_a, **_k: None)
        if model is None or tok is None:
            from ..lm import load_model_and_tokenizer

            model, tok = load_model_and_tokenizer(
                str(config.model_name), dtype=torch.float64 if config.editor_dtype == "float64" else None)
        self.model, self.tok = model, tok
        self.model.eval()
        #: early stopping (None: off): stop after ``patience`` validations without an ``early_stop_key`` gain
        self.patience: int | None = getattr(config, "patience", None)
        self.early_stop_key: str = getattr(config, "early_stop_key", "score")
        self.max_wall_s: float | None = getattr(config, "max_wall_s", None)
        self.step = 0
        self.state: dict[str, Any] = {"best": None, "best_step": None, "history": [], "train_wall_s": 0.0}
        if self.patience is not None:
            self.state.update(bad_evals=0, stopped_early=False)

    # -- set-up helpers for the method's __init__ -------------------------------------------------------------
    def place_networks(self, nets):
        """``nets`` in the editor dtype on the model's device, in training mode (the normalisers observe)."""
        nets.to(dtype=editor_torch_dtype(self.config), device=next(self.model.parameters()).device)
        nets.train()
        return nets

    def use_train_lower_dtype(self, editor) -> None:
        """Run the frozen layers below the first edited one in ``train_lower_dtype`` (when set)."""
        if self.config.train_lower_dtype:
            editor.use_lower_dtype(getattr(torch, self.config.train_lower_dtype))

    # -- what a method supplies ---------------------------------------------------------------------------------
    def run_step(self) -> dict[str, float]:
        """One optimisation step (step number ``self.step``, 0-based); returns its statistics."""
        raise NotImplementedError

    def validate(self) -> dict[str, Any]:
        raise NotImplementedError

    def history_entry(self, val: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def training_facts(self, metrics: dict | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def write_archive(self, path: Path, facts: dict[str, Any]) -> None:
        raise NotImplementedError

    def checkpoint_metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- optional hooks -------------------------------------------------------------------------------------------
    def archive_metrics(self, val: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        """The metrics a best export records (default: the history entry)."""
        return entry

    def train_log_stats(self, window: Sequence[dict[str, float]]) -> dict[str, float]:
        """The ``train`` part of the periodic log line from the steps since the last one (default: the last)."""
        return dict(window[-1])

    def validation_log_line(self, entry: dict[str, Any]) -> str:
        return json.dumps(entry)

    def progress_postfix(self, stats: dict[str, float]) -> dict[str, str]:
        return {}

    def on_start(self) -> None:
        """Called once the run is set up (after a resume), before the first step."""

    def summary(self) -> dict[str, Any]:
        """What :meth:`run` returns."""
        return {"step": self.step, "best": self.state["best"], "best_step": self.state["best_step"]}

    # -- checkpoints and exports ----------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        return save_training_checkpoint(self.out / "checkpoints", self.step, self.nets.state_dict(),
                                        self.opt.state_dict(), dict(self.state),
                                        model_metadata=self.checkpoint_metadata())

    def load_checkpoint(self) -> bool:
        """Restore networks, optimiser, step and loop state from the newest intact checkpoint (False: none)."""
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None:
            return False
        model_state, _meta, opt_state, state = load_training_checkpoint(path)
        self.nets.load_state_dict(model_state, strict=True)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        self.step = int(state.pop("step"))
        self.state.update(state)
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def export(self, name: str = "best", metrics: dict | None = None) -> Path:
        """``<out>/<name>.safetensors`` (the archive) and ``<out>/<name>.json`` (its training facts)."""
        path = self.out / f"{name}.safetensors"
        facts = self.training_facts(metrics)
        self.write_archive(path, facts)
        save_json(self.out / f"{name}.json", facts)
        return path

    # -- validation and early stopping ----------------------------------------------------------------------------
    def _improves(self, value: float) -> bool:
        best = self.state["best"]
        if best is None:
            return True
        return value < best if self.early_stop_key == "loss" else value > best

    def validate_and_record(self) -> None:
        """Validate (rank 0), append to the history, export the best networks, count towards early stopping;
        the other ranks receive rank 0's state."""
        if not self.coll.is_main:
            self.state = self.coll.broadcast_object(self.state)
            return
        val = self.validate()
        value = val[self.early_stop_key]
        improved = self._improves(value)
        entry = self.history_entry(val)
        self.state["history"].append(entry)
        self.log(self.validation_log_line(entry))
        if improved:
            self.state.update(best=value, best_step=self.step)
            if self.patience is not None:
                self.state["bad_evals"] = 0
            self.export("best", self.archive_metrics(val, entry))
        elif self.patience is not None:
            self.state["bad_evals"] += 1
            if self.state["bad_evals"] >= self.patience:
                self.state["stopped_early"] = True
                self.log(f"early stopping at step {self.step}: no {self.early_stop_key} improvement in "
                         f"{self.patience} validations")
        if self.coll.is_distributed:
            self.state = self.coll.broadcast_object(self.state)

    # -- the loop -----------------------------------------------------------------------------------------------
    def _stopped_early(self) -> bool:
        return bool(self.state.get("stopped_early", False))

    def _is_validation_step(self) -> bool:
        every = self.config.val_every
        last = self.step == self.max_steps and not self.final_round_after_loop
        return every > 0 and (self.step % every == 0 or last)

    def _is_checkpoint_step(self) -> bool:
        every = self.config.checkpoint_every
        last = (self.step == self.max_steps or self._stopped_early()) and not self.final_round_after_loop
        return self.coll.is_main and every > 0 and (self.step % every == 0 or last)

    def _wall_budget_spent(self) -> bool:
        if self.max_wall_s is not None and self.state["train_wall_s"] >= self.max_wall_s:
            self.log(f"wall-time budget {self.max_wall_s}s reached at step {self.step}")
            return True
        return False

    def _final_round(self) -> None:
        history = self.state["history"]
        if self.config.val_every > 0 and (not history or history[-1]["step"] != self.step):
            self.validate_and_record()
        if self.coll.is_main:
            self.save_checkpoint()
            self.export("last")

    def run(self) -> dict[str, Any]:
        """Train to ``max_steps`` (from the latest checkpoint with ``resume``); returns :meth:`summary`."""
        if self.coll.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json(self.out / "config.json", jsonable(self.config.to_dict()))
        self.coll.barrier()
        if self.resume:
            self.load_checkpoint()
        self.on_start()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc=self.progress_desc, dynamic_ncols=True,
                       mininterval=5.0)
        window: list[dict[str, float]] = []
        while self.step < self.max_steps and not self._stopped_early():
            if self._wall_budget_spent():
                break
            t0 = time.perf_counter()
            stats = self.run_step()
            self.step += 1
            self.state["train_wall_s"] += time.perf_counter() - t0
            window.append(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**self.progress_postfix(stats))
            if self.step % 10 == 0 or self.step == 1:
                self.log(json.dumps({"step": self.step, "train": self.train_log_stats(window),
                                     "wall_s": round(self.state["train_wall_s"], 1)}))
                window = []
            if self._is_validation_step():
                self.validate_and_record()
            if self._is_checkpoint_step():
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.final_round_after_loop:
            self._final_round()
        self.coll.barrier()
        return self.summary()


# -- the command line ------------------------------------------------------------------------------------------------
#: a method's own option: (flags, argparse keyword arguments)
Option = tuple[Sequence[str], dict]


def trainer_arg_parser(*, alg: str, prog: str, description: str, out_help: str, set_help: str,
                       after_max_steps: Iterable[Option] = (), after_seed: Iterable[Option] = (),
                       after_threads: Iterable[Option] = ()) -> argparse.ArgumentParser:
    """The ``train`` options every method has (config, --out, --resume, --max-steps, --seed, --set, --threads),
    with the method's own options after --max-steps, --seed and --threads."""
    p = argparse.ArgumentParser(prog=prog, description=description)

    def add(options: Iterable[Option]) -> None:
        for flags, kwargs in options:
            p.add_argument(*flags, **kwargs)

    p.add_argument("config", help=f"training hparams YAML, e.g. hparams/TRAINING/{alg}/smollm2-135m.yaml")
    p.add_argument("--out", help=out_help)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest.json")
    p.add_argument("--max-steps", type=int, help="override max_steps")
    add(after_max_steps)
    p.add_argument("--seed", type=int, help="override seed")
    add(after_seed)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    add(after_threads)
    return p


def train_cli(argv: Sequence[str] | None, parser: argparse.ArgumentParser,
              load_config: Callable[[str, dict[str, Any]], Any],
              option_overrides: Callable[[argparse.Namespace], Iterable[tuple[str, Any]]],
              start: Callable[[Any, argparse.Namespace], int]) -> int:
    """Parse ``argv``, set the torch threads, collect the overrides (``--set`` items, then the options'
    ``(hparam, value)`` pairs whose value is not None: ``--max-steps``, ``--seed`` and ``option_overrides``), load
    the config and hand it to ``start``; returns a process exit code (2: a malformed ``--set``)."""
    from ..hparams import parse_set_overrides

    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        overrides = parse_set_overrides(args.set)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    for key, value in (("max_steps", args.max_steps), ("seed", args.seed), *option_overrides(args)):
        if value is not None:
            overrides[key] = value
    return start(load_config(args.config, overrides), args)


def run_and_report(trainer: EditorTrainer) -> int:
    """Run ``trainer``; rank 0 prints its summary (with this run's wall time) as one JSON line."""
    t0 = time.time()
    summary = trainer.run()
    summary["wall_s_this_run"] = round(time.time() - t0, 1)
    if trainer.coll.is_main:
        print(json.dumps(summary), flush=True)
    return 0
