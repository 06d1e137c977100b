"""Checkpoint and archive I/O: safetensors for tensors, JSON for everything else, atomic writes.

Every write goes to a temporary file in the destination folder, is flushed and ``fsync``-ed, then renamed over
the destination with ``os.replace`` — a reader never sees a half-written file, and a killed writer leaves the
previous version intact.

* :func:`save_tensors` / :func:`load_tensors` — a flat ``{name: tensor}`` dict plus a JSON-able ``metadata``
  dict (stored as one JSON string in the safetensors header under ``"easyedit_agrade"``).
* :func:`save_json` / :func:`load_json`.
* :func:`optimizer_state_to_tensors` / :func:`optimizer_state_from_tensors` — an ``torch.optim`` state dict split
  into tensors (``opt.<param index>.<key>``) and a JSON part.
* :func:`save_training_checkpoint` / :func:`load_training_checkpoint` — a folder ``step-XXXXXXXX/`` with
  ``model.safetensors``, ``optimizer.safetensors`` and ``state.json``; ``latest.json`` in the parent names the
  newest complete one (written last, so a crash mid-save never points at a partial checkpoint).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

META_KEY = "easyedit_agrade"


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _fsync_replace(tmp: str, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        _fsync_replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any] | None = None) -> None:
    """Save tensors (contiguous CPU copies) + JSON metadata to a ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {META_KEY: json.dumps(dict(metadata or {}), sort_keys=True)}
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=meta)
        _fsync_replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(tensors, metadata)`` of a file written by :func:`save_tensors`."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        raw = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    meta = json.loads(raw[META_KEY]) if META_KEY in raw else {}
    return tensors, meta


def read_metadata(path: str | os.PathLike[str]) -> dict:
    """Only the JSON metadata of a safetensors file (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = f.metadata() or {}
    return json.loads(raw[META_KEY]) if META_KEY in raw else {}


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
    root.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        save_tensors(tmpdir / "model.safetensors", model_state, model_metadata)
        if optimizer_state is not None:
            t, m = optimizer_state_to_tensors(optimizer_state)
            save_tensors(tmpdir / "optimizer.safetensors", t, m)
        save_json(tmpdir / "state.json", dict(state, step=int(step)))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmpdir, final)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    save_json(root / "latest.json", {"checkpoint": name, "step": int(step)})
    if keep > 0:
        older = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
        protected = {str(state.get("best_checkpoint", ""))}
        for p in older[: max(0, len(older) - (keep - 1))]:
            if p.name not in protected:
                shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The folder named by ``root/latest.json`` (None when there is none)."""
    marker = Path(root) / "latest.json"
    if not marker.is_file():
        return None
    path = Path(root) / load_json(marker)["checkpoint"]
    return path if path.is_dir() else None


def load_training_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict, dict | None, dict]:
    """Return ``(model_state, model_metadata, optimizer_state or None, state)`` of a checkpoint folder."""
    path = Path(path)
    model_state, model_meta = load_tensors(path / "model.safetensors")
    opt = None
    if (path / "optimizer.safetensors").is_file():
        t, m = load_tensors(path / "optimizer.safetensors")
        opt = optimizer_state_from_tensors(t, m)
    return model_state, model_meta, opt, load_json(path / "state.json")
