"""Scaling AGRADE past one device: collectives for data-parallel editing and training, bounded-memory
streaming of large edit batches, and the memory plan. See ``docs/distributed.md``."""
from .collective import Collective, TorchCollective, get_collective, init_from_env

__all__ = ["Collective", "TorchCollective", "get_collective", "init_from_env"]
