"""Re-save archives with the tensor digest (SHA-256, ``easyedit_agrade.sha256``) in their header and the edited
weights' dtype in their fingerprint; the tensors are left bit-identical (checked before the file is replaced).

    python scripts/add_archive_digests.py archives/*.safetensors
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from easyedit_agrade.core.checkpoint import file_digest, load_tensors, save_tensors, tensor_digest


def add_digest(path: Path) -> str:
    tensors, meta = load_tensors(path)  # finiteness (and the digest, if there is one) checked here
    before = tensor_digest(tensors)
    fingerprint = meta.get("fingerprint")
    if isinstance(fingerprint, dict):
        fingerprint.setdefault("dtype", "float32")  # the trainers fingerprint the float32 model
    tmp = path.with_name(path.name + ".new")
    save_tensors(tmp, tensors, meta)
    back, back_meta = load_tensors(tmp)
    same = set(back) == set(tensors) and all(
        back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]) for k in tensors)
    if not same or back_meta != meta or file_digest(tmp) != before:
        tmp.unlink()
        raise SystemExit(f"{path}: re-saved tensors differ; nothing replaced")
    tmp.replace(path)
    return before


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: sha256 {add_digest(Path(arg))} (tensors unchanged)")
