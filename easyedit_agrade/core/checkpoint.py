"""Checkpoint and archive I/O: safetensors for tensors, JSON for everything else, atomic writes.

Every write goes to a temporary file in the destination folder, is flushed and ``fsync``-ed, then renamed over
the destination with ``os.replace`` — a reader never sees a half-written file, and a killed writer leaves the
previous version intact.

* :func:`save_tensors` / :func:`load_tensors` — a flat ``{name: tensor}`` dict plus a JSON-able ``metadata``
  dict (stored as one JSON string in the safetensors header under ``"easyedit_agrade"``) and a SHA-256 of the
  tensors (:func:`tensor_digest`, under ``"easyedit_agrade.sha256"``). :func:`load_tensors` verifies the digest
  (files written before it existed have none and are accepted), refuses non-finite floating tensors, and names
  the file in every error (:class:`CorruptFileError`).
* :func:`save_json` / :func:`load_json`.
* :func:`optimizer_state_to_tensors` / :func:`optimizer_state_from_tensors` — an ``torch.optim`` state dict split
  into tensors (``opt.<param index>.<key>``) and a JSON part.
* :func:`save_training_checkpoint` / :func:`load_training_checkpoint` — a folder ``step-XXXXXXXX/`` with
  ``model.safetensors``, ``optimizer.safetensors`` and ``state.json``; ``latest.json`` in the parent names the
  newest complete one (written last, so a crash mid-save never points at a partial checkpoint).
  :func:`latest_checkpoint` falls back to the newest *intact* checkpoint (with a warning naming both) when the
  one ``latest.json`` names is damaged, and warns when there is nothing to resume.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import hashlib
import warnings

import torch

from ..atomic import atomic_dir, atomic_path

META_KEY = "easyedit_agrade"
DIGEST_KEY = "easyedit_agrade.sha256"


class CorruptFileError(ValueError):
    """A safetensors file is unreadable, truncated, fails its digest or holds non-finite values (names the file)."""


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the tensors in name order: each name, dtype, shape and the raw bytes (CPU, contiguous).
    Equal for equal tensors whatever the file layout; any changed byte, name, dtype or shape changes it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer, not a copy
    return h.hexdigest()


def save_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def load_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any] | None = None) -> None:
    """Save tensors (contiguous CPU copies) + JSON metadata to a ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {META_KEY: json.dumps(dict(metadata or {}), sort_keys=True), DIGEST_KEY: tensor_digest(flat)}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def _open_error(path, exc: Exception) -> CorruptFileError:
    return CorruptFileError(f"{path}: unreadable safetensors file (truncated or damaged?): "
                            f"{type(exc).__name__}: {exc}")


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(tensors, metadata)`` of a file written by :func:`save_tensors`.

    Raises :class:`CorruptFileError` (naming ``path``) when the file is unreadable or truncated, its tensors do
    not match the stored digest, or a floating tensor holds NaN/inf. Files without a digest (written before it was
    stored) are accepted after the finiteness check."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        meta = json.loads(raw[META_KEY]) if META_KEY in raw else {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise _open_error(path, exc) from exc
    want = raw.get(DIGEST_KEY)
    if want is not None and tensor_digest(tensors) != want:
        raise CorruptFileError(f"{path}: the tensors do not match the SHA-256 stored in the file (damaged or "
                               f"modified after it was written)")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CorruptFileError(f"{path}: non-finite values (NaN/inf) in tensor(s) {bad[:5]}"
                               + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return tensors, meta


def file_digest(path: str | os.PathLike[str]) -> str | None:
    """The tensor digest stored in a file's header (None for files written before digests were stored)."""
    return _read_header(path).get(DIGEST_KEY)


def _read_header(path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise _open_error(path, exc) from exc


def read_metadata(path: str | os.PathLike[str]) -> dict:
    """Only the JSON metadata of a safetensors file (no tensor is read); :class:`CorruptFileError` names the file
    when its header is unreadable."""
    raw = _read_header(path)
    try:
        return json.loads(raw[META_KEY]) if META_KEY in raw else {}
    except ValueError as exc:
        raise CorruptFileError(f"{path}: the metadata is not valid JSON: {exc}") from exc


def check_intact(path: str | os.PathLike[str]) -> None:
    """Cheap structural check of a safetensors file (header readable, file as long as the header says); raises
    :class:`CorruptFileError` naming the file. The digest is checked by :func:`load_tensors`."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError) as exc:
        raise _open_error(path, exc) from exc
    if 8 + n + end != size:
        raise CorruptFileError(f"{path}: truncated or padded: the header describes {8 + n + end} bytes, the file "
                               f"has {size}")


def optimizer_state_to_tensors(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into ``{"opt.<pid>.<key>": tensor}`` and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any] | None,
    state: Mapping[str, Any],
    *,
    model_metadata: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``root/step-XXXXXXXX/`` and then ``root/latest.json``; keep the newest ``keep`` checkpoints."""
    root = Path(root)
    name = f"step-{int(step):08d}"
    final = root / name
    with atomic_dir(final, replace_existing=True) as tmpdir:
        save_tensors(tmpdir / "model.safetensors", model_state, model_metadata)
        if optimizer_state is not None:
            t, m = optimizer_state_to_tensors(optimizer_state)
            save_tensors(tmpdir / "optimizer.safetensors", t, m)
        save_json(tmpdir / "state.json", dict(state, step=int(step)))
    save_json(root / "latest.json", {"checkpoint": name, "step": int(step)})
    if keep > 0:
        older = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
        protected = {str(state.get("best_checkpoint", ""))}
        for p in older[: max(0, len(older) - (keep - 1))]:
            if p.name not in protected:
                shutil.rmtree(p, ignore_errors=True)
    return final


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from (None when it looks intact)."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    try:
        for name in ("model.safetensors", "optimizer.safetensors"):
            if name == "model.safetensors" or (path / name).exists():
                check_intact(path / name)
                load_tensors(path / name)  # digest and finiteness
        int(load_json(path / "state.json")["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from: the folder ``root/latest.json`` names when it is intact; otherwise the newest
    intact ``step-*`` folder, with a warning that names the damaged one and the one used. None (with a warning:
    training starts at step 0) when ``root`` holds no checkpoint; :class:`CorruptFileError` when it holds only
    damaged ones."""
    root = Path(root)
    marker = root / "latest.json"
    named = None
    if marker.is_file():
        try:
            named = root / str(load_json(marker)["checkpoint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"{marker} is unreadable ({exc}); looking for the newest intact checkpoint",
                          RuntimeWarning, stacklevel=2)
    folders = sorted((p for p in root.glob("step-*") if p.is_dir()), key=_step_of, reverse=True)
    candidates = ([named] if named is not None else []) + [p for p in folders if p != named]
    if not candidates:
        warnings.warn(f"nothing to resume: no checkpoint under {root} (no latest.json, no step-* folder); "
                      "training starts at step 0", RuntimeWarning, stacklevel=2)
        return None
    damaged: list[str] = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                warnings.warn(f"checkpoint {'; '.join(damaged)}: resuming from the newest intact checkpoint "
                              f"{path.name} instead", RuntimeWarning, stacklevel=2)
            return path
        damaged.append(f"{path.name} is damaged ({problem})")
    raise CorruptFileError(f"no intact checkpoint under {root} to resume from: " + "; ".join(damaged))


def load_training_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict, dict | None, dict]:
    """Return ``(model_state, model_metadata, optimizer_state or None, state)`` of a checkpoint folder."""
    path = Path(path)
    model_state, model_meta = load_tensors(path / "model.safetensors")
    opt = None
    if (path / "optimizer.safetensors").is_file():
        t, m = load_tensors(path / "optimizer.safetensors")
        opt = optimizer_state_from_tensors(t, m)
    return model_state, model_meta, opt, load_json(path / "state.json")
