"""Run EasyEdit code that hard-codes ``cuda:{device}`` on a machine without CUDA.

The PyPI wheel ``easyeditor==0.0.1.dev0`` writes ``.to(f"cuda:{hparams.device}")`` in ``BaseEditor``, its
evaluation and every baseline. :func:`cuda_on_cpu` is a scoped :class:`torch.overrides.TorchFunctionMode` that,
*only while active and only when CUDA is unavailable*, rewrites CUDA device arguments of torch calls
(``Tensor.to``, ``Tensor.cuda``, factory functions' ``device=``, ``Module.to``/``.cuda`` which go through them) to
the CPU. On a machine with CUDA it does nothing at all. It is never installed globally: our entry points enter it
around EasyEdit calls, and users opt in with ``with cuda_on_cpu(): ...``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_CUDA_STR = re.compile(r"^cuda(:\d+)?$")
_CPU = torch.device("cpu")


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and bool(_CUDA_STR.match(value.strip()))


def _map(value: Any) -> Any:
    return _CPU if _is_cuda_device(value) else value


class CudaToCpuMode(TorchFunctionMode):
    """Torch function mode that maps CUDA device arguments to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = dict(kwargs or {})
        if func is torch.device:  # constructing a device object is itself dispatched here
            if args and (_is_cuda_device(args[0]) or args[0] == "cuda"):
                return _CPU
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]  # already on the CPU; ``non_blocking``/``device`` are irrelevant there
        if "device" in kwargs:
            kwargs["device"] = _map(kwargs["device"])
        if func is torch.Tensor.to or func is torch.Tensor.new_empty or func is torch.Tensor.new_zeros:
            args = tuple(_map(a) for a in args)
        elif any(_is_cuda_device(a) for a in args):
            args = tuple(_map(a) for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_on_cpu(enabled: bool | None = None) -> Iterator[bool]:
    """Context manager: inside it, CUDA device arguments go to the CPU when CUDA is unavailable.

    ``enabled=None`` (default) activates the mapping exactly when ``torch.cuda.is_available()`` is false;
    ``True``/``False`` force it on/off. Yields whether the mapping is active.
    """
    active = (not torch.cuda.is_available()) if enabled is None else enabled
    if not active:
        yield False
        return
    with CudaToCpuMode():
        yield True
