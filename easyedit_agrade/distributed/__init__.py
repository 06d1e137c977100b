"""Scaling AGRADE past one device: collectives for data-parallel editing and training and bounded-memory
streaming of large edit batches. See ``docs/distributed.md`` (the 1-vs-N equality check and the memory plan are
faces: ``easyedit_agrade.tools.distributed_equivalence``, ``easyedit_agrade.tools.memory_plan``)."""
from .collective import Collective, TorchCollective, get_collective, init_from_env

__all__ = ["Collective", "TorchCollective", "get_collective", "init_from_env"]
