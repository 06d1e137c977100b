"""Apply and restore weight edits ΔW, bit-exactly, for ``nn.Linear`` and GPT-2's ``Conv1D``.

Editors work in the *editor layout* (Dh, Dg): rows index the module's input features (H's columns), columns its
output features (∇G's columns), so ``output += input @ ΔW``. ``nn.Linear`` stores ``weight`` as (out, in) =
(Dg, Dh) and needs ΔWᵀ; transformers' ``Conv1D`` stores (in, out) = (Dh, Dg) and takes ΔW as is.

Precision plan (see also ``docs/distributed.md``, "Precision plan"). A 16-bit (bf16/fp16) weight is never
modified by add-then-subtract: every apply first keeps an exact clone of the original weight, every revert copies
that clone back (``copy_`` / ``param[...] = v``), so 100 apply/revert cycles leave the weights bit-identical
(``tests/core/test_precision_plan.py``). ΔW itself is never rounded to 16 bits except by the single final cast
of the in-place mode. How ΔW enters the model:

* ``mode="inplace"``: the weight becomes ``round_to_nearest(w₃₂ + ΔW)`` — the sum is formed in fp32 (fp64 when ΔW
  or the weight is fp64) and cast **once** to the weight's dtype. With a caller-owned ``masters`` dict, several
  applications to the same weight accumulate into the high-precision master (``w₃₂ + Δ₁ + … + Δₖ``) and are
  still cast once, so ΔW below half an ulp of a bf16 weight is not rounded away chunk after chunk.
* ``mode="hook"``: the weight is untouched; a forward hook returns ``round(out₃₂ + x₃₂ @ ΔW)`` (ΔW kept in fp32,
  one rounding of the edited output) — the edit is exact fp32 math on top of the 16-bit forward.
* ``mode="auto"`` (the default here): ``"hook"`` for 16-bit weights, ``"inplace"`` otherwise.

Reverting through EasyEdit. ``BaseEditor.edit``/``batch_edit`` restore the returned ``weights_copy`` with
``nethook.get_parameter(model, k)[...] = v``: an exact copy of the original tensor, but it cannot remove a forward
hook, so a hook-applied edit would silently survive EasyEdit's restore (and make its "pre" metrics post-edit ones).
The executors therefore resolve ``apply_mode: auto`` with :func:`executor_apply_mode` to ``"inplace"`` for every
dtype (16-bit weights: fp32 master, one rounding, original bf16/fp16 tensor in ``weights_copy``): both EasyEdit's
``param[...] = v`` and :func:`restore_weights` are then an exact copy and leave nothing behind. The fp32 hook
stays the choice of our own evaluation loops, which always revert with :func:`restore_weights` (it copies the
originals back *and* removes the hooks) — and of callers who set ``apply_mode: hook`` explicitly and revert with
:func:`restore_weights` / :func:`remove_delta_hooks` themselves.

Training (:func:`delta_leaves`): ΔW enters through fp32 forward hooks as leaf tensors with ``requires_grad``, so
``leaf.grad`` is g_θ = ∂L/∂ΔW in fp32 and in the editor layout, for any LM dtype — equal to ∂L/∂W of an in-place
edit (transposed for ``nn.Linear``), without ever writing the weights.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

_HOOK_ATTR = "_easyedit_agrade_delta_hook"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
        return "hook" if weight.dtype in _LOW_PRECISION else "inplace"
    if mode not in ("inplace", "hook"):
        raise ValueError(f"mode must be 'auto', 'inplace' or 'hook', got {mode!r}")
    return mode


def executor_apply_mode(mode: str) -> str:
    """The apply mode an EasyEdit executor (``apply_*_to_model``) uses for the hparams' ``apply_mode``.

    Its ``weights_copy`` is restored by EasyEdit's ``BaseEditor`` with ``param[...] = v``, which cannot remove a
    forward hook, so ``"auto"`` resolves to ``"inplace"`` for every dtype (16-bit weights: fp32 master, rounded
    once; the restore is an exact copy either way). An explicit ``"hook"`` is honoured with a warning: the caller
    must then revert with :func:`restore_weights` (or :func:`remove_delta_hooks`).
    """
    if mode == "auto":
        return "inplace"
    if mode == "hook":
        warnings.warn("apply_mode='hook': EasyEdit's restore (param[...] = v) does not remove the fp32 ΔW hooks; "
                      "revert with easyedit_agrade.core.weights.restore_weights", stacklevel=3)
    elif mode != "inplace":
        raise ValueError(f"apply_mode must be 'auto', 'inplace' or 'hook', got {mode!r}")
    return mode


@torch.no_grad()
def apply_deltas(
    model: nn.Module,
    deltas: Mapping[str, torch.Tensor],
    *,
    mode: str = "auto",
    weights_copy: dict[str, torch.Tensor] | None = None,
    masters: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Add ΔW (editor layout, keyed by *module* name) to the model; return ``{param_name: original weight}``.

    If ``weights_copy`` is given, originals are added to it only for parameters not already present (so
    several applications still restore to the very first original).

    ``masters`` (a dict owned by the caller, e.g. one per executor call): for in-place writes into a weight of
    lower precision than the accumulation dtype (bf16/fp16 weights, or fp32 weights with an fp64 ΔW) it keeps
    ``w_acc + Δ₁ + … + Δₖ`` per parameter, so after k applications the weight is that sum rounded once rather
    than k successive roundings. A master no longer matching the weight (changed by someone else in between) is
    restarted from the weight.
    """
    copies = {} if weights_copy is None else weights_copy
    for name, delta in deltas.items():
        module = get_module(model, name)
        param_name = f"{name}.weight"
        w = module.weight
        if not bool(torch.isfinite(delta).all()):
            raise FloatingPointError(f"ΔW for {name} contains NaN/Inf; refusing to apply it")
        d = delta_to_weight_layout(module, delta)  # also checks the shape
        if param_name not in copies:
            copies[param_name] = w.detach().clone()
        how = _resolve_mode(mode, w)
        if how == "inplace":
            acc = _accum_dtype(w, delta)
            base = None
            if masters is not None and acc != w.dtype:
                base = masters.get(param_name)
                if base is not None and not torch.equal(base.to(w.dtype), w.detach()):
                    base = None
            if base is None:
                base = w.detach().to(acc)
            new = base + d.to(device=w.device, dtype=acc)
            if masters is not None and acc != w.dtype:
                masters[param_name] = new
            w.data.copy_(new.to(w.dtype))  # one round-to-nearest of the high-precision sum
        else:
            _add_delta_hook(module, delta)
    return copies


def _plus_x_delta(output: torch.Tensor, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``output + x @ ΔW`` computed in ΔW's dtype and rounded once to the output's dtype."""
    if output.dtype == delta.dtype:
        return output + x.to(delta.dtype) @ delta
    return (output.to(delta.dtype) + x.to(delta.dtype) @ delta).to(output.dtype)


def _add_delta_hook(module: nn.Module, delta: torch.Tensor) -> None:
    """Forward hook adding ``x @ ΔW`` in fp32 (accumulates if a hook is already installed)."""
    existing = getattr(module, _HOOK_ATTR, None)
    d = delta.detach().to(device=module.weight.device, dtype=_accum_dtype(delta))
    if existing is not None:
        existing[1].add_(d.to(existing[1].dtype))
        return
    holder = d.clone()

    def hook(mod: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return _plus_x_delta(output, inputs[0], holder)

    handle = module.register_forward_hook(hook)
    setattr(module, _HOOK_ATTR, (handle, holder))


@contextlib.contextmanager
def _output_hooks(model: nn.Module, deltas: Mapping[str, torch.Tensor],
                  add: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside: every module named in ``deltas`` returns ``add(output, input, ΔW)`` (shape-checked); the hooks
    are removed on exit."""
    handles = []
    try:
        for name, delta in deltas.items():
            module = get_module(model, name)
            delta_to_weight_layout(module, delta)  # shape check

            def hook(_m: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor, d: torch.Tensor = delta):
                return add(output, inputs[0], d)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def delta_leaves(model: nn.Module, deltas: Mapping[str, torch.Tensor], *,
                 dtype: torch.dtype | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Differentiable edits for training; yields ``{module_name: D}``.

    Inside, every module named in ``deltas`` gets a forward hook returning ``round(out + x @ D)`` (computed in
    ``dtype``; default fp32, fp64 when ΔW is fp64), where ``D`` is a fresh leaf copy of ΔW with
    ``requires_grad=True``. After ``backward()``, ``D.grad`` is g_θ = ∂L/∂ΔW in ``dtype`` and in the editor layout
    — for a bf16/fp16 LM as well (an in-place edit would round ΔW into the 16-bit weight and give a 16-bit
    ``weight.grad``). For any dtype it equals ∂L/∂W of the in-place edit (transposed for ``nn.Linear``), since
    the output depends on W + ΔW only. The weights are never written; the hooks are removed on exit. Grad mode
    is the caller's business (use ``torch.enable_grad()`` and freeze the model's own parameters).
    """
    leaves: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        module = get_module(model, name)
        delta_to_weight_layout(module, delta)  # shape check before any copy
        leaves[name] = delta.detach().to(device=module.weight.device,
                                         dtype=dtype or _accum_dtype(delta)).clone().requires_grad_(True)
    with _output_hooks(model, leaves, _plus_x_delta):
        yield leaves


@contextlib.contextmanager
def added_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside: every module named in ``deltas`` computes as if its weight were W + ΔW — its output gets
    ``+ x @ ΔW`` formed in fp32 (fp64 when ΔW is) and rounded once to the output's dtype — without writing the
    weights (a 16-bit weight is not rounded) and without touching the ΔW hooks of ``apply_deltas(mode="hook")``,
    which keep adding their own edits first. Not differentiable w.r.t. ΔW (see :func:`delta_leaves`); removed
    on exit."""
    fixed = {}
    for name, delta in deltas.items():
        module = get_module(model, name)
        delta_to_weight_layout(module, delta)  # shape check before any copy
        fixed[name] = delta.detach().to(device=module.weight.device, dtype=_accum_dtype(delta))
    with _output_hooks(model, fixed, _plus_x_delta):
        yield


def _plus_rounded_x_delta(output: torch.Tensor, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``output + round(x @ ΔW)``: the product in ΔW's dtype, rounded to the output's dtype, then added."""
    return output + (x.to(delta.dtype) @ delta).to(output.dtype)


@contextlib.contextmanager
def delta_hooks(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside: each module's output gets ``+ x @ ΔW`` for the given tensors *as they are* — differentiable w.r.t.
    whatever produced ΔW (MEND-style training backpropagates through ΔW into the hypernetwork; the weights are
    untouched). The product is formed in ΔW's dtype and rounded to the output's dtype before it is added. For
    g_θ = ∂L/∂ΔW as a leaf (AGRADE's training) use :func:`delta_leaves`."""
    with _output_hooks(model, deltas, _plus_rounded_x_delta):
        yield


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


def has_delta_hooks(model: nn.Module) -> bool:
    """True while some module of ``model`` carries an fp32 ΔW hook of ``apply_deltas(mode="hook")``."""
    return any(getattr(mod, _HOOK_ATTR, None) is not None for mod in model.modules())


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
