"""Scoped compatibility shims that let EasyEdit 0.0.1.dev0's baselines run on the embedded model with the pinned
transformers/peft versions. Each shim is a context manager that undoes itself; none is installed globally, and
each one is listed in the benchmark output when it was used.

* :func:`decoder_layers_return_tuples` — transformers >= 4.54 decoder layers return a tensor; EasyEdit's MEMIT
  (``compute_z``) indexes ``layer_output[0]`` expecting the old ``(hidden_states, ...)`` tuple.
* :func:`adalora_total_step` — EasyEdit's LoRA builds ``peft.AdaLoraConfig`` without ``total_step``, which peft
  >= 0.14 rejects. EasyEdit never calls AdaLoRA's rank re-allocation, so the value only passes validation.
* :func:`memit_identity_covariance` — EasyEdit's MEMIT always loads the edited layers' key covariance from
  Wikipedia statistics (its ``mom2_adjustment`` flag is not read). No statistics can be downloaded here, so the
  covariance is set to the identity: "covariance adjustment off", the MEMIT update becomes ridge regression.
* :func:`ensure_model_parallel_field` — ``BaseEditor`` reads ``hparams.model_parallel``, which
  ``LoRAHyperParams`` does not define.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator


@contextlib.contextmanager
def decoder_layers_return_tuples(model: Any, layer_template: str, n_layers: int) -> Iterator[None]:
    """While active, each decoder layer's output is seen by hooks as ``(hidden_states,)`` (the pre-4.54 shape).

    A forward hook wraps the tensor in a 1-tuple; a forward pre-hook on the next layer and on the final norm
    unwraps it again, so the model computes exactly what it computed before. Our hooks are registered before
    EasyEdit's tracing hooks, hence run first.
    """
    import torch

    modules = dict(model.named_modules())
    layers = [modules[layer_template.format(i)] for i in range(n_layers)]
    handles = []

    def wrap(_module, _args, output):
        return (output,) if isinstance(output, torch.Tensor) else output

    def unwrap(_module, args):
        if args and isinstance(args[0], tuple):
            return (args[0][0], *args[1:])
        return None

    norm = getattr(getattr(model, "model", model), "norm", None)
    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(unwrap))
            handles.append(layer.register_forward_hook(wrap))
        if norm is not None:
            handles.append(norm.register_forward_pre_hook(unwrap))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def adalora_total_step(total_step: int) -> Iterator[None]:
    """Give EasyEdit's ``AdaLoraConfig(...)`` a ``total_step`` while active."""
    mod = importlib.import_module("easyeditor.models.lora.lora_main")
    original = mod.AdaLoraConfig

    def config(*args: Any, **kwargs: Any):
        kwargs.setdefault("total_step", max(int(total_step), 1))
        return original(*args, **kwargs)

    mod.AdaLoraConfig = config
    try:
        yield
    finally:
        mod.AdaLoraConfig = original


@contextlib.contextmanager
def memit_identity_covariance(model: Any, hparams: Any) -> Iterator[None]:
    """Seed EasyEdit MEMIT's covariance cache with identity matrices for the edited layers while active."""
    import torch

    mod = importlib.import_module("easyeditor.models.memit.memit_main")
    name = model.config._name_or_path.replace("/", "_")
    added = []
    for layer in hparams.layers:
        module_name = hparams.rewrite_module_tmp.format(layer)
        weight = dict(model.named_modules())[module_name].weight
        key = (name, module_name)
        if key not in mod.COV_CACHE:
            mod.COV_CACHE[key] = torch.eye(weight.shape[1], dtype=torch.float32)
            added.append(key)
    try:
        yield
    finally:
        for key in added:
            mod.COV_CACHE.pop(key, None)


def ensure_model_parallel_field(hparams: Any) -> bool:
    """Add ``model_parallel = False`` when the hparams class lacks it; True when it was added."""
    if hasattr(hparams, "model_parallel"):
        return False
    hparams.model_parallel = False
    return True
