"""Load EasyEdit's own hyperparameter classes (FT, LoRA, MEND, ROME, MEMIT, ...) for either EasyEdit generation.

The two generations disagree on a few keys (upstream's ``FTHyperParams`` requires ``objective_optimization``,
which the PyPI wheel rejects as unknown). One YAML per baseline serves both: keys that only one generation knows
are listed here; they are dropped (with a log line) where unknown and filled with the other generation's fixed
behaviour where required. Any other unknown or missing key is an error naming the key and the file.

Methods that only EasyEdit upstream has (AlphaEdit, UltraEdit, EMMET, PMET, EAMET) load when the installed
``easyeditor`` exports their class; otherwise the error says they are not in this EasyEdit generation.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Any

import yaml

from ..hparams import HyperParamsError
from .device import resolve_device
from .preloaded import PreloadedModel
from .upstream_methods import UPSTREAM_METHODS, by_alg_name, hparams_class

LOG = logging.getLogger(__name__)

#: alg_name -> EasyEdit hyperparameter class name (exported by ``easyeditor``)
HPARAMS_CLASSES = {
    "FT": "FTHyperParams",
    "LoRA": "LoRAHyperParams",
    "MEND": "MENDHyperParams",
    "ROME": "ROMEHyperParams",
    "MEMIT": "MEMITHyperParams",
    "KN": "KNHyperParams",
    "SERAC": "SERACHparams",
    "IKE": "IKEHyperParams",
}
# the methods only an EasyEdit source checkout has (AlphaEdit, ULTRAEDIT, EMMET, PMET, EAMET; see .upstream_methods)
HPARAMS_CLASSES.update({m.alg_name: m.class_name for m in UPSTREAM_METHODS.values()})

#: keys that exist in only one generation, with the value that reproduces the other generation's behaviour
GENERATION_SPECIFIC_DEFAULTS: dict[str, dict[str, Any]] = {
    # PyPI 0.0.1.dev0's FT always optimises the prompt's last-token objective ("prompt_last", FT-L)
    "FT": {"objective_optimization": "prompt_last"},
}


def load_easyedit_hparams(path: str | os.PathLike[str], *, model: Any = None, tok: Any = None) -> Any:
    """Build EasyEdit's hyperparameter object for the ``alg_name`` in ``path`` (``.yaml`` appended if missing).

    ``model_name`` is wrapped in :class:`PreloadedModel` (optionally around an already-loaded ``model``/``tok``)
    so that ``BaseEditor`` can load models it has no name-based branch for.
    """
    path = str(path)
    if not path.endswith((".yaml", ".yml")):
        path += ".yaml"
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    alg = config.get("alg_name")
    if alg not in HPARAMS_CLASSES:
        raise HyperParamsError(f"{path}: key 'alg_name' is {alg!r}; supported EasyEdit baselines: {sorted(HPARAMS_CLASSES)}")
    upstream = by_alg_name(alg)
    if upstream is not None:  # NotInThisGeneration (a HyperParamsError) names the file's method and the fix
        try:
            cls = hparams_class(upstream)
        except HyperParamsError as exc:
            raise type(exc)(f"{path}: {exc}") from None
    else:
        cls = getattr(importlib.import_module("easyeditor"), HPARAMS_CLASSES[alg])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    specific = GENERATION_SPECIFIC_DEFAULTS.get(alg, {})
    for key in sorted(set(config) - set(fields)):
        if key not in specific:
            raise HyperParamsError(f"{path}: unknown key {key!r} for EasyEdit's {cls.__name__}")
        LOG.info("%s: %r is not used by this EasyEdit generation; dropped", path, key)
        config.pop(key)
    for key, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if key not in config and required:
            if key not in specific:
                raise HyperParamsError(f"{path}: missing required key {key!r} for EasyEdit's {cls.__name__}")
            config[key] = specific[key]
    for key, value in config.items():  # EasyEdit's own scientific-notation handling (YAML reads 1e-4 as a string)
        if isinstance(value, str):
            try:
                config[key] = float(value)
            except ValueError:
                pass
    config["model_name"] = PreloadedModel(str(config.get("model_name")), model, tok)
    if "device" in config:  # device: 0 without CUDA on upstream EasyEdit -> "cpu" (integration.device)
        config["device"] = resolve_device(config["device"])
    return cls(**config)
