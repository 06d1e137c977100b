"""Trained AGRADE hypernetwork archives: the method's :class:`~easyedit_agrade.core.archive.ArchiveFormat`.

The file layout, the fingerprint and the find / check / load logic are the shared ones of
:mod:`easyedit_agrade.core.archive`; AGRADE adds how its network is built (η, λ and, with the preserved-knowledge
term, μ per module), the optional ``log_mu_params.*`` keys (an archive trained without the term loads with
μ = ``log_mu_init``; one trained with it, edited without the term, ignores its μ), the preference for an archive
with μ when the term is on, and how to retrain (:func:`retrain_hint`).

``archive: null`` in the editing YAML means "the shipped archive": every ``archives/*.safetensors`` under the
repository root is checked and the one whose model fingerprint and hyperparameters match is used. A mismatch is an
:class:`ArchiveMismatchError` that says what differs and how to retrain.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ...core.archive import ARCHIVES_DIR, ArchiveFormat, model_fingerprint, weights_problem  # noqa: F401
from ...core.hypernet import EditorNetworks
from ...core.weights import get_module, module_name_of_param, io_sizes
from ...paths import REPO_ROOT
from .agrade_hparams import AGRADEHyperParams

FORMAT = "easyedit_agrade.agrade/1"
RETRAIN_HINT = ("train a matching archive with `easyedit-agrade train hparams/TRAINING/AGRADE/<model>.yaml --out "
                "runs/agrade-<model>` and point `archive:` in the editing YAML at its best.safetensors")
TRAINING_HPARAMS_DIR = REPO_ROOT / "hparams" / "TRAINING" / "AGRADE"
_SWITCHES = ("use_adjustment", "use_regularization", "use_weight_projection", "use_gradient_projection")


def _training_config_for(model_name: str) -> Path | None:
    """The shipped training YAML for ``model_name`` (its ``model_name:`` field), if there is one."""
    import yaml

    # the base recipe first (smollm2-135m.yaml before variants such as smollm2-135m-preserved.yaml)
    for path in sorted(TRAINING_HPARAMS_DIR.glob("*.yaml"), key=lambda p: (len(p.name), p.name)):
        try:
            with open(path, encoding="utf-8") as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            continue
        if str(cfg.get("model_name")) == model_name:
            return path
    return None


def retrain_hint(hparams: AGRADEHyperParams | None = None) -> str:
    """How to train an archive that matches ``hparams``: the training YAML for its model when one is shipped, and
    the flags for its preset and switched-off parts (e.g. ``--preset malmen`` for the MALMEN preset)."""
    if hparams is None:
        return RETRAIN_HINT
    found = _training_config_for(str(hparams.model_name))
    config = found.relative_to(REPO_ROOT).as_posix() if found is not None else "hparams/TRAINING/AGRADE/<model>.yaml"
    stem = found.stem if found is not None else "<model>"
    flags = []
    if hparams.preset != "agrade":
        flags.append(f"--preset {hparams.preset}")
    flags += [f"--set {key}=false" for key in _SWITCHES if not getattr(hparams, key)]
    out = f"runs/{hparams.preset}-{stem}"
    command = " ".join(["easyedit-agrade train", config, *flags, "--out", out])
    return (f"train a matching archive with `{command}` and point `archive:` in the editing YAML at "
            f"{out}/best.safetensors")


class ArchiveNotFoundError(FileNotFoundError):
    """No trained hypernetwork archive for this model and hyperparameters."""


class ArchiveMismatchError(ValueError):
    """The archive was trained for another model or with other hyperparameters."""


def archive_hparams(hparams: AGRADEHyperParams) -> dict[str, Any]:
    return ARCHIVE.archive_hparams(hparams)


def build_networks(model: nn.Module, hparams: AGRADEHyperParams, seed: int = 0) -> EditorNetworks:
    """A fresh (untrained) network for ``hparams.inner_params`` of ``model`` (layer order)."""
    from ...core.cache import LayerStack

    stack = LayerStack(model, list(hparams.inner_params))
    nets = EditorNetworks(stack.sizes(), rank=hparams.rank, n_blocks=hparams.n_blocks, lr_init=hparams.eta_init,
                          log_lambda_init=hparams.log_lambda_init,
                          log_mu_init=hparams.log_mu_init if getattr(hparams, "use_preserved_cov", False) else None,
                          seed=seed)
    return nets


def _prefer_preserved_term(matches: Sequence[Path], hparams: AGRADEHyperParams) -> Path:
    """Among matching shipped archives: one trained with the preserved-knowledge term (it holds log μ) when the term
    is on, one trained without it when it is off; otherwise the first by name."""
    want = bool(getattr(hparams, "use_preserved_cov", False))
    return next((p for p in matches if has_preserved_term(p) == want), matches[0])


ARCHIVE = ArchiveFormat(format=FORMAT, alg_name="AGRADE", not_found_error=ArchiveNotFoundError,
                        mismatch_error=ArchiveMismatchError, build=build_networks,
                        retrain_hint=retrain_hint, optional_keys=("log_mu_params.",), prefer=_prefer_preserved_term)


def save_archive(path: str | os.PathLike[str], nets: EditorNetworks, model: nn.Module, hparams: AGRADEHyperParams,
                 training: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> None:
    ARCHIVE.save(path, nets, model, hparams, training, dtype)


def find_archive(model: nn.Module, hparams: AGRADEHyperParams, folder: Path | None = None) -> Path:
    """The archive to use: ``hparams.archive`` if set (checked), else the matching one in ``archives/``."""
    return ARCHIVE.find(model, hparams, folder)


def has_preserved_term(path: str | os.PathLike[str]) -> bool:
    """Whether an archive was trained with the preserved-knowledge term (its state dict holds log μ)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("log_mu_params.") for k in f.keys())


def load_networks(path: str | os.PathLike[str], model: nn.Module, hparams: AGRADEHyperParams,
                  dtype: torch.dtype = torch.float32) -> EditorNetworks:
    """Build the network for ``hparams`` and load the archive's weights into it (eval mode, frozen)."""
    return ARCHIVE.load(path, model, hparams, dtype)


def io_sizes_of(model: nn.Module, param: str) -> tuple[int, int]:
    return io_sizes(get_module(model, module_name_of_param(param)))


def export_archive(src: str | os.PathLike[str], dst: str | os.PathLike[str], extra: dict[str, Any] | None = None,
                   dtype: torch.dtype | None = None) -> dict:
    """Copy a trained archive (e.g. ``<out>/best.safetensors``) to ``dst`` (atomically), merging ``extra`` into its
    ``training`` metadata (reproduce command, wall time, …); ``dtype`` optionally casts floating tensors (the
    normaliser's ``count`` stays fp64). Returns the new metadata."""
    return ARCHIVE.export(src, dst, extra, dtype)
