"""Hyperparameter files: EasyEdit-like loading with errors that name the key and the file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from easyedit_agrade.hparams import HyperParamsError
from easyedit_agrade.models.agrade.agrade_hparams import AGRADEHyperParams
from easyedit_agrade.models.instructedit.instructedit_hparams import InstructEditHyperParams
from easyedit_agrade.paths import REPO_ROOT

AGRADE_YAML = REPO_ROOT / "hparams" / "AGRADE" / "smollm2-135m.yaml"


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _base() -> dict:
    return yaml.safe_load(AGRADE_YAML.read_text())


def test_loads_shipped_files_and_appends_yaml():
    hp = AGRADEHyperParams.from_hparams(str(AGRADE_YAML)[: -len(".yaml")])
    assert hp.alg_name == "AGRADE"
    assert hp.inner_params[0].endswith("mlp.down_proj.weight")
    ie = InstructEditHyperParams.from_hparams(REPO_ROOT / "hparams" / "InstructEdit" / "smollm2-135m")
    assert ie.alg_name == "InstructEdit"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "hparams" / "AGRADE").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_agrade_yaml_loads_and_validates(path):
    hp = AGRADEHyperParams.from_hparams(str(path)[: -len(".yaml")])
    assert hp.alg_name == "AGRADE" and hp.inner_params
    stage = hp.network_stage_hparams()  # a named network stage resolves next to the YAML, from any working dir
    assert stage is None or (stage.value_source == "hypernet" and stage.eta_factor == hp.network_stage_eta_factor)


def test_scientific_notation_strings_become_floats(tmp_path):
    cfg = _base()
    cfg["eta_init"] = "1e-4"  # YAML 1.1 reads an unquoted 1e-4 as this string
    hp = AGRADEHyperParams.from_hparams(_write(tmp_path, cfg))
    assert hp.eta_init == pytest.approx(1e-4)


def test_unknown_key_names_key_and_file(tmp_path):
    cfg = _base()
    cfg["learning_rat"] = 1.0
    path = _write(tmp_path, cfg)
    with pytest.raises(HyperParamsError, match=r"learning_rat") as err:
        AGRADEHyperParams.from_hparams(path)
    assert str(path) in str(err.value)


def test_missing_required_key(tmp_path):
    cfg = _base()
    del cfg["inner_params"]
    path = _write(tmp_path, cfg)
    with pytest.raises(HyperParamsError, match=r"missing required key\(s\) \['inner_params'\]") as err:
        AGRADEHyperParams.from_hparams(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "key,value",
    [("batch_size", "many"), ("batch_size", 2.5), ("use_adjustment", "yes"), ("inner_params", "model.x.weight"),
     ("eta_init", "fast"), ("preset", "rome")],
)
def test_wrong_type_names_key(tmp_path, key, value):
    cfg = _base()
    cfg[key] = value
    path = _write(tmp_path, cfg)
    with pytest.raises(HyperParamsError, match=repr(key)) as err:
        AGRADEHyperParams.from_hparams(path)
    assert str(path) in str(err.value)


def test_wrong_alg_name(tmp_path):
    cfg = _base()
    cfg["alg_name"] = "ROME"
    with pytest.raises(HyperParamsError, match="alg_name.*'ROME'.*AGRADE"):
        AGRADEHyperParams.from_hparams(_write(tmp_path, cfg))


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.yaml"):
        AGRADEHyperParams.from_hparams(tmp_path / "does-not-exist")
    bad = tmp_path / "broken.yaml"
    bad.write_text("alg_name: [unclosed\n")
    with pytest.raises(HyperParamsError, match="not valid YAML"):
        AGRADEHyperParams.from_hparams(bad)


def test_subclasses_easyedit_hyperparams_when_available(easyeditor_module):
    import importlib

    base = importlib.import_module("easyeditor.util.hparams").HyperParams
    assert issubclass(AGRADEHyperParams, base)
    assert issubclass(InstructEditHyperParams, base)


def test_easyedit_baseline_loader_adapts_and_validates(easyeditor_module, tmp_path):
    import dataclasses

    from easyedit_agrade.integration.baselines import load_easyedit_hparams
    from easyedit_agrade.integration.preloaded import PreloadedModel

    path = REPO_ROOT / "hparams" / "FT" / "smollm2-135m.yaml"
    hp = load_easyedit_hparams(path)
    assert type(hp).__name__ == "FTHyperParams" and isinstance(hp.model_name, PreloadedModel)
    has_objective = "objective_optimization" in {f.name for f in dataclasses.fields(type(hp))}
    assert (getattr(hp, "objective_optimization", None) == "prompt_last") == has_objective
    cfg = yaml.safe_load(path.read_text())
    cfg["learning_rat"] = 1
    with pytest.raises(HyperParamsError, match="learning_rat"):
        load_easyedit_hparams(_write(tmp_path, cfg))
    cfg = yaml.safe_load(path.read_text())
    del cfg["layers"]
    with pytest.raises(HyperParamsError, match="'layers'"):
        load_easyedit_hparams(_write(tmp_path, cfg))


def test_set_overrides_are_parsed_and_applied_before_validation():
    from easyedit_agrade.hparams import parse_set_overrides
    from easyedit_agrade.models.agrade import AGRADETrainingHyperParams

    over = parse_set_overrides(["use_weight_projection=false", "lr = 0.0001", "n_edits=8"])
    assert over == {"use_weight_projection": False, "lr": 1e-4, "n_edits": 8}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set_overrides(["lr"])
    cfg = AGRADETrainingHyperParams.from_hparams(REPO_ROOT / "hparams/TRAINING/AGRADE/smollm2-135m", over)
    assert cfg.use_weight_projection is False and cfg.n_edits == 8
    with pytest.raises(Exception, match="no_such_key"):
        AGRADETrainingHyperParams.from_hparams(REPO_ROOT / "hparams/TRAINING/AGRADE/smollm2-135m", {"no_such_key": 1})
