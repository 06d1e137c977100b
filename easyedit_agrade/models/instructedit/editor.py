"""The InstructEdit (MEND-architecture) edit, shared by the executor, the trainer, the evaluation and the picture.

For every edited module ℓ and every target-predicting position i of the edit batch, the hooks of
:mod:`easyedit_agrade.core.cache` give the layer input ``u_ℓ^i`` and the output-gradient ``δ_{ℓ+1}^i`` of the summed
target cross-entropy. The shared hypernetwork (:class:`~easyedit_agrade.core.hypernet.EditorNetworks`: running
normaliser + low-rank residual blocks on the concatenated ``[u, δ]``, one network per weight shape, per-module
scale/shift) maps them to pseudo-activations ``ũ`` and pseudo-deltas ``δ̃``, and

    ∇̃_ℓ = Σ_i δ̃_{ℓ+1}^i ũ_ℓ^{i⊤}          (paper eq. 3; stored in the editor layout (Dh, Dg) as ũᵀδ̃)
    W_ℓ ← W_ℓ − lr_ℓ · ∇̃_ℓ                 (MEND's update; lr_ℓ is the network's learned per-module ``lr``)

The same code with ``use_instruction: false`` is multi-task MEND.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...core.cache import KeyGradCache, LayerStack
from ...core.editor_base import HypernetEditor, MicroBatch, encode_micro_batches  # noqa: F401 (re-exported)
from ...core.hypernet import EditorNetworks
from ...core.weights import delta_hooks  # noqa: F401 (re-exported: the trainer's differentiable ΔW)
from .instructedit_hparams import InstructEditHyperParams


def editing_direction(u_tilde: torch.Tensor, d_tilde: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ∇̃ = Σ_i δ̃_i ũ_iᵀ, returned in the editor layout (Dh, Dg) = ũᵀ δ̃."""
    return u_tilde.transpose(0, 1) @ d_tilde


def mend_delta(lr: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """MEND's weight update ΔW = −lr · ∇̃ (editor layout)."""
    return -lr * direction


def build_networks(model: nn.Module, hparams: InstructEditHyperParams, seed: int = 0) -> EditorNetworks:
    """A fresh (untrained) editor for ``hparams.inner_params`` of ``model`` (layer order)."""
    stack = LayerStack(model, list(hparams.inner_params))
    return EditorNetworks(stack.sizes(), rank=hparams.rank, n_blocks=hparams.n_blocks, lr_init=hparams.edit_lr,
                          log_lambda_init=0.0, seed=seed)


class InstructEditEditor(HypernetEditor):
    """Computes InstructEdit/MEND weight edits for ``model`` with an :class:`EditorNetworks` (encoding, lower
    layers and the u/δ cache: :class:`~easyedit_agrade.core.editor_base.HypernetEditor`; ``hparams``: an
    :class:`InstructEditHyperParams`)."""

    def observe(self, cache: KeyGradCache) -> None:
        """Fold u, δ into the running normalisers (only when the networks are in training mode)."""
        for name in self.stack.module_names:
            self.nets.observe(name, *cache.get(name))

    def directions(self, cache: KeyGradCache) -> dict[str, torch.Tensor]:
        """∇̃ per module (eq. 3), differentiable w.r.t. the hypernetwork when grad is enabled."""
        out = {}
        for name in self.stack.module_names:
            u, d = cache.get(name)
            u_t, d_t = self.nets(name, u.to(self.dtype), d.to(self.dtype))
            out[name] = editing_direction(u_t, d_t)
        return out

    def deltas(self, cache: KeyGradCache) -> dict[str, torch.Tensor]:
        out = {}
        for name, direction in self.directions(cache).items():
            out[name] = mend_delta(self.nets.lr(name).to(direction.dtype), direction)
            if not torch.is_grad_enabled() and not bool(torch.isfinite(out[name]).all()):
                raise FloatingPointError(f"InstructEdit produced a non-finite ΔW for {name}")
        return out

    @torch.no_grad()
    def edit_deltas(self, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise, cache u/δ and compute ΔW for one batch of (already instruction-wrapped) edits."""
        mbs = self.encode(prompts, targets)
        with torch.enable_grad():
            cache = self.cache(mbs)
        return self.deltas(cache)
