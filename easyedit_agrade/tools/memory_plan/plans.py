"""The memory plan of one editing or training run on one rank: the byte terms tagged with the phases in which they
are alive (:class:`Term`, :class:`MemoryPlan`), assembled by :func:`editing_plan` and :func:`training_plan`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .byte_terms import (
    adam_state_bytes, apply_bytes, cache_bytes, cache_pass_activation_bytes, delta_bytes,
    delta_leaf_bytes, dtype_bytes, g_rows_bytes, gram_workspace_bytes, hidden_stash_bytes, hypernet_bytes,
    hypernet_grad_bytes, hypernet_workspace_bytes, kept_factor_bytes, kept_rows_bytes, logits_bytes,
    loss_pass_activation_bytes, lower_copy_bytes, lower_copy_setup_bytes, lower_pass_bytes, observe_bytes,
    optimizer_step_bytes, reference_logprob_bytes, solve_method, surrogate_solve_bytes, weights_bytes)
from .model_spec import ModelSpec, Workload

EDIT_PHASES = ("lower", "cache", "solve", "apply")
TRAIN_PHASES = ("setup", "lower", "cache", "observe", "solve", "reference", "loss", "surrogate", "step")
#: the phases of one training step (``setup`` is the one-off construction of the trainer)
STEP_PHASES = TRAIN_PHASES[1:]


# ------------------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Term:
    """One memory term: ``nbytes`` alive during ``phases``; ``scales`` says whether it shrinks with W."""

    key: str
    label: str
    nbytes: int
    phases: tuple[str, ...]
    formula: str
    scales: bool = False


@dataclass
class MemoryPlan:
    """All terms of one run (editing or training) on one rank."""

    mode: str
    spec: ModelSpec
    workload: Workload
    world_size: int
    dtype: str
    micro_batch: int
    rank: int
    method: str
    terms: list[Term] = field(default_factory=list)

    @property
    def phases(self) -> tuple[str, ...]:
        return EDIT_PHASES if self.mode == "edit" else TRAIN_PHASES

    def term(self, key: str) -> Term:
        for t in self.terms:
            if t.key == key:
                return t
        raise KeyError(key)

    def bytes_of(self, key: str) -> int:
        return self.term(key).nbytes

    def phase_bytes(self) -> dict[str, int]:
        """Σ of the terms alive in each phase."""
        return {ph: sum(t.nbytes for t in self.terms if ph in t.phases) for ph in self.phases}

    @property
    def peak(self) -> tuple[int, str]:
        """(bytes, phase) of the largest phase total — the predicted peak of this rank."""
        per = self.phase_bytes()
        phase = max(per, key=lambda p: per[p])
        return per[phase], phase

    @property
    def peak_bytes(self) -> int:
        return self.peak[0]

    @property
    def sum_bytes(self) -> int:
        """Every term at once (an upper bound that ignores that phases do not overlap)."""
        return sum(t.nbytes for t in self.terms)

    def peak_without(self, *keys: str, phases: Sequence[str] | None = None) -> int:
        """The peak over ``phases`` (default: all) with the terms ``keys`` left out (e.g. ``"weights"`` to compare
        with a measured delta after loading)."""
        per = {ph: sum(t.nbytes for t in self.terms if ph in t.phases and t.key not in keys)
               for ph in (phases or self.phases)}
        return max(per.values())


def _common(spec: ModelSpec, workload: Workload, world_size: int, dtype: str | None, micro_batch: int | None,
            rank: int | None, training: bool):
    dtype = dtype or spec.default_dtype
    dtype_bytes(dtype)
    mb = micro_batch or (spec.train_micro_batch if training else spec.edit_micro_batch)
    rank = rank or spec.default_rank
    e_r = workload.edits_per_rank(world_size)
    rows = workload.rows_per_rank(world_size)
    return dtype, mb, rank, e_r, rows, min(mb, e_r)


def editing_plan(spec: ModelSpec, workload: Workload, world_size: int = 1, *, dtype: str | None = None,
                 micro_batch: int | None = None, rank: int | None = None, n_blocks: int = 2,
                 solver: str = "auto") -> MemoryPlan:
    """Per-rank memory of one AGRADE edit of ``workload`` (the executor path: ``AGRADEEditor.edit_deltas`` and
    the in-place apply). Phases: lower (one micro-batch through the frozen layers), cache (its upper-layer pass
    with grad), solve (one module's factorisation, all ΔW so far), apply."""
    dtype, mb, rank, e_r, rows, B = _common(spec, workload, world_size, dtype, micro_batch, rank, False)
    method = solve_method(spec, rows, world_size, solver)
    L_mean, t, L_max = workload.sets()["edit"]
    piece_rows = math.ceil(B * t)  # the streamed path maps one cached piece (one micro-batch) at a time
    all_ph = EDIT_PHASES
    terms = [
        Term("weights", "LM weights", weights_bytes(spec, dtype), all_ph, "N_params·b"),
        Term("hypernet", "hypernetwork params (fp32)", hypernet_bytes(spec, rank, n_blocks), all_ph, "P_h·4"),
        Term("lower_pass", "lower layers, one micro-batch (no grad)", lower_pass_bytes(spec, B, L_max, dtype),
             ("lower",), "B·L·b·(6d+2d_kv+3dff) + B·L²·4", scales=e_r < mb),
        Term("activations", "cache pass activations, one micro-batch (upper layers)",
             cache_pass_activation_bytes(spec, B, L_max, dtype), ("cache",),
             "B·L·[(K−1)·a(L) + 4d + M·S·b + b·(2d+3dff) + d·b]", scales=e_r < mb),
        Term("logits", "logits at target positions, one micro-batch", logits_bytes(spec, B * t, dtype),
             ("cache",), "B·t·V·(b + 4[b≠4] + 12)", scales=e_r < mb),
        Term("cache", "H/∇G cache (fp32, this rank's rows)", cache_bytes(spec, rows), ("lower", "cache", "solve"),
             "M·T_r·(Dh+Dg)·4", scales=True),
        Term("gram", f"Gram/Cholesky workspace ({method})", gram_workspace_bytes(spec, rows, method), ("solve",),
             "7·Dh²·8 + 2·Dh·Dg·8" if method == "primal" else "4·T_r²·4 + 2·T_r·S·4", scales=method == "dual"),
        Term("g_rows", "G rows of the current and previous module", g_rows_bytes(spec, rows, method), ("solve",),
             ("3" if method == "primal" else "2") + "·T_r·Dg·4", scales=True),
        Term("hypernet_ws", "hypernetwork forward (no grad)",
             hypernet_workspace_bytes(spec, piece_rows if method == "primal" else rows, rank, n_blocks),
             ("solve",), "rows·(4S + 2r)·4", scales=True),
        Term("delta", "ΔW, all modules (fp32)", delta_bytes(spec), ("solve", "apply"), "M·Dh·Dg·4"),
        Term("apply", "apply: weight clones + fp32 sums", apply_bytes(spec, dtype), ("apply",),
             "M·Dh·Dg·b + (M or 1)·Dh·Dg·4"),
    ]
    return MemoryPlan("edit", spec, workload, world_size, dtype, mb, rank, method, terms)


def training_plan(spec: ModelSpec, workload: Workload, world_size: int = 1, *, dtype: str | None = None,
                  micro_batch: int | None = None, rank: int | None = None, n_blocks: int = 2,
                  solver: str = "auto", lower_dtype: str | None | bool = True) -> MemoryPlan:
    """Per-rank memory of one AGRADE training step (``AGRADETrainer.train_step``) on ``workload`` (the global
    step batch; each rank takes E_r records). ``lower_dtype=True`` uses ``spec.train_lower_dtype``; a dtype name
    or None overrides it. Steady state: Adam's moments and last step's grads already exist. The ``setup`` phase
    is the one-off construction of the trainer (it matters only with a lower dtype: the deep copy); use
    ``plan.peak_without(phases=STEP_PHASES)`` for the step alone."""
    dtype, mb, rank, e_r, rows, B = _common(spec, workload, world_size, dtype, micro_batch, rank, True)
    method = solve_method(spec, rows, world_size, solver)
    low = spec.train_lower_dtype if lower_dtype is True else (lower_dtype or None)
    sets = workload.sets()
    stash_tokens = e_r * sum(L for L, _t, _m in sets.values())
    L_edit, t_edit, Lmax_edit = sets["edit"]
    t_loc = sets["loc"][1]
    loss_act = max(loss_pass_activation_bytes(spec, B, Lm, dtype) + logits_bytes(spec, B * t, dtype, training=True)
                   for _L, t, Lm in sets.values())
    every = TRAIN_PHASES
    step = STEP_PHASES
    kept = ("solve", "reference", "loss", "surrogate")
    terms = [
        Term("weights", "LM weights", weights_bytes(spec, dtype), every, "N_params·b"),
        Term("lower_copy_setup", "setup only: deep copy of the LM before its cast to the lower dtype",
             lower_copy_setup_bytes(spec, dtype, low), ("setup",), "N_params·b + V·d·b_lower"),
        Term("lower_copy", f"LM copy for the frozen lower layers ({low or '-'})", lower_copy_bytes(spec, low), step,
             "N_params·b_lower"),
        Term("hypernet", "hypernetwork params (fp32)", hypernet_bytes(spec, rank, n_blocks), every, "P_h·4"),
        Term("adam", "Adam state (2 × params, fp32)", adam_state_bytes(spec, rank, n_blocks), step, "2·P_h·4"),
        Term("hypernet_grad", "hypernetwork grads (fp32)", hypernet_grad_bytes(spec, rank, n_blocks), step,
             "P_h·4"),
        Term("stash", "lower-layer outputs kept (edit + paraphrase + locality)",
             hidden_stash_bytes(spec, stash_tokens, dtype), step, "E_r·ΣL·d·b", scales=True),
        Term("lower_pass", "lower layers, one micro-batch (no grad)",
             lower_pass_bytes(spec, B, max(m for _L, _t, m in sets.values()), dtype), ("lower",),
             "B·L·b·(6d+2d_kv+3dff) + B·L²·4", scales=e_r < mb),
        Term("activations", "cache pass activations, one micro-batch (upper layers)",
             cache_pass_activation_bytes(spec, B, Lmax_edit, dtype) + logits_bytes(spec, B * t_edit, dtype),
             ("cache",), "B·L·[(K−1)·a(L) + M·S·b + …] + logits", scales=e_r < mb),
        Term("cache", "H/∇G cache (fp32, this rank's rows)", cache_bytes(spec, rows),
             ("cache", "observe") + kept, "M·T_r·(Dh+Dg)·4", scales=True),
        Term("observe", "normaliser update, one module", observe_bytes(spec, rows), ("observe",),
             "4·T_r·S·4", scales=True),
        Term("kept_rows", "per-module H, ∇G, G (+ fp64 H) kept for eq 6/7", kept_rows_bytes(spec, rows, method),
             kept, "M·T_r·((Dh+3Dg)·4 + Dh·8)" if method == "primal" else "M·T_r·(Dh+2Dg)·4", scales=True),
        Term("kept_factors", "factorisations of earlier modules", kept_factor_bytes(spec, rows, method), kept,
             "(M−1)·Dh²·8" if method == "primal" else "(M−1)·T_r²·4", scales=method == "dual"),
        Term("gram", f"Gram/Cholesky workspace ({method})",
             gram_workspace_bytes(spec, rows, method, training=True), ("solve",),
             "6·Dh²·8 + 2·Dh·Dg·8" if method == "primal" else "3·T_r²·4", scales=method == "dual"),
        Term("g_rows", "G pieces of the current and previous module",
             g_rows_bytes(spec, rows, method) if method == "primal" else 0, ("solve",), "3·T_r·Dg·4 (streamed)",
             scales=True),
        Term("hypernet_ws", "hypernetwork forward (no grad)",
             hypernet_workspace_bytes(spec, math.ceil(B * t_edit) if method == "primal" else rows, rank, n_blocks),
             ("solve",), "rows·(4S + 2r)·4", scales=True),
        Term("delta", "ΔW, all modules (fp32)", delta_bytes(spec), kept, "M·Dh·Dg·4"),
        Term("ref_logprobs", "unedited log-probs at locality targets", reference_logprob_bytes(spec, e_r * t_loc),
             ("reference", "loss", "surrogate"), "E_r·t_loc·V·4", scales=True),
        Term("delta_leaves", "ΔW leaves + g_θ (fp32)", delta_leaf_bytes(spec), ("loss", "surrogate"),
             "2·M·Dh·Dg·4"),
        Term("loss_activations", "loss pass, one micro-batch (activations + logits)", loss_act, ("loss",),
             "B·L·[(K−1)·a(L) + M·S·4 + …] + logits", scales=e_r < mb),
        Term("surrogate", "eq 6 solve + hypernetwork with grad, one module",
             surrogate_solve_bytes(spec, rows, method)
             + hypernet_workspace_bytes(spec, rows, rank, n_blocks, grad=True), ("surrogate",),
             ("(4·Dh·Dg + 2·T_r·Dg)·8" if method == "primal" else "(2·Dh·Dg + 2·T_r·Dg)·4")
             + " + T_r·(nb(2S+r)+3S+2Dg)·4", scales=True),
        Term("opt_step", "optimiser step temporaries", optimizer_step_bytes(spec, rank, n_blocks, world_size),
             ("step",), "2·P_h·4 (+ P_h·4 flat all-reduce buffer if W>1)"),
    ]
    return MemoryPlan("train", spec, workload, world_size, dtype, mb, rank, method, terms)


def plans_for(spec: ModelSpec, workload: Workload, world_sizes: Iterable[int],
              **kw: Any) -> dict[str, list[MemoryPlan]]:
    """``{"edit": [...], "train": [...]}`` for each world size."""
    train_kw = dict(kw)
    edit_kw = {k: v for k, v in kw.items() if k != "lower_dtype"}
    ws = list(world_sizes)
    return {"edit": [editing_plan(spec, workload, w, **edit_kw) for w in ws],
            "train": [training_plan(spec, workload, w, **train_kw) for w in ws]}
