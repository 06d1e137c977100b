"""The machinery every hypernetwork editor shares (the MALMEN ``editor/base.py`` / MEND ``EditableModel`` pattern).

requests → :func:`encode_micro_batches` (prompt + target, target mask, label shift, right padding, records of
similar length together) → :meth:`HypernetEditor.lower` (the frozen layers below the first edited one, run once
per micro-batch without grad, optionally from a lower-precision copy: :meth:`HypernetEditor.use_lower_dtype`) →
:meth:`HypernetEditor.cache` (one forward/backward per micro-batch with hooks on the edited modules: their inputs
and output gradients on target-predicting positions, :mod:`easyedit_agrade.core.cache`).

A method subclasses :class:`HypernetEditor` and adds only its own math: what the hypernetwork's outputs become
(AGRADE: eqs 1–5; InstructEdit/MEND: ũᵀδ̃ scaled by the learned lr) — see ``models/<method>/editor.py``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .cache import KeyGradCache, LayerStack, cache_keys_and_grads
from .hypernet import EditorNetworks
from .tokenize import encode_prompt_target


@dataclass
class MicroBatch:
    """One tokenised micro-batch: ids, attention, predict mask (positions predicting a target token), labels
    aligned with those positions (``shifted_labels``), and ``record_ids`` = the record index of each row.
    ``key_mask`` (optional) marks the positions whose rows the cache records when they are more than the predict
    positions (``key_positions: target+subject`` adds each prompt's last subject token); the loss stays on the
    predict positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    predict_mask: torch.Tensor
    labels: torch.Tensor
    record_ids: torch.Tensor
    hidden: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    #: the subject's last token of each row (set with ``key_positions: target+subject``; it may also be a predict
    #: position when the subject ends the prompt)
    subject_mask: torch.Tensor | None = None

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids, self.attention_mask, self.predict_mask, self.labels

    def cache_tuple(self) -> tuple[torch.Tensor, ...]:
        """What :func:`~easyedit_agrade.core.cache.cache_keys_and_grads` takes: :meth:`as_tuple` plus the key
        mask when the cached rows are not just the predict positions."""
        return self.as_tuple() if self.key_mask is None else (*self.as_tuple(), self.key_mask)

    @property
    def rows(self) -> torch.Tensor:
        """Record index of each selected position, in the row-major order of ``predict_mask``."""
        return self.record_ids[self.predict_mask.nonzero()[:, 0].cpu()]

    @property
    def target_labels(self) -> torch.Tensor:
        return self.labels[self.predict_mask]


#: which positions' rows an editor caches (``key_positions`` in the hparams)
KEY_POSITIONS = ("target", "target+subject")


def encode_micro_batches(tok, prompts: Sequence[str], targets: Sequence[str], *, max_length: int | None,
                         micro_batch: int, device: torch.device | str = "cpu",
                         sort_by_length: bool = True, subjects: Sequence[str | None] | None = None,
                         key_positions: str = "target") -> list[MicroBatch]:
    """Tokenise pairs into right-padded micro-batches of at most ``micro_batch`` records.

    With ``sort_by_length`` records of similar length share a micro-batch (less padding); ``record_ids`` keeps
    the mapping back to the caller's order. ``key_positions="target+subject"`` with ``subjects`` sets each
    batch's ``key_mask`` to the predict positions plus the last token of each prompt's subject (records without
    their subject in the prompt contribute their predict positions only).
    """
    if key_positions not in KEY_POSITIONS:
        raise ValueError(f"key_positions must be one of {KEY_POSITIONS}, got {key_positions!r}")
    with_subject = key_positions == "target+subject" and subjects is not None
    n = len(prompts)
    order = list(range(n))
    if sort_by_length and n > micro_batch:
        lengths = [len(tok(p + " " + t, add_special_tokens=True)["input_ids"]) for p, t in zip(prompts, targets)]
        order.sort(key=lambda i: (lengths[i], i))
    out: list[MicroBatch] = []
    for start in range(0, n, micro_batch):
        idx = order[start:start + micro_batch]
        b = encode_prompt_target(tok, [prompts[i] for i in idx], [targets[i] for i in idx],
                                 max_length=max_length, padding_side="right", record_ids=idx,
                                 subjects=[subjects[i] for i in idx] if with_subject else None)  # type: ignore[index]
        key_mask = None if b.subject_mask is None else (b.predict_mask | b.subject_mask).to(device)
        out.append(MicroBatch(b.input_ids.to(device), b.attention_mask.to(device), b.predict_mask.to(device),
                              b.shifted_labels.to(device), torch.tensor(idx, dtype=torch.long), key_mask=key_mask,
                              subject_mask=None if b.subject_mask is None else b.subject_mask.to(device)))
    return out


class HypernetEditor:
    """Encoding, lower-layer reuse, lower-precision lower layers and the key/gradient cache for a model edited by
    a trained :class:`~easyedit_agrade.core.hypernet.EditorNetworks` (hparams: an
    :class:`~easyedit_agrade.core.editor_hparams.EditorHyperParams`)."""

    def __init__(self, model: nn.Module, tok, hparams, nets: EditorNetworks) -> None:
        self.model = model
        self.tok = tok
        self.hparams = hparams
        self.nets = nets
        self.stack = LayerStack(model, list(hparams.inner_params))
        self.dtype = torch.float64 if hparams.editor_dtype == "float64" else torch.float32
        self.lower_stack: LayerStack | None = None  # optional low-precision copy for the frozen lower layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def use_lower_dtype(self, dtype: torch.dtype | None) -> None:
        """Run the frozen layers below the first edited one in ``dtype`` (e.g. bf16, ~3x faster on CPU) from a
        separate copy of the model; the edited layers, ΔW and the solve stay in the editor dtype. None: off."""
        if dtype is None or dtype == next(self.model.parameters()).dtype:
            self.lower_stack = None
            return
        low = copy.deepcopy(self.model).to(dtype)
        for p in low.parameters():
            p.requires_grad_(False)
        self.lower_stack = LayerStack(low, list(self.hparams.inner_params))

    def encode(self, prompts: Sequence[str], targets: Sequence[str], micro_batch: int | None = None,
               max_length: int | None | str = "hparams",
               subjects: Sequence[str | None] | None = None) -> list[MicroBatch]:
        """Micro-batches of ``prompt + target``; ``max_length`` defaults to ``hparams.max_length`` (None: no cut).
        Pass the requests' ``subjects`` for batches that are cached (the edit prompts): with ``hparams.key_positions``
        ``target+subject`` their last subject tokens become cached rows too."""
        limit = self.hparams.max_length if max_length == "hparams" else max_length
        return encode_micro_batches(self.tok, prompts, targets, max_length=limit,  # type: ignore[arg-type]
                                    micro_batch=micro_batch or self.hparams.cache_batch_size, device=self.device,
                                    subjects=subjects, key_positions=self.hparams.key_positions)

    def lower(self, mbs: Sequence[MicroBatch]) -> None:
        """Run the frozen lower layers once per micro-batch (no grad) and keep the result on the batch."""
        for mb in mbs:
            if mb.hidden is None:
                mb.hidden = self.lower_one(mb)

    def lower_one(self, mb: MicroBatch) -> torch.Tensor:
        """The hidden state entering the first edited layer for one micro-batch (not stored)."""
        dtype = next(self.model.parameters()).dtype
        if self.lower_stack is not None:
            return self.lower_stack.lower(mb.input_ids, mb.attention_mask).to(dtype)
        return self.stack.lower(mb.input_ids, mb.attention_mask)

    def cache(self, mbs: Sequence[MicroBatch], *, keep_hidden: bool = True,
              spill: bool | None = None) -> KeyGradCache:
        """Inputs and output gradients of every edited module over ``mbs``. ``keep_hidden``: store each batch's
        lower-layer output on it for reuse (the trainer and evaluator need it); False computes it per batch and
        drops it, so only one batch's activations are resident. ``spill`` (default ``hparams.cache_spill``, off
        for hparams without it) writes the rows to disk shards (see
        :class:`~easyedit_agrade.core.cache.KeyGradCache`); close the cache when done."""
        if keep_hidden:
            self.lower(mbs)
            hidden: Sequence[torch.Tensor] = [mb.hidden for mb in mbs]  # type: ignore[misc]
        else:
            hidden = _LazyHidden(self, mbs)
        spill = bool(getattr(self.hparams, "cache_spill", False)) if spill is None else spill
        target = KeyGradCache(self.stack.module_names, spill=spill,
                              spill_root=getattr(self.hparams, "cache_spill_dir", None)) if spill else None
        return cache_keys_and_grads(self.stack, [mb.cache_tuple() for mb in mbs], hidden=hidden, dtype=self.dtype,
                                    cache=target)


class _LazyHidden:
    """``hidden[i]`` computed on demand (not stored) — the cache pass then holds one batch's activations."""

    def __init__(self, editor: HypernetEditor, mbs: Sequence[MicroBatch]) -> None:
        self.editor, self.mbs = editor, mbs

    def __len__(self) -> int:
        return len(self.mbs)

    def __getitem__(self, i: int) -> torch.Tensor:
        mb = self.mbs[i]
        return mb.hidden if mb.hidden is not None else self.editor.lower_one(mb)
