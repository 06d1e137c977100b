"""EasyEdit executor for AGRADE: ``apply_agrade_to_model`` (EasyEdit's ``apply_to_model`` contract)."""
from __future__ import annotations

from typing import Any


class ArchiveNotFoundError(FileNotFoundError):
    """No trained hypernetwork archive for this model and hyperparameters."""


def apply_agrade_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                          keep_original_weight=False, **kwargs: Any):
    """Edit ``model`` with AGRADE for ``requests``; returns ``(model, weights_copy)``."""
    if not getattr(hparams, "archive", None):
        raise ArchiveNotFoundError(
            "AGRADE needs a trained hypernetwork archive: no trained hypernetwork archive is configured "
            "(set `archive:` in the hparams YAML, or train one with `easyedit-agrade train --alg AGRADE`)"
        )
    raise NotImplementedError("AGRADE editing is being implemented")
