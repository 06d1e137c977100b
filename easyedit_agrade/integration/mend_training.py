"""Train EasyEdit's MEND hypernetwork for the embedded model with EasyEdit's own trainer, on the CPU.

``python -m easyedit_agrade.integration.mend_training hparams/TRAINING/MEND/smollm2-135m.yaml --max-steps N
--out runs/mend-smollm2`` builds EasyEdit's ``MENDTrainingHparams`` from the YAML, its ``ZsreDataset`` from the
shared zsRE training file (records ``train_range`` for training, ``val_range`` for validation: this project's
validation split, never test records), runs ``EditTrainer`` (which validates every ``val_interval`` steps, keeps
the checkpoint that is best on validation ``early_stop_key`` and evaluates it on the whole validation split), and
exports that best checkpoint as a safetensors archive EasyEdit's MEND executor loads (:mod:`.mend_compat`).

Keys of the YAML that are not ``MENDTrainingHparams`` fields (:data:`DATA_KEYS`) say where the data comes from.
``model_name``/``tokenizer_name`` may be the embedded alias; they are resolved to the converted model directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..hparams import scientific_floats

LOG = logging.getLogger(__name__)

#: YAML keys read here (not by EasyEdit): the zsRE file (relative to the shared data dir) and record ranges
DATA_KEYS = ("train_data", "train_range", "val_range")
#: keys EasyEdit's ``ZsreDataset`` reads from the hparams object but ``MENDTrainingHparams`` has no field for
ATTRIBUTE_KEYS = ("max_length",)
ARCHIVE_NAME = "mend-archive.safetensors"


def read_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(easyedit_config, data_config)`` from a training YAML (EasyEdit's scientific-notation strings as floats)."""
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    data = {k: config.pop(k) for k in DATA_KEYS if k in config}
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing data keys {missing}")
    return scientific_floats(config), data


def build_training_hparams(config: dict[str, Any], *, results_dir: Path, max_steps: int | None = None) -> Any:
    """EasyEdit's ``MENDTrainingHparams`` from ``config``: model/tokenizer resolved to local directories (the
    model name tagged with its architecture for MEND's dispatch), ``device`` as EasyEdit's ``cuda:N`` string
    (run it inside ``cuda_on_cpu``), ``results_dir`` under the run directory."""
    from easyeditor import MENDTrainingHparams
    from transformers import AutoConfig

    from ..lm import resolve_model_path
    from .mend_compat import mend_dispatch_name

    config = dict(config)
    model_dir = resolve_model_path(config["model_name"])
    config["model_name"] = mend_dispatch_name(str(model_dir), AutoConfig.from_pretrained(str(model_dir)))
    config["tokenizer_name"] = str(resolve_model_path(config.get("tokenizer_name") or config["model_name"]))
    device = config.get("device", 0)
    # ZsreDataset moves batches with ``.to(config.device)``: an int would mean CUDA device N and escape cuda_on_cpu
    config["device"] = f"cuda:{device}" if isinstance(device, int) else str(device)
    config["results_dir"] = str(results_dir)
    if max_steps is not None:
        config["max_iters"] = int(max_steps)
    attributes = {k: config.pop(k) for k in ATTRIBUTE_KEYS if k in config}
    fields = {f.name for f in dataclasses.fields(MENDTrainingHparams)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown keys for EasyEdit's MENDTrainingHparams: {unknown}")
    hparams = MENDTrainingHparams(**config)
    for key, value in attributes.items():
        setattr(hparams, key, value)
    return hparams


def write_splits(data: dict[str, Any], out_dir: Path, *, seed: int) -> dict[str, Any]:
    """Write the training records (``train_range``, in a seeded order) and the validation records (``val_range``)
    of the shared zsRE file as JSON files ``ZsreDataset`` reads; returns their paths and record indices."""
    from ..paths import data_file

    source = data_file(str(data["train_data"]))
    with open(source, encoding="utf-8") as f:
        raw = json.load(f)
    t0, t1 = (int(x) for x in data["train_range"])
    v0, v1 = (int(x) for x in data["val_range"])
    if not (0 <= t0 < t1 <= len(raw) and 0 <= v0 < v1 <= len(raw)) or max(t0, v0) < min(t1, v1):
        raise ValueError(f"train_range {data['train_range']} and val_range {data['val_range']} must be disjoint "
                         f"ranges inside {source.name} ({len(raw)} records)")
    order = list(range(t0, t1))
    random.Random(seed).shuffle(order)  # ZsreDataset's ``size`` takes a prefix: a seeded sample of the range
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out_dir / "train.json", out_dir / "val.json"
    train_path.write_text(json.dumps([raw[i] for i in order]), encoding="utf-8")
    val_path.write_text(json.dumps(raw[v0:v1]), encoding="utf-8")
    return {"source": str(data["train_data"]), "train_path": train_path, "val_path": val_path,
            "train_order": order, "val_range": [v0, v1]}


def iterations_for(steps: int, n_train: int, batch_size: int) -> tuple[int, int]:
    """``(train_records, max_iters)`` that make EasyEdit's ``BaseTrainer.run`` take exactly ``steps`` steps.

    Its loop runs ``round(max_iters / (len(train_set) / batch_size))`` epochs and stops *at* ``max_iters``
    (so ``max_iters - 1`` steps). Within one epoch we train on ``steps * batch_size`` records with
    ``max_iters = steps + 1``; beyond one epoch ``steps`` must be a whole number of epochs of the full range."""
    if steps < 1:
        raise ValueError("max steps must be >= 1")
    per_epoch = math.ceil(n_train / batch_size)
    if steps <= per_epoch:
        return min(n_train, steps * batch_size), steps + 1
    if steps % per_epoch:
        raise ValueError(f"{steps} steps is more than one epoch ({per_epoch} steps of batch {batch_size}) and not "
                         "a whole number of epochs; EasyEdit's trainer rounds to whole epochs")
    return n_train, steps + 1


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_mend(recipe: str | Path, out_dir: str | Path, *, max_steps: int, threads: int | None = None,
               val_steps: int | None = None, val_records: int | None = None,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run EasyEdit's ``EditTrainer`` on the recipe; return a report (paths, steps, validation metrics).

    The archive (``out_dir/mend-archive.safetensors``) is the checkpoint EasyEdit's trainer kept as best on the
    validation split; ``out_dir/results.json`` is EasyEdit's final evaluation of it on that split. ``overrides``
    replace recipe keys (e.g. ``val_interval`` for a smoke run)."""
    import torch
    from easyeditor import EditTrainer, ZsreDataset

    from .cpu_compat import cuda_on_cpu
    from .mend_compat import allow_model_config, module_list_full_slices, save_mend_archive

    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir)
    config, data = read_recipe(recipe)
    config.update(overrides or {})
    seed = int(config.get("seed", 0))
    _seed_everything(seed)
    splits = write_splits(data, out_dir / "data", seed=seed)
    hparams = build_training_hparams(config, results_dir=out_dir, max_steps=max_steps)
    if val_steps is not None:
        hparams.val_steps = int(val_steps)
    n_in_range = len(splits["train_order"])
    n_train, max_iters = iterations_for(max_steps, n_in_range, int(hparams.batch_size))
    hparams.max_iters = max_iters
    if int(hparams.val_interval) > max_steps:
        raise ValueError(f"val_interval {hparams.val_interval} > max steps {max_steps}: EasyEdit's trainer would "
                         "never validate, so never save a checkpoint")
    started = time.time()
    with cuda_on_cpu():
        train_set = ZsreDataset(str(splits["train_path"]), size=n_train, config=hparams)
        val_set = ZsreDataset(str(splits["val_path"]), size=val_records, config=hparams)
        trainer = EditTrainer(config=hparams, train_set=train_set, val_set=val_set)
        model_config = trainer.model.model.config
        # BaseTrainer re-loads its own best checkpoint with torch.load; MEND runs the model through ``higher``
        with allow_model_config(model_config), module_list_full_slices():
            trainer.run()
            checkpoint = torch.load(trainer.save_path, map_location="cpu")
    elapsed = time.time() - started
    results_path = out_dir / "results.json"
    final = json.loads(results_path.read_text(encoding="utf-8"))["results"] if results_path.exists() else {}
    metadata = {
        "method": "MEND (EasyEdit EditTrainer, easyeditor 0.0.1.dev0)",
        "model": str(config["model_name"]),
        "data": splits["source"],
        "train_records": f"{n_train} of records {data['train_range'][0]}:{data['train_range'][1]} (seeded order)",
        "val_records": f"{len(val_set)} of records {splits['val_range'][0]}:{splits['val_range'][1]}",
        "steps": int(max_steps),
        "best_step": int(checkpoint.get("step", -1)),
        "batch_size": int(hparams.batch_size),
        "accumulate_bs": int(hparams.accumulate_bs),
        "seed": seed,
        "selection": f"best validation {hparams.early_stop_key} (EasyEdit's EarlyStopper)",
        "best_val_stats": {k: float(v) for k, v in (checkpoint.get("val_stats") or {}).items()},
        "final_val_stats": {k: float(v) for k, v in final.items()},
    }
    archive = save_mend_archive(checkpoint["model"], out_dir / ARCHIVE_NAME,
                                inner_params=list(hparams.inner_params), metadata=metadata)
    report = {"archive": str(archive), "checkpoint": str(trainer.save_path), "results": str(results_path),
              "elapsed_s": round(elapsed, 1), "max_iters": max_iters, **metadata}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    return report


def export_checkpoint(checkpoint: str | Path, recipe: str | Path, out: str | Path) -> dict[str, Any]:
    """Export a checkpoint EasyEdit's trainer saved (``<run>/models/MEND/<model>``, its best on validation so far)
    as a safetensors archive, e.g. of a run that was stopped before its end. The pickle is read with
    ``torch.load``'s weights-only unpickler, only the model's config class allowed."""
    import torch
    from transformers import AutoConfig

    from ..lm import resolve_model_path
    from .mend_compat import allow_model_config, save_mend_archive

    config, data = read_recipe(recipe)
    model_config = AutoConfig.from_pretrained(str(resolve_model_path(config["model_name"])))
    with allow_model_config(model_config):
        state = torch.load(str(checkpoint), map_location="cpu")
    metadata = {
        "method": "MEND (EasyEdit EditTrainer, easyeditor 0.0.1.dev0)",
        "model": str(config["model_name"]),
        "data": str(data["train_data"]),
        "train_range": list(data["train_range"]),
        "val_range": list(data["val_range"]),
        "best_step": int(state.get("step", -1)),
        "batch_size": int(config["batch_size"]),
        "accumulate_bs": int(config["accumulate_bs"]),
        "seed": int(config.get("seed", 0)),
        "selection": f"best validation {config['early_stop_key']} so far (EasyEdit's EarlyStopper)",
        "best_val_stats": {k: float(v) for k, v in (state.get("val_stats") or {}).items()},
        "exported_from": Path(checkpoint).name,
    }
    archive = save_mend_archive(state["model"], out, inner_params=list(config["inner_params"]), metadata=metadata)
    return {"archive": str(archive), **metadata}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easyedit_agrade.integration.mend_training",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="training YAML, e.g. hparams/TRAINING/MEND/smollm2-135m.yaml")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps (batches of batch_size edits); required unless --export")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, splits, results, archive); "
                        "with --export: the archive file to write")
    parser.add_argument("--export", default=None, metavar="CHECKPOINT",
                        help="only export this EasyEdit checkpoint (<run>/models/MEND/<model>) as safetensors")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--val-steps", type=int, default=None, help="override val_steps (batches per validation)")
    parser.add_argument("--val-records", type=int, default=None,
                        help="use only the first N validation records (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.export:
        print(json.dumps(export_checkpoint(args.export, args.recipe, args.out), indent=2, sort_keys=True))
        return 0
    if args.max_steps is None:
        parser.error("--max-steps is required (unless --export)")
    report = train_mend(args.recipe, args.out, max_steps=args.max_steps, threads=args.threads,
                        val_steps=args.val_steps, val_records=args.val_records)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
