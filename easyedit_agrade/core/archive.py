"""Trained editor archives, for every hypernetwork method: fingerprint, save, check, find, load.

An archive is one ``.safetensors`` file (written by :func:`~easyedit_agrade.core.checkpoint.save_tensors`, so its
header also holds a SHA-256 of the tensors, checked on every load): the
:class:`~easyedit_agrade.core.hypernet.EditorNetworks` state dict, with JSON metadata ``format``, ``alg_name``,
``model_name``, ``fingerprint`` (:func:`model_fingerprint`: architecture, a SHA-256 of the edited weights, their
dtype), ``hparams`` (the method's ``ARCHIVE_KEYS``), ``networks`` (the network config) and ``training``.

A method describes its archives once with an :class:`ArchiveFormat` (format string, ``alg_name``, error classes,
how to retrain, which state-dict keys are optional) and gets ``save`` / ``check`` / ``find`` / ``load`` from it.
``archive: null`` in the editing YAML means "the shipped archive": every ``archives/*.safetensors`` is checked and
a matching one is used; a mismatch names what differs and how to retrain.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..paths import REPO_ROOT
from .checkpoint import load_tensors, read_metadata, save_tensors
from .hypernet import EditorNetworks
from .weights import get_module, module_name_of_param

#: where the shipped archives live
ARCHIVES_DIR = REPO_ROOT / "archives"


def model_fingerprint(model: nn.Module, inner_params: list[str]) -> dict[str, str]:
    """``{"architecture": …, "weights": …, "dtype": …}``: the architecture fingerprint of
    :func:`easyedit_agrade.lm.model_fingerprint`, a SHA-256 (first 16 hex digits) of the edited weights' bytes
    (cast to fp32) and the edited weights' dtype (``"float32"``, ``"bfloat16"``, …)."""
    from ..lm import model_fingerprint as arch_fp

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


def cast_floating(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype``; the normaliser's sample ``count`` keeps its dtype (fp64)."""
    return {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("count") else v) for k, v in tensors.items()}


#: ARCHIVE_KEYS added after archives were shipped → the value an archive without the key was trained with
ARCHIVE_KEY_DEFAULTS: dict[str, Any] = {"key_positions": "target"}


@dataclass(frozen=True)
class ArchiveFormat:
    """How one method's archives are named, checked and rebuilt.

    ``build(model, hparams)`` makes a fresh network for the hparams (the loader fills it); ``retrain_hint(hparams)``
    says how to train a matching archive (hparams may be None); ``optional_keys`` are state-dict key prefixes
    either side may lack (e.g. a term an older archive was trained without); ``prefer(matches, hparams)`` picks
    among several matching shipped archives (default: the first by name)."""

    format: str
    alg_name: str
    not_found_error: type[Exception]
    mismatch_error: type[Exception]
    build: Callable[[nn.Module, Any], EditorNetworks]
    retrain_hint: Callable[[Any], str]
    optional_keys: tuple[str, ...] = ()
    prefer: Callable[[Sequence[Path], Any], Path] | None = None

    # -- metadata ------------------------------------------------------------------------------------------------

    def archive_hparams(self, hparams) -> dict[str, Any]:
        """The hparams an archive records and is checked against (the class's ``ARCHIVE_KEYS``)."""
        return {k: getattr(hparams, k) for k in type(hparams).ARCHIVE_KEYS}

    def metadata(self, nets: EditorNetworks, model: nn.Module, hparams, training: dict[str, Any] | None) -> dict:
        return {"format": self.format, "alg_name": self.alg_name, "model_name": str(hparams.model_name),
                "fingerprint": model_fingerprint(model, list(hparams.inner_params)),
                "hparams": self.archive_hparams(hparams), "networks": nets.config, "training": training or {}}

    def save(self, path: str | os.PathLike[str], nets: EditorNetworks, model: nn.Module, hparams,
             training: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> None:
        """Write ``nets`` (floating tensors in ``dtype``) with the metadata for ``model`` and ``hparams``."""
        save_tensors(path, cast_floating(nets.state_dict(), dtype), self.metadata(nets, model, hparams, training))

    # -- checks --------------------------------------------------------------------------------------------------

    def problems(self, meta: dict, model: nn.Module, hparams, path: Path) -> list[str]:
        """Why the archive with metadata ``meta`` does not fit ``model`` and ``hparams`` (empty when it does)."""
        if meta.get("format") != self.format or meta.get("alg_name") != self.alg_name:
            return [f"{path.name} is not an {self.alg_name} archive (format {meta.get('format')!r})"]
        problems = []
        fp = model_fingerprint(model, list(hparams.inner_params))
        want = meta.get("fingerprint", {})
        if want.get("architecture") != fp["architecture"]:
            problems.append(f"model architecture fingerprint {fp['architecture']} != archive's "
                            f"{want.get('architecture')} (trained for {meta.get('model_name')!r})")
        elif weights_problem(want, fp, meta.get("model_name")):
            problems.append(weights_problem(want, fp, meta.get("model_name")))
        theirs = meta.get("hparams", {})
        for key, value in self.archive_hparams(hparams).items():
            # a key added after an archive was written: that archive was trained with the key's old behaviour
            if theirs.get(key, ARCHIVE_KEY_DEFAULTS.get(key)) != value:
                problems.append(f"hparam {key}={value!r} but the archive was trained with {theirs.get(key)!r}")
        return problems

    def _mismatch(self, path: Path, problems: list[str], hparams, how: str) -> Exception:
        return self.mismatch_error(f"{self.alg_name} archive {path.name} does not match: " + "; ".join(problems)
                                   + how.format(hint=self.retrain_hint(hparams)))

    # -- find / load ---------------------------------------------------------------------------------------------

    def find(self, model: nn.Module, hparams, folder: Path | None = None) -> Path:
        """The archive to use: ``hparams.archive`` if set (checked), else the matching one in ``folder``
        (default ``archives/``)."""
        if hparams.archive:
            path = Path(hparams.archive).expanduser()
            if not path.is_absolute() and not path.exists():
                path = REPO_ROOT / path
            if not path.is_file():
                raise self.not_found_error(f"{self.alg_name} archive {hparams.archive!r} does not exist; "
                                           f"{self.retrain_hint(hparams)}")
            problems = self.problems(read_metadata(path), model, hparams, path)
            if problems:
                raise self._mismatch(path, problems, hparams, ". Either fix the hparams or {hint}")
            return path
        folder = folder or ARCHIVES_DIR
        reasons: list[str] = []
        matches: list[Path] = []
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                meta = read_metadata(path)
            except Exception as exc:  # unreadable file: report, keep looking
                reasons.append(f"{path.name}: unreadable ({exc})")
                continue
            if meta.get("alg_name") != self.alg_name:
                continue
            problems = self.problems(meta, model, hparams, path)
            if not problems:
                matches.append(path)
            else:
                reasons.append(f"{path.name}: " + "; ".join(problems))
        if matches:
            return self.prefer(matches, hparams) if self.prefer is not None else matches[0]
        detail = (" Candidates checked: " + " | ".join(reasons) + ".") if reasons else \
            f" No {self.alg_name} archive was found."
        raise self.not_found_error(f"no trained {self.alg_name} archive in {folder} matches this model and hparams "
                                   f"(model {str(hparams.model_name)!r}, inner_params {list(hparams.inner_params)})."
                                   f"{detail} Set `archive:` in the hparams YAML, or {self.retrain_hint(hparams)}")

    def load(self, path: str | os.PathLike[str], model: nn.Module, hparams,
             dtype: torch.dtype = torch.float32) -> EditorNetworks:
        """Build the network for ``hparams`` and load the archive into it (checked; eval mode, frozen)."""
        tensors, meta = load_tensors(path)
        problems = self.problems(meta, model, hparams, Path(path))
        if problems:
            raise self._mismatch(Path(path), problems, hparams, ". {hint}")
        nets = self.build(model, hparams)
        missing, unexpected = nets.load_state_dict(tensors, strict=not self.optional_keys)
        wrong = [k for k in [*missing, *unexpected] if not k.startswith(self.optional_keys)]
        if wrong:
            raise self.mismatch_error(f"{self.alg_name} archive {Path(path).name} does not fit the network built "
                                      f"from the hparams (missing {list(missing)}, unexpected {list(unexpected)}). "
                                      f"{self.retrain_hint(hparams)}")
        nets.to(dtype=dtype)
        nets.eval()
        for p in nets.parameters():
            p.requires_grad_(False)
        return nets

    def export(self, src: str | os.PathLike[str], dst: str | os.PathLike[str], extra: dict[str, Any] | None = None,
               dtype: torch.dtype | None = None) -> dict:
        """Copy a trained archive (e.g. ``<out>/best.safetensors``) to ``dst`` (atomically), merging ``extra`` into
        its ``training`` metadata; ``dtype`` optionally casts floating tensors (``count`` stays fp64). Returns the
        new metadata."""
        tensors, meta = load_tensors(src)
        if meta.get("format") != self.format:
            raise self.mismatch_error(f"{src} is not an {self.alg_name} archive")
        meta.setdefault("training", {}).update(extra or {})
        if dtype is not None:
            tensors = cast_floating(tensors, dtype)
        save_tensors(dst, tensors, meta)
        return meta
