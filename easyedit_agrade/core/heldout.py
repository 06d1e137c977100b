"""Held-out perplexity of an edited model, measured cheaply while an edit is being computed (the perplexity guard).

A hypernetwork editor only changes modules at or above its first edited layer, so the layers below run once per
window of held-out text (:meth:`HeldOutText.nll` reuses their output for every candidate ΔW) and a candidate's
perplexity costs one pass through the upper layers and the head, with the ΔW added through
:func:`~easyedit_agrade.core.weights.added_deltas` (weights never written).

The text is *statistics* text — by default windows of the key-statistics corpus (``wiki.valid.tokens``) spread
evenly over the text after the tokens the preserved-knowledge term's C₀ was computed from
(:func:`~easyedit_agrade.core.tokenize.spread_windows`: 16 contiguous windows are one or two articles, and their
ratio under-read a wide sample's by a quarter to a third in log space, docs/agrade.md) — never the perplexity test
text (``wiki.test.tokens``), so a guard chosen on it is not chosen on the evaluation.

:func:`largest_step_within_perplexity` is the guard's search: the largest step t ∈ [0, 1] of a candidate ΔW (on
top of edits already accepted) whose held-out perplexity stays within a ratio of the reference — bisection, since
perplexity is measured, not modelled.

Data-parallel: each rank scores its shard of the windows and the NLL sums and token counts are all-reduced, so
every rank takes the same decisions.

:data:`HELDOUT_STORE` keeps, per model object, what a later executor call can reuse: the tokenised windows, the
lower layers' output for them and the reference NLL. Reuse is decided by content, never by object identity alone:
a SHA-256 of the lower layers' parameters and buffers (and of the whole model for the reference) plus the forward
hooks registered on the model — so a weight written through ``.data`` (which bumps no version counter), a hook
added or removed, or another tokenizer always measures again. Sequential editing writes the edited upper layers
only, so the lower pass is reused and the reference is measured again; edit → evaluate → restore reuses both.
"""
from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn.modules import module as _module_mod

from .checkpoint import tensor_digest
from .weights import added_deltas


@dataclass
class HeldOutText:
    """Token windows of held-out text with the hidden state entering the first edited layer for each micro-batch
    of windows (computed once). ``nll(deltas)`` is the mean next-token NLL over all ranks' windows with ``deltas``
    added to the edited modules."""

    stack: object  # core.cache.LayerStack of the editor
    batches: list  # [(input_ids (b, L), hidden entering layer `first`)] of this rank's windows
    collective: object = None

    @classmethod
    def from_windows(cls, editor, windows: torch.Tensor, collective=None, micro_batch: int = 4) -> "HeldOutText":
        """This rank's shard of ``windows`` (``(n, L)`` token ids; ``collective``: a
        :class:`~easyedit_agrade.distributed.Collective`, None = one process), lower layers run once per
        ``micro_batch`` windows (the head's logits for b·L positions are held at once)."""
        everything = list(range(windows.shape[0]))
        mine = everything if collective is None else collective.shard(everything)
        batches = []
        for start in range(0, len(mine), micro_batch):
            ids = windows[mine[start:start + micro_batch]].to(editor.device)
            batches.append((ids, editor.lower_one(_Windows(ids))))
        return cls(editor.stack, batches, collective)

    @torch.no_grad()
    def nll(self, deltas: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean next-token NLL (nats) of the held-out windows, with ``deltas`` (editor layout, per module) added."""
        totals = torch.zeros(2, dtype=torch.float64)
        with added_deltas(self.stack.model, dict(deltas or {})):
            for ids, hidden in self.batches:
                mask = torch.ones_like(ids, dtype=torch.bool)
                mask[:, -1] = False  # the last position predicts nothing inside the window
                logits = self.stack.upper(hidden, ids, torch.ones_like(ids), mask)
                logits = logits if logits.dtype == torch.float64 else logits.float()
                totals[0] += float(torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1),
                                                                     reduction="sum"))
                totals[1] += ids[:, 1:].numel()
        if self.collective is not None:
            self.collective.all_reduce_(totals)
        if totals[1] <= 0:
            raise ValueError("no held-out tokens to score")
        return float(totals[0] / totals[1])


def state_digests(model: nn.Module, upper_prefixes: tuple[str, ...]) -> tuple[str, str]:
    """(lower, full): SHA-256 over the named parameters and buffers of ``model`` outside ``upper_prefixes``
    (:func:`upper_prefixes`) and over all of them, each with
    the names and keys of the forward (pre-)hooks registered on those modules and globally. Tied tensors count
    once (``named_parameters`` drops duplicates)."""
    lower, full = hashlib.sha256(), hashlib.sha256()
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, t in sorted(named, key=lambda item: item[0]):
        digest = tensor_digest({name: t}).encode()
        full.update(digest)
        if not name.startswith(upper_prefixes):
            lower.update(digest)
    for name, module in model.named_modules():
        hooks = (tuple(module._forward_pre_hooks), tuple(module._forward_hooks))
        if any(hooks):
            line = f"{name}\0{hooks}\0".encode()
            full.update(line)
            if not (name + ".").startswith(upper_prefixes):
                lower.update(line)
    globals_ = f"{tuple(_module_mod._global_forward_pre_hooks)}{tuple(_module_mod._global_forward_hooks)}".encode()
    lower.update(globals_)
    full.update(globals_)
    return lower.hexdigest(), full.hexdigest()


def upper_prefixes(stack) -> tuple[str, ...]:
    """Name prefixes of the decoder layers at or above ``stack``'s first edited layer: what an edit changes and
    the lower pass never reads. Everything else (embeddings, lower layers, final norm, head) counts as lower —
    conservative: a change there always measures again."""
    return tuple(f"{stack.layers_path}.{i}." for i in range(stack.first, len(stack.layers)))


class HeldOutStore:
    """Per model object (weakly held; at most ``max_entries``): the perplexity guard's windows, lower-layer
    outputs and reference NLL, reused across editors while the model's content (:func:`state_digests`) is
    unchanged. Thread-safe; data-parallel ranks agree on every reuse (one all-reduce of a miss flag)."""

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._windows: OrderedDict[tuple, tuple[Any, torch.Tensor]] = OrderedDict()
        self._texts: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        #: counters for tests and reports: lower passes run / reused, references measured / reused
        self.stats = {"lower_runs": 0, "lower_reused": 0, "reference_runs": 0, "reference_reused": 0}

    def clear(self) -> None:
        """Forget everything kept and zero the counters."""
        with self._lock:
            self._windows.clear()
            self._texts.clear()
            self.stats = dict.fromkeys(self.stats, 0)

    def _put(self, table: OrderedDict, key: tuple, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def windows(self, tok, path, *, n_windows: int, window: int, skip: int) -> torch.Tensor:
        """:func:`~easyedit_agrade.core.tokenize.spread_windows`, tokenised once per tokenizer object, file
        version (path, inode, size, mtime) and layout."""
        from .archive_cache import file_identity
        from .tokenize import spread_windows

        key = (id(tok), len(tok), file_identity(path), int(n_windows), int(window), int(skip))
        with self._lock:
            hit = self._windows.get(key)
            if hit is not None and hit[0]() is tok:
                self._windows.move_to_end(key)
                return hit[1]
        ids = spread_windows(tok, path, n_windows=n_windows, window=window, skip=skip)
        with self._lock:
            self._put(self._windows, key, (weakref.ref(tok), ids))
        return ids

    def text_and_reference(self, editor, windows: torch.Tensor, collective=None,
                           micro_batch: int = 4) -> tuple[HeldOutText, float]:
        """(this rank's :class:`HeldOutText` on ``editor``'s model, reference NLL of the model as it is now),
        the lower pass and the reference reused when the model's content equals that of an earlier call (never with
        a low-precision lower copy, ``editor.lower_stack``)."""
        if getattr(editor, "lower_stack", None) is not None:  # a separate low-precision copy: nothing kept
            text = HeldOutText.from_windows(editor, windows, collective, micro_batch=micro_batch)
            return text, text.nll()
        model = editor.stack.model
        rank, world = (collective.rank, collective.world_size) if collective is not None else (0, 1)
        key = (id(model), hashlib.sha256(windows.numpy().tobytes()).hexdigest(), tuple(editor.stack.module_names),
               rank, world, int(micro_batch), str(editor.device))
        lower_digest, full_digest = state_digests(model, upper_prefixes(editor.stack))
        with self._lock:
            entry = self._texts.get(key)
            if entry is not None and entry["model"]() is not model:
                entry = None
        lower_ok = entry is not None and entry["lower"] == lower_digest
        ref_ok = lower_ok and entry["full"] == full_digest
        if collective is not None and collective.is_distributed:  # every rank reuses, or none does
            misses = torch.tensor([float(not lower_ok), float(not ref_ok)], dtype=torch.float64)
            collective.all_reduce_(misses)
            lower_ok, ref_ok = bool(misses[0] == 0), bool(misses[1] == 0)
        if lower_ok:
            text = HeldOutText(editor.stack, entry["batches"], collective)
        else:
            text = HeldOutText.from_windows(editor, windows, collective, micro_batch=micro_batch)
        reference = entry["reference"] if ref_ok else text.nll()
        with self._lock:
            self.stats["lower_reused" if lower_ok else "lower_runs"] += 1
            self.stats["reference_reused" if ref_ok else "reference_runs"] += 1
            self._put(self._texts, key, {"model": weakref.ref(model), "lower": lower_digest, "full": full_digest,
                                         "batches": text.batches, "reference": reference})
        return text, reference


#: the process-wide store the AGRADE editor's perplexity guard uses
HELDOUT_STORE = HeldOutStore()


class _Windows:
    """The two fields of a micro-batch that :meth:`HypernetEditor.lower_one` reads."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.input_ids, self.attention_mask = ids, torch.ones_like(ids)


def combined(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], t: float) -> dict:
    """``base + t·delta`` per module (modules of either)."""
    out = dict(base)
    for name, d in delta.items():
        out[name] = t * d if name not in out else out[name] + t * d
    return out


def largest_step_within_perplexity(nll: Callable[[Mapping[str, torch.Tensor]], float], reference_nll: float,
                                   base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                                   max_ratio: float, search_steps: int) -> tuple[float, float]:
    """(t, perplexity ratio at t): the largest step t ∈ [0, 1] found with exp(nll(base + t·delta) − reference) ≤
    ``max_ratio``. t = 1 is tried first (one evaluation when it fits); otherwise ``search_steps`` bisection steps
    on [0, 1] (t is a multiple of 2^−search_steps; 0 when none of the tried steps fits). ``base`` is assumed within
    the limit (its ratio is measured only when t = 0 is returned)."""
    if search_steps < 0:
        raise ValueError(f"search_steps must be >= 0, got {search_steps}")
    limit = math.log(max_ratio)
    full = nll(combined(base, delta, 1.0)) - reference_nll
    if full <= limit:
        return 1.0, math.exp(full)
    lo, hi, at_lo = 0.0, 1.0, None
    for _ in range(search_steps):
        mid = 0.5 * (lo + hi)
        value = nll(combined(base, delta, mid)) - reference_nll
        if value <= limit:
            lo, at_lo = mid, value
        else:
            hi = mid
    if at_lo is None:  # nothing of delta fits: report where base alone is
        at_lo = nll(dict(base)) - reference_nll
    return lo, math.exp(at_lo)
