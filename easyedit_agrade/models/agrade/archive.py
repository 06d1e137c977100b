"""Trained AGRADE hypernetwork archives: build, save, find, load and fingerprint-check.

An archive is one ``.safetensors`` file: the :class:`~easyedit_agrade.core.hypernet.EditorNetworks` state dict,
with JSON metadata (``format``, ``alg_name``, the model fingerprint — architecture plus a SHA-256 of the edited
weights — the hyperparameters that shape or change the network, the module list, and training facts).

``archive: null`` in the editing YAML means "the shipped archive": every ``archives/*.safetensors`` under the
repository root is checked and the one whose model fingerprint and hyperparameters match is used. A mismatch is an
:class:`ArchiveMismatchError` that says what differs and how to retrain.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.checkpoint import load_tensors, read_metadata, save_tensors
from ...core.hypernet import EditorNetworks
from ...core.weights import get_module, module_name_of_param, io_sizes
from ...paths import REPO_ROOT
from .agrade_hparams import AGRADEHyperParams

FORMAT = "easyedit_agrade.agrade/1"
ARCHIVES_DIR = REPO_ROOT / "archives"
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


def model_fingerprint(model: nn.Module, inner_params: list[str]) -> dict[str, str]:
    """``{"architecture": …, "weights": …, "dtype": …}``: the architecture fingerprint of
    :func:`easyedit_agrade.lm.model_fingerprint`, a SHA-256 (first 16 hex digits) of the edited weights' bytes
    (cast to fp32) and the edited weights' dtype (``"float32"``, ``"bfloat16"``, …)."""
    from ...lm import model_fingerprint as arch_fp

    h = hashlib.sha256()
    dtype = None
    for p in inner_params:
        weight = get_module(model, module_name_of_param(p)).weight
        dtype = dtype or str(weight.dtype).replace("torch.", "")
        w = weight.detach().to("cpu", torch.float32).contiguous()
        h.update(p.encode())
        h.update(w.numpy().tobytes())
    return {"architecture": arch_fp(model), "weights": h.hexdigest()[:16], "dtype": dtype or "float32"}


def weights_problem(want: dict, fp: dict, trained_for: Any) -> str | None:
    """Why the edited weights' fingerprint ``fp`` does not match the archive's ``want`` (None when it does).
    Archives written before the dtype was recorded were fingerprinted on float32 weights (the trainers' dtype)."""
    if want.get("weights") == fp["weights"]:
        return None
    theirs = want.get("dtype", "float32")
    if fp.get("dtype") != theirs:
        return (f"dtype differs: the model's edited weights are {fp.get('dtype')}, the archive was fingerprinted on "
                f"{theirs} weights of {trained_for!r} (its weights' fingerprint {want.get('weights')} is that of the "
                f"{theirs} model; load the model in {theirs} to use this archive, or train one on the {fp.get('dtype')} "
                f"model)")
    return (f"edited weights' fingerprint {fp['weights']} != archive's {want.get('weights')} (same architecture, "
            f"different weights than {trained_for!r})")


def archive_hparams(hparams: AGRADEHyperParams) -> dict[str, Any]:
    return {k: getattr(hparams, k) for k in AGRADEHyperParams.ARCHIVE_KEYS}


def build_networks(model: nn.Module, hparams: AGRADEHyperParams, seed: int = 0) -> EditorNetworks:
    """A fresh (untrained) network for ``hparams.inner_params`` of ``model`` (layer order)."""
    from ...core.cache import LayerStack

    stack = LayerStack(model, list(hparams.inner_params))
    nets = EditorNetworks(stack.sizes(), rank=hparams.rank, n_blocks=hparams.n_blocks, lr_init=hparams.eta_init,
                          log_lambda_init=hparams.log_lambda_init,
                          log_mu_init=hparams.log_mu_init if getattr(hparams, "use_preserved_cov", False) else None,
                          seed=seed)
    return nets


def save_archive(path: str | os.PathLike[str], nets: EditorNetworks, model: nn.Module, hparams: AGRADEHyperParams,
                 training: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> None:
    meta = {
        "format": FORMAT,
        "alg_name": "AGRADE",
        "model_name": str(hparams.model_name),
        "fingerprint": model_fingerprint(model, list(hparams.inner_params)),
        "hparams": archive_hparams(hparams),
        "networks": nets.config,
        "training": training or {},
    }
    tensors = {k: (v.to(dtype) if v.is_floating_point() and k.split(".")[-1] != "count" else v)
               for k, v in nets.state_dict().items()}
    save_tensors(path, tensors, meta)


def _check(meta: dict, model: nn.Module, hparams: AGRADEHyperParams, path: Path) -> list[str]:
    problems = []
    if meta.get("format") != FORMAT or meta.get("alg_name") != "AGRADE":
        return [f"{path.name} is not an AGRADE archive (format {meta.get('format')!r})"]
    fp = model_fingerprint(model, list(hparams.inner_params))
    want = meta.get("fingerprint", {})
    if want.get("architecture") != fp["architecture"]:
        problems.append(f"model architecture fingerprint {fp['architecture']} != archive's {want.get('architecture')} "
                        f"(trained for {meta.get('model_name')!r})")
    elif weights_problem(want, fp, meta.get("model_name")):
        problems.append(weights_problem(want, fp, meta.get("model_name")))
    mine = archive_hparams(hparams)
    theirs = meta.get("hparams", {})
    for key, value in mine.items():
        if theirs.get(key) != value:
            problems.append(f"hparam {key}={value!r} but the archive was trained with {theirs.get(key)!r}")
    return problems


def find_archive(model: nn.Module, hparams: AGRADEHyperParams, folder: Path | None = None) -> Path:
    """The archive to use: ``hparams.archive`` if set (checked), else the matching one in ``archives/``."""
    if hparams.archive:
        path = Path(hparams.archive).expanduser()
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        if not path.is_file():
            raise ArchiveNotFoundError(f"AGRADE archive {hparams.archive!r} does not exist; "
                                       f"{retrain_hint(hparams)}")
        problems = _check(read_metadata(path), model, hparams, path)
        if problems:
            raise ArchiveMismatchError(f"AGRADE archive {path.name} does not match: " + "; ".join(problems)
                                       + f". Either fix the hparams or {retrain_hint(hparams)}")
        return path
    folder = folder or ARCHIVES_DIR
    candidates = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    reasons = []
    matches: list[Path] = []
    for path in candidates:
        try:
            meta = read_metadata(path)
        except Exception as exc:  # unreadable file: report, keep looking
            reasons.append(f"{path.name}: unreadable ({exc})")
            continue
        if meta.get("alg_name") != "AGRADE":
            continue
        problems = _check(meta, model, hparams, path)
        if not problems:
            matches.append(path)
        else:
            reasons.append(f"{path.name}: " + "; ".join(problems))
    if matches:
        # an archive trained with the preserved-knowledge term (it holds log μ) is preferred when the term is on,
        # one trained without it when it is off; otherwise the first match by name
        want = bool(getattr(hparams, "use_preserved_cov", False))
        return next((p for p in matches if has_preserved_term(p) == want), matches[0])
    detail = (" Candidates checked: " + " | ".join(reasons) + ".") if reasons else " No AGRADE archive was found."
    raise ArchiveNotFoundError(f"no trained AGRADE archive in {folder} matches this model and hparams "
                               f"(model {str(hparams.model_name)!r}, inner_params {list(hparams.inner_params)}).{detail} "
                               f"Set `archive:` in the hparams YAML, or {retrain_hint(hparams)}")


def has_preserved_term(path: str | os.PathLike[str]) -> bool:
    """Whether an archive was trained with the preserved-knowledge term (its state dict holds log μ)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("log_mu_params.") for k in f.keys())


def load_networks(path: str | os.PathLike[str], model: nn.Module, hparams: AGRADEHyperParams,
                  dtype: torch.dtype = torch.float32) -> EditorNetworks:
    """Build the network for ``hparams`` and load the archive's weights into it (eval mode, frozen)."""
    tensors, meta = load_tensors(path)
    problems = _check(meta, model, hparams, Path(path))
    if problems:
        raise ArchiveMismatchError(f"AGRADE archive {Path(path).name} does not match: " + "; ".join(problems)
                                   + f". {retrain_hint(hparams)}")
    nets = build_networks(model, hparams)
    # log μ (preserved-knowledge term) is optional on both sides: an archive trained without the term is used
    # with μ = log_mu_init; one trained with it, edited without the term, simply ignores its μ
    missing, unexpected = nets.load_state_dict(tensors, strict=False)
    wrong = [k for k in [*missing, *unexpected] if not k.startswith("log_mu_params.")]
    if wrong:
        raise ArchiveMismatchError(f"AGRADE archive {Path(path).name} does not fit the network built from the hparams "
                                   f"(missing {list(missing)}, unexpected {list(unexpected)}). {retrain_hint(hparams)}")
    nets.to(dtype=dtype)
    nets.eval()
    for p in nets.parameters():
        p.requires_grad_(False)
    return nets


def io_sizes_of(model: nn.Module, param: str) -> tuple[int, int]:
    return io_sizes(get_module(model, module_name_of_param(param)))


def export_archive(src: str | os.PathLike[str], dst: str | os.PathLike[str], extra: dict[str, Any] | None = None,
                   dtype: torch.dtype | None = None) -> dict:
    """Copy a trained archive (e.g. ``<out>/best.safetensors``) to ``dst`` (atomically), merging ``extra`` into its
    ``training`` metadata (reproduce command, wall time, …); ``dtype`` optionally casts floating tensors (the
    normaliser's ``count`` stays fp64). Returns the new metadata."""
    tensors, meta = load_tensors(src)
    if meta.get("format") != FORMAT:
        raise ArchiveMismatchError(f"{src} is not an AGRADE archive")
    meta.setdefault("training", {}).update(extra or {})
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("count") else v)
                   for k, v in tensors.items()}
    save_tensors(dst, tensors, meta)
    return meta
