"""Typed, validated hyperparameter dataclasses that behave like EasyEdit's ``HyperParams``.

``SomeHyperParams.from_hparams("hparams/AGRADE/smollm2-135m")`` appends ``.yaml`` like EasyEdit, then checks the
file against the dataclass: an unknown key, a missing required key, a value of the wrong type or the wrong
``alg_name`` raises :class:`HyperParamsError` naming the key and the file. Floats written in scientific
notation (``1e-4``, which YAML 1.1 reads as a string) are converted, as EasyEdit does.

When EasyEdit is importable the base class is EasyEdit's own ``HyperParams`` (so ``isinstance`` checks in
EasyEdit code hold); otherwise a small stand-in with the same methods is used.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

# EasyEdit's side lives in the integration layer (DISABLE_EASYEDIT_ENV and easyedit_available re-exported here)
from .integration.easyedit_hparams_base import (  # noqa: F401
    DISABLE_EASYEDIT_ENV,
    easyedit_available,
    easyedit_hyperparams_class,
)


class HyperParamsError(ValueError):
    """A hyperparameter file or value is invalid; the message names the key and the file."""


def check_ranges(hp) -> None:
    """Range checks shared by the editing hparams (AGRADE, InstructEdit); :class:`HyperParamsError` names the key
    (``from_dict``/``from_hparams`` add the file)."""
    import math

    def bad(key, want):
        raise HyperParamsError(f"key {key!r}: must be {want}, got {getattr(hp, key)!r}")

    for key in ("batch_size", "cache_batch_size"):
        if getattr(hp, key) < 1:
            bad(key, "an integer >= 1")
    if hp.max_length < 2:
        bad("max_length", "an integer >= 2 (at least one prompt token and one target token)")
    offset = getattr(hp, "log_lambda_offset", 0.0)
    if not (math.isfinite(float(offset)) and -20.0 <= float(offset) <= 20.0):
        bad("log_lambda_offset", "a finite number in [-20, 20] (e^offset scales the ridge; e^20 ≈ 5e8)")
    ratio = getattr(hp, "max_delta_ratio", None)
    if ratio is not None and not (math.isfinite(float(ratio)) and float(ratio) > 0):
        bad("max_delta_ratio", "a number > 0 (or null to turn the check off)")


def scientific_floats(config: dict) -> dict:
    """EasyEdit's scientific-notation handling, in place: YAML reads ``1e-4`` as a string; every string value that
    parses as a float becomes one."""
    for key, value in config.items():
        if isinstance(value, str):
            try:
                config[key] = float(value)
            except ValueError:
                pass
    return config


@dataclasses.dataclass
class _StandaloneHyperParams:
    """Stand-in for ``easyeditor.util.hparams.HyperParams`` when EasyEdit is not installed."""

    @classmethod
    def from_json(cls, fpath: str):
        with open(fpath, encoding="utf-8") as f:
            return cls(**json.load(f))

    @staticmethod
    def construct_float_from_scientific_notation(config: dict) -> dict:
        return scientific_floats(config)


def hyperparams_base() -> type:
    """EasyEdit's ``HyperParams`` when importable, else the standalone stand-in."""
    return easyedit_hyperparams_class() or _StandaloneHyperParams


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce) ``value`` against annotation ``tp``; raise HyperParamsError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, arm, where)
            except HyperParamsError as exc:
                errors.append(str(exc))
        raise HyperParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise HyperParamsError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, typing.List, tuple, typing.Tuple):
        if not isinstance(value, (list, tuple)):
            raise HyperParamsError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise HyperParamsError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise HyperParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HyperParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise HyperParamsError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        raise HyperParamsError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise HyperParamsError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise HyperParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (the ``--set`` option of the training commands) → ``{key: YAML-parsed value}``;
    a ``ValueError`` names the malformed item."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


class ValidatedHyperParamsMixin:
    """``from_hparams`` / ``from_dict`` / ``to_dict`` with strict validation, for dataclass hyperparameters.

    Subclasses set ``ALG_NAME`` (the required ``alg_name`` value) and are dataclasses.
    """

    ALG_NAME: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, config: dict, *, source: str = "<dict>"):
        if not isinstance(config, dict):
            raise HyperParamsError(f"{source}: expected a mapping of hyperparameters, got {type(config).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise HyperParamsError(
                f"{source}: unknown key(s) {unknown} for {cls.__name__} (known keys: {sorted(fields)})"
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in config
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        )
        if missing:
            raise HyperParamsError(f"{source}: missing required key(s) {missing} for {cls.__name__}")
        alg = config.get("alg_name", cls.ALG_NAME)
        if cls.ALG_NAME and alg != cls.ALG_NAME:
            raise HyperParamsError(
                f"{source}: key 'alg_name' is {alg!r}, but {cls.__name__} needs alg_name: {cls.ALG_NAME}"
            )
        values = {
            name: _check_value(value, hints[name], f"{source}: key {name!r}") for name, value in config.items()
        }
        try:
            return cls(**values)
        except HyperParamsError as exc:  # range checks of __post_init__: name the file too
            raise HyperParamsError(f"{source}: {exc}") from exc

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | os.PathLike[str], overrides: dict | None = None):
        """Load ``<path>.yaml`` (``.yaml`` appended when missing, as in EasyEdit) and validate it, with
        ``overrides`` (e.g. from ``--set KEY=VALUE``) replacing keys of the file first."""
        path = str(hparams_name_or_path)
        if not path.endswith((".yaml", ".yml")):
            path = path + ".yaml"
        if not Path(path).is_file():
            raise FileNotFoundError(f"hyperparameter file {path} does not exist")
        with open(path, encoding="utf-8") as stream:
            try:
                config = yaml.safe_load(stream)
            except yaml.YAMLError as exc:
                raise HyperParamsError(f"{path}: not valid YAML: {exc}") from exc
        config = config if config is not None else {}
        if overrides and isinstance(config, dict):
            config = {**config, **overrides}
        obj = cls.from_dict(config, source=path)
        obj._source_path = path
        return obj

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
