"""The AGRADE editing pipeline, shared by the executor (``apply_agrade_to_model``) and the trainer.

requests → tokenised micro-batches (target mask, label shift) → layers below the first edited one, once, without
grad → cache pass (summed CE; hooks give H and ∇G per module on target-predicting positions) → hypernetwork
(H̃, ∇G̃) → eqs 1–2 → eq 4 against the previous module's final G → eq 3 factorisation → eq 5 ΔW.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ...core.cache import KeyGradCache, LayerStack, cache_keys_and_grads
from ...core.hypernet import EditorNetworks
from ...core.tokenize import encode_prompt_target
from . import equations as eq
from .agrade_hparams import AGRADEHyperParams, Switches


@dataclass
class MicroBatch:
    """One tokenised micro-batch: ids, attention, predict mask (positions predicting a target token), labels
    aligned with those positions (``shifted_labels``), and ``record_ids`` = the record index of each row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    predict_mask: torch.Tensor
    labels: torch.Tensor
    record_ids: torch.Tensor
    hidden: torch.Tensor | None = None

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids, self.attention_mask, self.predict_mask, self.labels

    @property
    def rows(self) -> torch.Tensor:
        """Record index of each selected position, in the row-major order of ``predict_mask``."""
        return self.record_ids[self.predict_mask.nonzero()[:, 0].cpu()]

    @property
    def target_labels(self) -> torch.Tensor:
        return self.labels[self.predict_mask]


def encode_micro_batches(tok, prompts: Sequence[str], targets: Sequence[str], *, max_length: int | None,
                         micro_batch: int, device: torch.device | str = "cpu",
                         sort_by_length: bool = True) -> list[MicroBatch]:
    """Tokenise pairs into right-padded micro-batches of at most ``micro_batch`` records.

    With ``sort_by_length`` records of similar length share a micro-batch (less padding); ``record_ids`` keeps
    the mapping back to the caller's order.
    """
    n = len(prompts)
    order = list(range(n))
    if sort_by_length and n > micro_batch:
        lengths = [len(tok(p + " " + t, add_special_tokens=True)["input_ids"]) for p, t in zip(prompts, targets)]
        order.sort(key=lambda i: (lengths[i], i))
    out: list[MicroBatch] = []
    for start in range(0, n, micro_batch):
        idx = order[start:start + micro_batch]
        b = encode_prompt_target(tok, [prompts[i] for i in idx], [targets[i] for i in idx],
                                 max_length=max_length, padding_side="right")
        out.append(MicroBatch(b.input_ids.to(device), b.attention_mask.to(device), b.predict_mask.to(device),
                              b.shifted_labels.to(device), torch.tensor(idx, dtype=torch.long)))
    return out


@dataclass
class ModuleEdit:
    """Everything computed for one module during an edit (kept by the trainer for the backward step)."""

    name: str
    H: torch.Tensor
    grad: torch.Tensor
    G: torch.Tensor  # final G (after eq 4), detached
    G_prev: torch.Tensor | None  # the G eq 4 projected against (None when eq 4 was not applied)
    fact: object
    delta: torch.Tensor


@dataclass
class EditResult:
    deltas: dict[str, torch.Tensor]
    modules: list[ModuleEdit] = field(default_factory=list)
    cache_loss: float = 0.0
    n_tokens: int = 0


class AGRADEEditor:
    """Computes AGRADE weight edits for a model with a given :class:`EditorNetworks`."""

    def __init__(self, model: nn.Module, tok, hparams: AGRADEHyperParams, nets: EditorNetworks) -> None:
        self.model = model
        self.tok = tok
        self.hparams = hparams
        self.nets = nets
        self.stack = LayerStack(model, list(hparams.inner_params))
        self.switches: Switches = hparams.switches()
        self.dtype = torch.float64 if hparams.editor_dtype == "float64" else torch.float32
        self.lower_stack: LayerStack | None = None  # optional low-precision copy for the frozen lower layers

    def use_lower_dtype(self, dtype: torch.dtype | None) -> None:
        """Run the frozen layers below the first edited one in ``dtype`` (e.g. bf16, ~3x faster on CPU) from a
        separate copy of the model; the edited layers, ΔW and the solve stay in the editor dtype. None: off."""
        if dtype is None or dtype == next(self.model.parameters()).dtype:
            self.lower_stack = None
            return
        import copy

        low = copy.deepcopy(self.model).to(dtype)
        for p in low.parameters():
            p.requires_grad_(False)
        self.lower_stack = LayerStack(low, list(self.hparams.inner_params))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: Sequence[str], targets: Sequence[str], micro_batch: int | None = None,
               max_length: int | None | str = "hparams") -> list[MicroBatch]:
        """Micro-batches of ``prompt + target``; ``max_length`` defaults to ``hparams.max_length`` (None: no cut)."""
        limit = self.hparams.max_length if max_length == "hparams" else max_length
        return encode_micro_batches(self.tok, prompts, targets, max_length=limit,  # type: ignore[arg-type]
                                    micro_batch=micro_batch or self.hparams.cache_batch_size, device=self.device)

    def lower(self, mbs: Sequence[MicroBatch]) -> None:
        """Run the frozen lower layers once per micro-batch (no grad) and keep the result on the batch."""
        dtype = next(self.model.parameters()).dtype
        for mb in mbs:
            if mb.hidden is None:
                if self.lower_stack is not None:
                    mb.hidden = self.lower_stack.lower(mb.input_ids, mb.attention_mask).to(dtype)
                else:
                    mb.hidden = self.stack.lower(mb.input_ids, mb.attention_mask)

    def cache(self, mbs: Sequence[MicroBatch]) -> KeyGradCache:
        self.lower(mbs)
        return cache_keys_and_grads(self.stack, [mb.as_tuple() for mb in mbs],
                                    hidden=[mb.hidden for mb in mbs], dtype=self.dtype)  # type: ignore[misc]

    def module_G(self, name: str, H: torch.Tensor, grad: torch.Tensor, G_prev: torch.Tensor | None) -> torch.Tensor:
        """Eqs 1, 2 and 4 for one module (differentiable w.r.t. the hypernetwork and η)."""
        H_tilde, grad_tilde = self.nets(name, H, grad)
        if self.switches.adjustment:
            c = eq.eq1_adjustment_coefficients(H, H_tilde, self.nets.lr(name))
            G = eq.eq2_scaled_gradient(c, grad_tilde)
        else:
            G = grad_tilde
        if self.switches.weight_projection:
            G = eq.eq4_project_out(G, G_prev)
        return G

    @torch.no_grad()
    def compute(self, cache: KeyGradCache) -> EditResult:
        """ΔW for every edited module (no grad). Modules are processed in layer order; eq 4 uses the previous
        module's final G when the shapes agree (modules of another width are not projected)."""
        result = EditResult(deltas={}, cache_loss=float(sum(cache.losses)))
        G_prev: torch.Tensor | None = None
        for name in self.stack.module_names:
            H, grad = cache.get(name)
            H, grad = H.to(self.dtype), grad.to(self.dtype)
            result.n_tokens = H.shape[0]
            prev = G_prev if (G_prev is not None and self.switches.weight_projection) else None
            if prev is not None and prev.shape[1] != grad.shape[1]:
                prev = None
            G = self.module_G(name, H, grad, prev).detach()
            log_lambda = self.nets.log_lambda(name) if self.switches.regularization else None
            fact = eq.eq3_factorize(H, log_lambda, method=self.hparams.solver, backend=self.hparams.kernels_backend)
            delta = eq.eq5_delta(fact, G)
            if not bool(torch.isfinite(delta).all()):
                raise FloatingPointError(f"AGRADE produced a non-finite ΔW for {name} (solver info {fact.info})")
            result.deltas[name] = delta
            result.modules.append(ModuleEdit(name, H, grad, G, prev, fact, delta))
            G_prev = G
        return result

    def edit_deltas(self, prompts: Sequence[str], targets: Sequence[str]) -> EditResult:
        """Tokenise, cache and compute ΔW for one batch of edits (the hypernetwork is not updated)."""
        mbs = self.encode(prompts, targets)
        return self.compute(self.cache(mbs))
