"""AGRADE: Adaptively guided GRADient editing (hparams, executor, trainer).

Laid out like EasyEdit's ``easyeditor/models/<method>/``: ``agrade_hparams.py``, ``agrade_main.py`` (executor),
``agrade_trainer.py`` (trainer, ``train_main``), ``equations.py`` (eqs 1–7), ``editor.py`` (the edit pipeline),
``archive.py`` (trained archives), ``agrade_eval.py`` (batched ES/GS/LS). The demo and η calibration are faces
(``easyedit_agrade.tools.agrade_demo``, ``easyedit_agrade.tools.agrade_calibrate``).
"""
from .agrade_hparams import AGRADEHyperParams, AGRADETrainingHyperParams
from .agrade_main import apply_agrade_to_model
from .agrade_trainer import AGRADETrainer

__all__ = ["AGRADEHyperParams", "AGRADETrainingHyperParams", "apply_agrade_to_model", "AGRADETrainer"]
