"""Apply and restore weight edits ΔW, bit-exactly, for ``nn.Linear`` and GPT-2's ``Conv1D``.

Editors work in the *editor layout* (Dh, Dg): rows index the module's input features (H's columns), columns its
output features (∇G's columns), so ``output += input @ ΔW``. ``nn.Linear`` stores ``weight`` as (out, in) =
(Dg, Dh) and needs ΔWᵀ; transformers' ``Conv1D`` stores (in, out) = (Dh, Dg) and takes ΔW as is.

:func:`apply_deltas` adds ΔW in fp32 (or fp64 when ΔW or the weight is fp64) and writes the rounded sum back into
the weight's own dtype, after keeping an exact clone of the original weight. :func:`restore_weights` copies the
clones back (``copy_``, so the restore is bit-exact for every dtype). The returned ``weights_copy`` is keyed by
*parameter* name, which is what EasyEdit's ``BaseEditor`` expects (it restores with ``param[...] = v``).

Low-precision models (bf16/fp16): adding a small ΔW to bf16 weights rounds most of it away. ``mode="hook"``
keeps the weights untouched and adds ``x @ ΔW`` computed in fp32 through a forward hook instead; ``mode="auto"``
picks ``"hook"`` for 16-bit weights and ``"inplace"`` otherwise. Hooks are removed by :func:`restore_weights`
(EasyEdit's own restore only copies tensors back, which is harmless but leaves hooks in place — call
:func:`restore_weights` or :func:`remove_delta_hooks` when editing a 16-bit model through EasyEdit).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

_HOOK_ATTR = "_easyedit_agrade_delta_hook"


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name`` (raises ``KeyError`` naming the missing part)."""
    mod = model
    for part in name.split("."):
        if not hasattr(mod, part):
            raise KeyError(f"model has no submodule {name!r} (missing {part!r})")
        mod = getattr(mod, part)
    return mod


def module_name_of_param(param_name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``model.layers.3.mlp.down_proj``."""
    if not param_name.endswith(".weight"):
        raise ValueError(f"edited parameters must be weights (…​.weight), got {param_name!r}")
    return param_name[: -len(".weight")]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def io_sizes(module: nn.Module) -> tuple[int, int]:
    """(input width Dh, output width Dg) of an ``nn.Linear`` or ``Conv1D``."""
    w = module.weight
    if is_conv1d(module):
        return int(w.shape[0]), int(w.shape[1])
    if isinstance(module, nn.Linear) or w.dim() == 2:
        return int(w.shape[1]), int(w.shape[0])
    raise TypeError(f"cannot edit module of type {type(module).__name__} with weight {tuple(w.shape)}")


def delta_to_weight_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """ΔW (Dh, Dg) -> the layout of ``module.weight`` (transpose for ``nn.Linear``)."""
    dh, dg = io_sizes(module)
    if tuple(delta.shape) != (dh, dg):
        raise ValueError(f"ΔW has shape {tuple(delta.shape)}, expected (Dh, Dg) = {(dh, dg)}")
    return delta if is_conv1d(module) else delta.T


def weight_grad_to_editor_layout(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """∂L/∂weight in the weight's layout -> (Dh, Dg)."""
    return grad if is_conv1d(module) else grad.T


def _accum_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _resolve_mode(mode: str, weight: torch.Tensor) -> str:
    if mode == "auto":
        return "hook" if weight.dtype in (torch.float16, torch.bfloat16) else "inplace"
    if mode not in ("inplace", "hook"):
        raise ValueError(f"mode must be 'auto', 'inplace' or 'hook', got {mode!r}")
    return mode


@torch.no_grad()
def apply_deltas(
    model: nn.Module,
    deltas: Mapping[str, torch.Tensor],
    *,
    mode: str = "auto",
    weights_copy: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Add ΔW (editor layout, keyed by *module* name) to the model; return ``{param_name: original weight}``.

    If ``weights_copy`` is given, originals are added to it only for parameters not already present (so
    several applications still restore to the very first original).
    """
    copies = {} if weights_copy is None else weights_copy
    for name, delta in deltas.items():
        module = get_module(model, name)
        param_name = f"{name}.weight"
        w = module.weight
        if not bool(torch.isfinite(delta).all()):
            raise FloatingPointError(f"ΔW for {name} contains NaN/Inf; refusing to apply it")
        if param_name not in copies:
            copies[param_name] = w.detach().clone()
        how = _resolve_mode(mode, w)
        if how == "inplace":
            acc = _accum_dtype(w, delta)
            new = w.detach().to(acc) + delta_to_weight_layout(module, delta).to(device=w.device, dtype=acc)
            w.data.copy_(new.to(w.dtype))
        else:
            _add_delta_hook(module, delta)
    return copies


def _add_delta_hook(module: nn.Module, delta: torch.Tensor) -> None:
    """Forward hook adding ``x @ ΔW`` in fp32 (accumulates if a hook is already installed)."""
    existing = getattr(module, _HOOK_ATTR, None)
    d = delta.detach().to(device=module.weight.device, dtype=_accum_dtype(delta))
    if existing is not None:
        existing[1].add_(d)
        return
    holder = d.clone()

    def hook(mod: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        return output + (x.to(holder.dtype) @ holder).to(output.dtype)

    handle = module.register_forward_hook(hook)
    setattr(module, _HOOK_ATTR, (handle, holder))


def remove_delta_hooks(model: nn.Module) -> int:
    """Remove every fp32 ΔW hook installed by ``apply_deltas(mode="hook")``; returns how many."""
    n = 0
    for mod in model.modules():
        entry = getattr(mod, _HOOK_ATTR, None)
        if entry is not None:
            entry[0].remove()
            delattr(mod, _HOOK_ATTR)
            n += 1
    return n


@torch.no_grad()
def restore_weights(model: nn.Module, weights_copy: Mapping[str, torch.Tensor]) -> None:
    """Copy the original weights back (bit-exact) and remove any ΔW hooks on those modules."""
    for param_name, original in weights_copy.items():
        module = get_module(model, module_name_of_param(param_name))
        module.weight.data.copy_(original)
        entry = getattr(module, _HOOK_ATTR, None)
        if entry is not None:
            entry[0].remove()
            delattr(module, _HOOK_ATTR)
