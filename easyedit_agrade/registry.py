"""The one table of this plugin's editing methods: names and dotted paths only (importing it imports nothing).

Every place that lists the methods reads this table: EasyEdit registration (``integration.easyedit.METHODS``),
``easyedit-agrade train --alg`` (``training_cli.TRAINERS``), the package's lazy exports (``easyedit_agrade._LAZY``)
and the benchmark's hyperparameter loading (``bench.methods.HPARAMS_CLASSES``). A third method is one more row.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodEntry:
    """Where a method's parts live, as dotted module paths and attribute names (resolved only when used)."""

    alg_name: str  # EasyEdit's ``alg_name`` (the key of ``ALG_DICT``; ``ALG_TRAIN_DICT`` uses it upper-cased)
    package: str  # the method folder; exports the executor and the trainer class
    executor: str  # ``apply_<method>_to_model`` in ``package`` (EasyEdit's ``apply_to_model`` entry)
    trainer_class: str  # the trainer class in ``package`` (EasyEdit's ``ALG_TRAIN_DICT`` entry)
    hparams_module: str  # ``<method>_hparams`` module
    hparams_class: str  # the editing hyperparameter class in ``hparams_module``
    trainer_module: str  # the module whose ``train_main(argv)`` is ``easyedit-agrade train --alg <alg_name>``
    exported_hparams: tuple[str, ...] = ()  # classes of ``hparams_module`` exported from ``easyedit_agrade``


METHODS: tuple[MethodEntry, ...] = (
    MethodEntry(
        alg_name="AGRADE",
        package="easyedit_agrade.models.agrade",
        executor="apply_agrade_to_model",
        trainer_class="AGRADETrainer",
        hparams_module="easyedit_agrade.models.agrade.agrade_hparams",
        hparams_class="AGRADEHyperParams",
        trainer_module="easyedit_agrade.models.agrade.agrade_trainer",
        exported_hparams=("AGRADEHyperParams", "AGRADETrainingHyperParams"),
    ),
    MethodEntry(
        alg_name="InstructEdit",
        package="easyedit_agrade.models.instructedit",
        executor="apply_instructedit_to_model",
        trainer_class="InstructEditTrainer",
        hparams_module="easyedit_agrade.models.instructedit.instructedit_hparams",
        hparams_class="InstructEditHyperParams",
        trainer_module="easyedit_agrade.models.instructedit.instructedit_trainer",
        exported_hparams=("InstructEditHyperParams",),
    ),
)

BY_ALG_NAME: dict[str, MethodEntry] = {m.alg_name: m for m in METHODS}


def lazy_exports() -> dict[str, str]:
    """Public name -> defining module for every method's exported hyperparameter classes, executor and trainer."""
    out: dict[str, str] = {}
    for m in METHODS:
        out.update({name: m.hparams_module for name in m.exported_hparams})
        out[m.executor] = m.package
        out[m.trainer_class] = m.package
    return out
