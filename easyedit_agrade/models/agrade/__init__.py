"""AGRADE: Adaptively guided GRADient editing (hparams, executor, trainer)."""
from .agrade_hparams import AGRADEHyperParams
from .agrade_main import apply_agrade_to_model

__all__ = ["AGRADEHyperParams", "apply_agrade_to_model"]
