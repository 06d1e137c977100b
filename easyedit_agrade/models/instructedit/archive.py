"""Trained InstructEdit editor archives: save, find (``archive: null``), load, fingerprint-check.

Same layout as AGRADE's archives (one ``.safetensors``: the :class:`EditorNetworks` state dict + JSON metadata with
the model fingerprint of :func:`easyedit_agrade.models.agrade.archive.model_fingerprint`, the shaping hparams and the
training facts), with ``alg_name: InstructEdit``. ``archive: null`` picks the ``archives/*.safetensors`` whose
fingerprint and :attr:`InstructEditHyperParams.ARCHIVE_KEYS` (rank, n_blocks, inner_params, use_instruction) match.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.checkpoint import load_tensors, read_metadata, save_tensors
from ...core.hypernet import EditorNetworks
from ...paths import REPO_ROOT
from ..agrade.archive import model_fingerprint, weights_problem  # generic: architecture + SHA-256 of the weights
from .editor import build_networks
from .instructedit_hparams import InstructEditHyperParams

FORMAT = "easyedit_agrade.instructedit/1"
ARCHIVES_DIR = REPO_ROOT / "archives"
RETRAIN_HINT = ("train one with `easyedit-agrade train --alg InstructEdit hparams/TRAINING/InstructEdit/<model>.yaml "
                "--out runs/instructedit-<model>` and set `archive:` to its best.safetensors")


class ArchiveNotFoundError(FileNotFoundError):
    """No trained InstructEdit archive for this model and hyperparameters."""


class ArchiveMismatchError(ValueError):
    """The archive was trained for another model or with other hyperparameters."""


def archive_hparams(hparams: InstructEditHyperParams) -> dict[str, Any]:
    return {k: getattr(hparams, k) for k in InstructEditHyperParams.ARCHIVE_KEYS}


def save_archive(path: str | os.PathLike[str], nets: EditorNetworks, model: nn.Module,
                 hparams: InstructEditHyperParams, training: dict[str, Any] | None = None) -> None:
    meta = {"format": FORMAT, "alg_name": "InstructEdit", "model_name": str(hparams.model_name),
            "fingerprint": model_fingerprint(model, list(hparams.inner_params)), "hparams": archive_hparams(hparams),
            "networks": nets.config, "training": training or {}}
    tensors = {k: (v.float() if v.is_floating_point() and not k.endswith("count") else v)
               for k, v in nets.state_dict().items()}
    save_tensors(path, tensors, meta)


def _check(meta: dict, model: nn.Module, hparams: InstructEditHyperParams, path: Path) -> list[str]:
    if meta.get("format") != FORMAT or meta.get("alg_name") != "InstructEdit":
        return [f"{path.name} is not an InstructEdit archive (format {meta.get('format')!r})"]
    problems = []
    fp = model_fingerprint(model, list(hparams.inner_params))
    want = meta.get("fingerprint", {})
    if want.get("architecture") != fp["architecture"]:
        problems.append(f"model architecture {fp['architecture']} != archive's {want.get('architecture')} "
                        f"(trained for {meta.get('model_name')!r})")
    elif weights_problem(want, fp, meta.get("model_name")):
        problems.append(weights_problem(want, fp, meta.get("model_name")))
    theirs = meta.get("hparams", {})
    for key, value in archive_hparams(hparams).items():
        if theirs.get(key) != value:
            problems.append(f"hparam {key}={value!r} but the archive was trained with {theirs.get(key)!r}")
    return problems


def find_archive(model: nn.Module, hparams: InstructEditHyperParams, folder: Path | None = None) -> Path:
    if hparams.archive:
        path = Path(hparams.archive).expanduser()
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        if not path.is_file():
            raise ArchiveNotFoundError(f"InstructEdit archive {hparams.archive!r} does not exist; {RETRAIN_HINT}")
        problems = _check(read_metadata(path), model, hparams, path)
        if problems:
            raise ArchiveMismatchError(f"InstructEdit archive {path.name} does not match: " + "; ".join(problems))
        return path
    folder = folder or ARCHIVES_DIR
    reasons = []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            meta = read_metadata(path)
        except Exception as exc:  # unreadable: report, keep looking
            reasons.append(f"{path.name}: unreadable ({exc})")
            continue
        if meta.get("alg_name") != "InstructEdit":
            continue
        problems = _check(meta, model, hparams, path)
        if not problems:
            return path
        reasons.append(f"{path.name}: " + "; ".join(problems))
    detail = (" Checked: " + " | ".join(reasons) + ".") if reasons else " No InstructEdit archive was found."
    raise ArchiveNotFoundError(f"no InstructEdit archive in {folder} matches this model and hparams.{detail} "
                               f"Set `archive:` in the hparams YAML, or {RETRAIN_HINT}")


def load_networks(path: str | os.PathLike[str], model: nn.Module, hparams: InstructEditHyperParams,
                  dtype: torch.dtype = torch.float32) -> EditorNetworks:
    """Build the editor for ``hparams`` and load the archive into it (eval mode, frozen)."""
    tensors, meta = load_tensors(path)
    problems = _check(meta, model, hparams, Path(path))
    if problems:
        raise ArchiveMismatchError(f"InstructEdit archive {Path(path).name} does not match: " + "; ".join(problems))
    nets = build_networks(model, hparams)
    nets.load_state_dict(tensors, strict=True)
    nets.to(dtype=dtype)
    nets.eval()
    for p in nets.parameters():
        p.requires_grad_(False)
    return nets
