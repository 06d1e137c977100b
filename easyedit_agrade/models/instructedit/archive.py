"""Trained InstructEdit editor archives: the method's :class:`~easyedit_agrade.core.archive.ArchiveFormat`.

Same layout, fingerprint (:func:`easyedit_agrade.core.archive.model_fingerprint`) and find / check / load logic as
every hypernetwork method's archives (:mod:`easyedit_agrade.core.archive`), with ``alg_name: InstructEdit``.
``archive: null`` picks the ``archives/*.safetensors`` whose fingerprint and
:attr:`InstructEditHyperParams.ARCHIVE_KEYS` (rank, n_blocks, inner_params, use_instruction) match. The state dict
must fit the network exactly (no optional keys).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.archive import ARCHIVES_DIR, ArchiveFormat, model_fingerprint, weights_problem  # noqa: F401
from ...core.hypernet import EditorNetworks
from .editor import build_networks
from .instructedit_hparams import InstructEditHyperParams

FORMAT = "easyedit_agrade.instructedit/1"
RETRAIN_HINT = ("train one with `easyedit-agrade train --alg InstructEdit hparams/TRAINING/InstructEdit/<model>.yaml "
                "--out runs/instructedit-<model>` and set `archive:` to its best.safetensors")


class ArchiveNotFoundError(FileNotFoundError):
    """No trained InstructEdit archive for this model and hyperparameters."""


class ArchiveMismatchError(ValueError):
    """The archive was trained for another model or with other hyperparameters."""


ARCHIVE = ArchiveFormat(format=FORMAT, alg_name="InstructEdit", not_found_error=ArchiveNotFoundError,
                        mismatch_error=ArchiveMismatchError, build=build_networks,
                        retrain_hint=lambda hparams=None: RETRAIN_HINT)


def archive_hparams(hparams: InstructEditHyperParams) -> dict[str, Any]:
    return ARCHIVE.archive_hparams(hparams)


def save_archive(path: str | os.PathLike[str], nets: EditorNetworks, model: nn.Module,
                 hparams: InstructEditHyperParams, training: dict[str, Any] | None = None) -> None:
    ARCHIVE.save(path, nets, model, hparams, training)


def find_archive(model: nn.Module, hparams: InstructEditHyperParams, folder: Path | None = None) -> Path:
    """The archive to use: ``hparams.archive`` if set (checked), else the matching one in ``archives/``."""
    return ARCHIVE.find(model, hparams, folder)


def load_networks(path: str | os.PathLike[str], model: nn.Module, hparams: InstructEditHyperParams,
                  dtype: torch.dtype = torch.float32) -> EditorNetworks:
    """Build the editor for ``hparams`` and load the archive into it (eval mode, frozen)."""
    return ARCHIVE.load(path, model, hparams, dtype)
