"""The AGRADE editing pipeline, shared by the executor (``apply_agrade_to_model``) and the trainer.

requests → tokenised micro-batches (target mask, label shift) → layers below the first edited one, once, without
grad → cache pass (summed CE; hooks give H and ∇G per module on target-predicting positions) → hypernetwork
(H̃, ∇G̃) → eqs 1–2 → eq 4 against the previous module's final G → eq 3 factorisation → eq 5 ΔW.

Two ways through eqs 1–5 (:meth:`AGRADEEditor.compute` picks one; they agree to rounding, tested):

* **in memory** — the module's rows are concatenated and factored with :func:`~easyedit_agrade.kernels.factorize`
  (the T×T dual form when T < Dh): the fast path for ordinary batches;
* **streamed** — taken for data-parallel editing (a :class:`~easyedit_agrade.distributed.Collective` with several
  ranks), a spilled cache, or when the primal form is chosen anyway (T ≥ Dh, e.g. thousands of edits). Each
  cached piece (one micro-batch of rows) goes through the hypernetwork and eqs 1–2 on its own; HᵀH, HᵀG and
  eq 4's inner products are accumulated piece by piece and summed over ranks; M is factored from the summed
  Gram (:func:`~easyedit_agrade.kernels.factorize_gram`) and ΔW = M⁻¹(HᵀG). Memory beyond the cache of rows is
  O(Dh² + Dh·Dg + piece) per module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ...core.cache import KeyGradCache, LayerStack
from ...core.editor_base import HypernetEditor, MicroBatch, encode_micro_batches  # noqa: F401 (re-exported)
from ...core.heldout import HELDOUT_STORE, HeldOutText, largest_step_within_perplexity
from ...core.hypernet import EditorNetworks
from ...core.weights import added_deltas
from ...distributed.collective import Collective
from ...kernels import choose_method
from ...kernels.preserved import PreservedKeys
from . import equations as eq
from .outliers import out_of_distribution_rows, row_norm_median, suppress_massive_rows, suppress_rows
from .agrade_hparams import AGRADEHyperParams, Switches


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
    key_reference: torch.Tensor | None = None  # median row norm for the massive-row check (global over ranks)


@dataclass
class EditResult:
    deltas: dict[str, torch.Tensor]
    modules: list[ModuleEdit] = field(default_factory=list)
    cache_loss: float = 0.0
    n_tokens: int = 0
    #: per module, the predicted relative output change on ordinary-text keys (see
    #: :meth:`AGRADEEditor.preserved_output_change`; empty without key statistics)
    preserved_change: dict[str, float] = field(default_factory=dict)
    #: per module, what ``preserved_change_budget`` added to log μ (0: the learned μ + log_mu_offset)
    mu_shift: dict[str, float] = field(default_factory=dict)
    #: with ``edit_rounds`` > 1: per cache pass, the edit prompts' target-token accuracy before that round and
    #: whether the round was solved (False: it had reached ``rounds_stop_accuracy``); with the perplexity guard
    #: (``max_heldout_ppl_ratio``) also the step the round's ΔW was scaled by and the held-out perplexity ratio
    #: after it (``step``, ``heldout_ppl_ratio``)
    rounds: list[dict] = field(default_factory=list)
    #: with ``value_source: optimized``: the value search (steps, mean target NLL before/after, converged requests)
    #: and the share of the values the solve placed (``met_median``, ``met_q10``: :func:`.values.met_share`)
    values: dict = field(default_factory=dict)


#: at most this many +1 steps of log μ under ``preserved_change_budget`` (e^16 ≈ 9·10⁶ times the learned μ)
MU_BUDGET_STEPS = 16
#: ``value_source: optimized`` warns when its solve places less than this median share of the values (one pass at
#: ~2,000 CounterFact edits places 0.53–0.58 and leaves a third of the edits untaken; 256 edits place most of each)
LOW_MET_SHARE = 0.5


class PreservedChangeError(RuntimeError):
    """An edit would change the edited modules' outputs on ordinary text by more than ``max_preserved_change``."""


class AGRADEEditor(HypernetEditor):
    """Computes AGRADE weight edits for a model with a given :class:`EditorNetworks` (encoding, lower layers and
    the H/∇G cache: :class:`~easyedit_agrade.core.editor_base.HypernetEditor`)."""

    def __init__(self, model: nn.Module, tok, hparams: AGRADEHyperParams, nets: EditorNetworks,
                 stage_nets: EditorNetworks | None = None) -> None:
        """``stage_nets``: the trained network of ``hparams.network_stage`` (default: loaded from its archive)."""
        super().__init__(model, tok, hparams, nets)
        self.switches: Switches = hparams.switches()
        #: True while :meth:`edit_in_rounds` solves round 2 or later (the guard counters count round 1 only)
        self.later_round = False
        #: C₀ per module (key statistics; loaded for the preserved-knowledge term or the output-change guard) and
        #: its eigendecomposition on the kept basis (None: eq 3 without the term)
        self.second_moments: dict[str, torch.Tensor] | None = None
        self.preserved: dict[str, PreservedKeys] | None = None
        #: the perplexity guard's held-out text and reference NLL, per (rank, world size); built on first use
        self._heldout: tuple[tuple[int, int], HeldOutText, float] | None = None
        if (hparams.uses_preserved_keys() or getattr(hparams, "max_preserved_change", None) is not None
                or self.optimized_values):
            self.second_moments, keys = preserved_keys_for(model, tok, hparams)
            self.preserved = keys if hparams.uses_preserved_keys() else None
        #: ``hparams.network_stage``: the editor of the network edit that follows the value edit (same class)
        self.network_stage: AGRADEEditor | None = None
        stage_hp = hparams.network_stage_hparams() if hasattr(hparams, "network_stage_hparams") else None
        if stage_hp is not None:
            if stage_nets is None:
                from .archive import find_archive, load_networks

                stage_nets = load_networks(str(find_archive(model, stage_hp)), model, stage_hp, dtype=self.dtype)
            self.network_stage = type(self)(model, tok, stage_hp, stage_nets)

    def module_G(self, name: str, H: torch.Tensor, grad: torch.Tensor, G_prev: torch.Tensor | None,
                 collective: Collective | None = None,
                 key_reference: torch.Tensor | None = None) -> torch.Tensor:
        """Eqs 1, 2 and 4 for one module (differentiable w.r.t. the hypernetwork and η). With a multi-rank
        ``collective`` eq 4's inner products are summed over ranks (differentiably)."""
        G = self.adjusted_gradient(name, H, grad, key_reference)
        if self.switches.weight_projection:
            reduce = collective.all_reduce if collective is not None and collective.is_distributed else None
            G = eq.eq4_project_out(G, G_prev, all_reduce=reduce, backend=self.hparams.kernels_backend)
        return G

    def adjusted_gradient(self, name: str, H: torch.Tensor, grad: torch.Tensor,
                          key_reference: torch.Tensor | None = None) -> torch.Tensor:
        """Eqs 1–2 (G = ∇G̃ without the adjustment ablation) — row-wise, so rows may be processed in pieces.
        Rows of massive activations (norm above ``hparams.max_key_norm_ratio`` × ``key_reference``, by default
        the median row norm of ``H``; pass the median over *all* rows when ``H`` is one piece) get G = 0, and so do
        rows outside the frozen normaliser's distribution (``hparams.max_row_zscore``; not while training): see
        :mod:`.outliers`."""
        H_tilde, grad_tilde = self.nets(name, H, grad)
        net = self.nets.net(name)
        if self.switches.adjustment:
            eta = self.nets.lr(name)
            factor = float(getattr(self.hparams, "eta_factor", 1.0))
            if factor != 1.0 and not net.training:  # hparams.eta_factor: editing only, never in training
                eta = eta * factor
            G = eq.eq1_eq2_adjusted_gradient(H, H_tilde, grad_tilde, eta, backend=self.hparams.kernels_backend)
        else:
            G = grad_tilde
        G = suppress_massive_rows(G, H, getattr(self.hparams, "max_key_norm_ratio", None), key_reference)
        if not net.training:  # frozen normaliser: editing and validation (see outliers.out_of_distribution_rows)
            G = suppress_rows(G, out_of_distribution_rows(net.normalizer, H, grad,
                                                          getattr(self.hparams, "max_row_zscore", None)))
        return G

    def ridge_log_lambda(self, name: str) -> torch.Tensor | None:
        """λ of eq 3 for ``name`` (None under the no-regularisation ablation). When editing (network in eval mode)
        ``hparams.log_lambda_offset`` is added: a stronger ridge for batches far larger or other than the ones the
        network was trained on (see docs/agrade.md, *Large mixed batches*); training uses the learned λ alone."""
        if not self.switches.regularization:
            return None
        log_lambda = self.nets.log_lambda(name)
        offset = float(getattr(self.hparams, "log_lambda_offset", 0.0) or 0.0)
        if offset and not self.nets.net(name).training:
            log_lambda = log_lambda + offset
        return log_lambda

    def ridge_log_mu(self, name: str) -> torch.Tensor | float | None:
        """log μ of the preserved-knowledge term for ``name`` (None: no e^μ C₀ term). The network's learned μ when
        it has one, else ``hparams.log_mu_init``; ``hparams.log_mu_offset`` is added when editing (eval mode)."""
        if not getattr(self.hparams, "use_preserved_cov", False):
            return None
        log_mu = self.nets.log_mu(name)
        if log_mu is None:
            log_mu = torch.tensor(float(self.hparams.log_mu_init), dtype=torch.float64)
        offset = float(getattr(self.hparams, "log_mu_offset", 0.0) or 0.0)
        if offset and not self.nets.net(name).training:
            log_mu = log_mu + offset
        return log_mu

    def factorize(self, name: str, H: torch.Tensor, gram: torch.Tensor | None = None, log_mu_shift: float = 0.0):
        """Eq 3 for module ``name`` with its λ (and, when on, the preserved-knowledge term, log μ + ``log_mu_shift``):
        from the rows ``H``, or — streamed / data-parallel — from the summed ``gram`` with ``H`` the local rows."""
        log_lambda = self.ridge_log_lambda(name)
        preserved = None if self.preserved is None else self.preserved[name]
        log_mu = self.ridge_log_mu(name)
        if log_mu is not None and log_mu_shift:
            log_mu = log_mu + log_mu_shift
        if gram is not None:
            return eq.eq3_factorize_gram(gram, log_lambda, H, preserved=preserved, log_mu=log_mu)
        return eq.eq3_factorize(H, log_lambda, method=self.hparams.solver, backend=self.hparams.kernels_backend,
                                preserved=preserved, log_mu=log_mu)

    def solve_module(self, name: str, H: torch.Tensor, *, G: torch.Tensor | None = None,
                     gram: torch.Tensor | None = None, rhs: torch.Tensor | None = None,
                     earlier: dict[str, torch.Tensor] | None = None):
        """Eqs 3 and 5 for one module → (factorisation, ΔW, log μ shift used): ΔW = M⁻¹HᵀG from the rows (``H``,
        ``G``) or from the summed ``gram`` and ``rhs`` = HᵀG. When editing with ``hparams.preserved_change_budget``,
        log μ is raised in steps of 1 (at most ``MU_BUDGET_STEPS``) until the predicted output change on
        ordinary-text keys, tr(ΔWᵀC₀ΔW)/tr(WᵀC₀W), is within the budget: larger batches get a stronger
        preserved-knowledge term, instead of a fixed one tuned for one batch size. In a later round of
        ``edit_rounds`` (``earlier``: the earlier rounds' summed ΔW per module) the budget bounds that sum plus
        this round's ΔW (the weights are not written between rounds, so tr(WᵀC₀W) is the one before round 1)."""
        budget = getattr(self.hparams, "preserved_change_budget", None)
        adapt = (budget is not None and self.second_moments is not None and self.ridge_log_mu(name) is not None
                 and not self.nets.net(name).training)
        shift = 0.0
        prior = None if earlier is None else earlier.get(name)
        if adapt:  # tr(WᵀC₀W), the denominator of every step's ratio: once per module
            C0 = self.second_moments[name]
            reference = output_energy(C0, editor_layout_weight(self.model, name))
        for step in range(MU_BUDGET_STEPS + 1):
            shift = float(step)
            fact = self.factorize(name, H, gram=gram, log_mu_shift=shift)
            delta = (eq.eq5_delta_from_rhs(fact, rhs) if gram is not None else eq.eq5_delta(fact, G)).to(self.dtype)
            if not bool(torch.isfinite(delta).all()):
                raise FloatingPointError(f"AGRADE produced a non-finite ΔW for {name} (solver info {fact.info})")
            if not adapt or output_energy(C0, delta if prior is None else prior + delta) / reference <= budget:
                break
        else:
            if prior is not None:  # a later round still over the budget at the largest μ: only the part that fits
                delta = delta * largest_step_within(C0, prior, delta, budget * reference)
        return fact, delta, shift

    def use_streamed(self, cache: KeyGradCache, collective: Collective | None = None) -> bool:
        """Whether :meth:`compute` takes the streamed path (see the module docstring)."""
        if (collective is not None and collective.is_distributed) or cache.spill:
            return True
        if self.hparams.solver == "dual":
            return False
        name = self.stack.module_names[0]
        T, Dh = cache.n_rows(name), self.stack.sizes()[0][1]
        return self.hparams.solver == "primal" or choose_method(T, Dh) == "primal"

    @torch.no_grad()
    def compute(self, cache: KeyGradCache, collective: Collective | None = None,
                keep_modules: bool = True, earlier: dict[str, torch.Tensor] | None = None) -> EditResult:
        """ΔW for every edited module (no grad). Modules are processed in layer order; eq 4 uses the previous
        module's final G when the shapes agree (modules of another width are not projected). With a multi-rank
        ``collective`` every rank passes its own shard's cache and gets the same ΔW. ``keep_modules=False``
        (editing) drops the per-module rows the trainer needs; ``earlier``: a later round of ``edit_rounds``."""
        if self.use_streamed(cache, collective):
            return self.compute_streamed(cache, collective or Collective(), keep_modules=keep_modules,
                                         earlier=earlier)
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
            fact, delta, result.mu_shift[name] = self.solve_module(name, H, G=G, earlier=earlier)
            result.deltas[name] = delta
            if keep_modules:
                result.modules.append(ModuleEdit(name, H, grad, G, prev, fact, delta))
            G_prev = G
        return result

    @torch.no_grad()
    def compute_streamed(self, cache: KeyGradCache, collective: Collective,
                         keep_modules: bool = True, earlier: dict[str, torch.Tensor] | None = None) -> EditResult:
        """The streamed / data-parallel path of :meth:`compute` (module docstring): per module, pass 1 maps each
        cached piece through eqs 1–2 and accumulates HᵀH and eq 4's inner products; they are summed over ranks;
        pass 2 applies eq 4 piece by piece and accumulates HᵀG (summed over ranks); eq 3 is factored from the
        global Gram and eq 5 solved on every rank. Only the previous module's G pieces are kept (on disk when
        the cache spills)."""
        dev = self.device
        loss = torch.tensor([float(sum(cache.losses)), float(cache.n_rows(self.stack.module_names[0]))],
                            dtype=torch.float64)
        collective.all_reduce_(loss)
        result = EditResult(deltas={}, cache_loss=float(loss[0]), n_tokens=int(loss[1]))
        prev_store: _PieceStore | None = None
        # fp64 sums and factor: the primal form in fp32 is accurate for ΔW but loses the λ gradient
        # −e^λ⟨M⁻¹g_θ, ΔW⟩ to cancellation when e^λ ≪ ‖H‖² (M⁻¹g_θ is dominated by the null space of H, which
        # ΔW is orthogonal to); the dual form avoids that, the primal needs the digits
        acc_dtype = torch.float64
        for name, Dh, Dg in self.stack.sizes():
            store = _PieceStore(cache.spill_dir if cache.spill else None, name)
            project = self.switches.weight_projection and prev_store is not None
            # a rank may hold no rows of a small batch: it still takes part in every all-reduce with zeros
            gram_acc = torch.zeros(Dh, Dh, dtype=acc_dtype, device=dev)
            dots = torch.zeros(2, dtype=torch.float64)
            prev_pieces = prev_store.pieces() if project else None
            # the massive-row check compares with the median over all of this module's rows, as compute() does
            key_ref = (self._global_row_norm_median(cache, name, collective)
                       if getattr(self.hparams, "max_key_norm_ratio", None) is not None else None)
            for H_c, g_c in cache.chunks(name, device=dev):
                H_c, g_c = H_c.to(self.dtype), g_c.to(self.dtype)
                G_c = self.adjusted_gradient(name, H_c, g_c, key_ref)
                eq.eq3_gram(H_c, gram_acc, backend=self.hparams.kernels_backend)
                if prev_pieces is not None:
                    p_c = next(prev_pieces)
                    if p_c.shape != G_c.shape:
                        project, prev_pieces = False, None
                    else:
                        dots += torch.stack(eq.eq4_inner_products(G_c, p_c)).to(torch.float64).cpu()
                store.add(G_c)
            collective.all_reduce_(gram_acc)
            collective.all_reduce_(dots)
            coef = eq.eq4_coefficient(dots[0], dots[1]) if project else None
            coef = None if coef is None else float(coef)
            rhs = torch.zeros(Dh, Dg, dtype=gram_acc.dtype, device=dev)
            final = _PieceStore(cache.spill_dir if cache.spill else None, name + ".final")
            prev_pieces = prev_store.pieces() if coef is not None else None
            for (H_c, _g), G_c in zip(cache.chunks(name, device=dev), store.pieces()):
                if prev_pieces is not None:
                    G_c = eq.eq4_subtract(G_c, next(prev_pieces), coef)
                eq.eq5_rhs(H_c, G_c, rhs)
                final.add(G_c)
            store.close()
            collective.all_reduce_(rhs)
            H_local = grad_local = None
            if keep_modules:
                if cache.n_rows(name):
                    H_local, grad_local = (t.to(self.dtype) for t in cache.get(name))
                else:
                    H_local = torch.zeros(0, Dh, dtype=self.dtype, device=dev)
                    grad_local = torch.zeros(0, Dg, dtype=self.dtype, device=dev)
            # H stays in the editor dtype (its chunks are cast to fp64 inside eq 6's product)
            fact, delta, result.mu_shift[name] = self.solve_module(name, H_local, gram=gram_acc, rhs=rhs,
                                                                   earlier=earlier)
            result.deltas[name] = delta
            if keep_modules:
                G_final = torch.cat([torch.zeros(0, Dg, dtype=self.dtype, device=dev), *final.pieces()])
                G_prev_used = (torch.cat([torch.zeros(0, Dg, dtype=self.dtype, device=dev), *prev_store.pieces()])
                               if coef is not None and prev_store is not None else None)
                result.modules.append(ModuleEdit(name, H_local, grad_local, G_final, G_prev_used, fact, delta,
                                                 key_ref))
            if prev_store is not None:
                prev_store.close()
            prev_store = final
        if prev_store is not None:
            prev_store.close()
        return result

    def _global_row_norm_median(self, cache: KeyGradCache, name: str,
                                collective: Collective) -> torch.Tensor | None:
        """Median row norm of ``name``'s cached H over all pieces and, data-parallel, over all ranks (the row
        norms — T floats — are gathered), so every rank flags the same rows as one process would."""
        if not collective.is_distributed:
            return row_norm_median(cache.chunks(name, device=self.device), self.dtype)
        norms = [h.to(self.dtype).norm(dim=1) for h, _ in cache.chunks(name, device=self.device)]
        local = torch.cat(norms) if norms else torch.zeros(0, dtype=self.dtype, device=self.device)
        every = collective.all_gather_1d(local)
        return every.median() if every.numel() else None

    def edit_deltas(self, prompts: Sequence[str], targets: Sequence[str],
                    collective: Collective | None = None,
                    subjects: Sequence[str | None] | None = None) -> EditResult:
        """Tokenise, cache and compute ΔW for one batch of edits (the hypernetwork is not updated; the model is
        unchanged when this returns). With a multi-rank ``collective`` pass this rank's shard of the edits; every
        rank gets the same ΔW. ``subjects`` (the requests' subjects) are needed by ``key_positions:
        target+subject`` (an error without them). With ``hparams.edit_rounds`` > 1 see :meth:`edit_in_rounds`."""
        if self.optimized_values:
            result = self.edit_with_values(prompts, targets, subjects, collective)
            self.check_preserved_change(result)
            return self.add_network_stage(result, prompts, targets, subjects)
        if self.hparams.key_positions != "target" and subjects is None:
            raise ValueError("key_positions: target+subject needs the requests' subjects (edit_deltas(..., subjects=))")
        result = self.solve(self.encode(prompts, targets, subjects=subjects), collective)
        self.check_preserved_change(result)
        return result

    @property
    def optimized_values(self) -> bool:
        """Whether G comes from the edit-time value search (``value_source: optimized``) instead of the network."""
        return bool(getattr(self.hparams, "uses_value_search", lambda: False)())

    def edit_with_values(self, prompts: Sequence[str], targets: Sequence[str], subjects: Sequence[str | None] | None,
                         collective: Collective | None = None) -> EditResult:
        """ΔW of ``value_source: optimized`` (:mod:`.values`): the requests' values optimised at the last edited
        layer, spread over the edited modules with the preserved-knowledge solve. The model is unchanged when this
        returns."""
        from ...core.preserved_stats import resolve_corpus
        from . import values

        if collective is not None and collective.is_distributed:
            raise NotImplementedError("value_source: optimized is not data-parallel yet: edit in one process")
        if subjects is None or any(not s for s in subjects):
            i = 0 if subjects is None else next(i for i, s in enumerate(subjects) if not s)
            raise ValueError(f"request {i}: value_source: optimized needs every request's subject")
        hp = self.hparams
        prefixes = values.context_prefixes(resolve_corpus(hp.preserved_corpus), int(hp.value_prefixes))
        batches = values.encode_value_batches(self.tok, prompts, targets, subjects, prefixes,
                                              micro_batch=int(hp.cache_batch_size), device=self.device)
        last = self.stack.layer_of[self.stack.module_names[-1]]
        delta, h, info = values.optimise_values(
            self.model, batches, len(prompts), last, steps=int(hp.value_steps), lr=float(hp.value_lr),
            weight_decay=float(hp.value_weight_decay), clamp=float(hp.value_clamp), stop_nll=float(hp.value_stop_nll))
        c0_weight = hp.value_c0_weight(len(prompts))
        deltas = values.spread_values(self.model, batches, len(prompts), self.stack.module_names,
                                      self.stack.layers[last], h + delta, self.second_moments or {},
                                      c0_weight, sweeps=int(hp.value_sweeps))
        info = dict(info, **values.met_summary(values.met_share(self.model, batches, len(prompts),
                                                               self.stack.module_names, self.stack.layers[last],
                                                               h + delta, h, deltas)))
        if info["met_median"] < LOW_MET_SHARE:
            warnings.warn(f"AGRADE: the value solve placed a median {info['met_median']:.2f} of the {len(prompts)} "
                          f"values at layer {last}'s output (C0 weight {c0_weight:g}"
                          f", value_sweeps {int(hp.value_sweeps)}); many of these edits will not take. More "
                          f"value_sweeps, a lower value_preserved_keys/_weight (more damage to ordinary text) or smaller "
                          f"batches place more (docs/agrade_scaling.md, 'Spread sweeps')", RuntimeWarning,
                          stacklevel=3)
        dtype = self.dtype
        return EditResult(deltas={n: d.to(dtype) for n, d in deltas.items()}, cache_loss=float(info["nll_start"]),
                          n_tokens=sum(int(vb.mb.predict_mask[vb.plain.to(self.device)].sum()) for vb in batches),
                          values=info)

    def add_network_stage(self, first: EditResult, prompts: Sequence[str], targets: Sequence[str],
                          subjects: Sequence[str | None] | None) -> EditResult:
        """``first`` plus, with ``hparams.network_stage``, the stage network's ΔW for the same requests computed on
        the model with ``first``'s ΔW added (temporary hooks: the model is unchanged when this returns), summed per
        module; the stage's own guards and preserved-change check apply to its part. ``values["network_stage"]``
        reports the stage's cache loss (the edit prompts' target NLL after the value edit)."""
        if self.network_stage is None:
            return first
        deltas, second = network_stage_deltas(self.model, self.network_stage, first.deltas, prompts, targets, subjects)
        stage = {"modules": len(second.deltas), "cache_loss": second.cache_loss, "n_tokens": second.n_tokens,
                 "eta_factor": float(self.network_stage.hparams.eta_factor)}
        return dataclasses.replace(first, deltas=deltas, preserved_change={**first.preserved_change,
                                                                           **second.preserved_change},
                                   mu_shift=second.mu_shift, values=dict(first.values, network_stage=stage))

    def solve(self, mbs: Sequence[MicroBatch], collective: Collective | None = None) -> EditResult:
        """ΔW for already encoded edit micro-batches, as the executor computes it: one cache pass and solve, or
        :meth:`edit_in_rounds` with ``hparams.edit_rounds`` > 1 or the perplexity guard on. The model is
        unchanged when this returns; :meth:`check_preserved_change` is the caller's."""
        rounds = int(getattr(self.hparams, "edit_rounds", 1))
        if rounds == 1 and not self.heldout_guard_on():
            return self._edit_round(mbs, collective)[0]
        return self.edit_in_rounds(mbs, rounds, collective)

    def heldout_guard_on(self) -> bool:
        """Whether the perplexity guard (``hparams.max_heldout_ppl_ratio``) acts: set, and editing (not training)."""
        return (getattr(self.hparams, "max_heldout_ppl_ratio", None) is not None
                and not self.nets.net(self.stack.module_names[0]).training)

    def heldout_text(self, collective: Collective | None = None) -> tuple[HeldOutText, float]:
        """(held-out text, reference NLL) of the perplexity guard: ``hparams.heldout_windows`` windows of the
        statistics corpus spread evenly over the text after the tokens C₀ uses (:func:`~easyedit_agrade.core.tokenize.
        spread_windows`, :mod:`easyedit_agrade.core.heldout`), and their NLL on the model
        as it is the first time this is called (per rank layout) — until :meth:`reset_heldout_reference`. The
        windows, their lower-layer pass and the reference come from :data:`~easyedit_agrade.core.heldout.
        HELDOUT_STORE` when an earlier editor measured them on a model with the same content."""
        from ...core.preserved_stats import resolve_corpus

        coll = collective or Collective()
        layout = (coll.rank, coll.world_size)
        if self._heldout is None or self._heldout[0] != layout:
            hp = self.hparams
            windows = HELDOUT_STORE.windows(self.tok, resolve_corpus(hp.preserved_corpus),
                                            n_windows=int(hp.heldout_windows), window=int(hp.preserved_window),
                                            skip=int(hp.preserved_tokens))
            text, reference = HELDOUT_STORE.text_and_reference(self, windows, coll)
            self._heldout = (layout, text, reference)
        return self._heldout[1], self._heldout[2]

    def reset_heldout_reference(self) -> None:
        """Measure the perplexity guard's reference again at the next edit (after the model was changed on purpose)."""
        self._heldout = None

    def _edit_round(self, mbs: Sequence[MicroBatch], collective: Collective | None,
                    earlier: dict[str, torch.Tensor] | None = None,
                    stop_accuracy: float | None = None,
                    min_accuracy: float | None = None) -> tuple[EditResult | None, float]:
        """One cache pass + solve on the model as it is → (result, the edit prompts' target-token accuracy before
        the round); result None (nothing solved) when that accuracy is already ``stop_accuracy`` or more, or below
        ``min_accuracy``."""
        cache = self.cache(mbs, keep_hidden=False)
        try:
            accuracy = _reduced_accuracy(cache.n_correct, cache.n_targets, collective)
            if stop_accuracy is not None and accuracy >= stop_accuracy:
                return None, accuracy
            if min_accuracy is not None and accuracy < min_accuracy:
                return None, accuracy
            return self.compute(cache, collective, keep_modules=False, earlier=earlier), accuracy
        finally:
            cache.close()

    @torch.no_grad()
    def target_accuracy(self, mbs: Sequence[MicroBatch], collective: Collective | None = None) -> float:
        """The edit prompts' target-token (argmax) accuracy on the model as it computes now — ΔW hooks included —
        over every rank's micro-batches: what a cache pass measures, forward only."""
        correct = total = 0
        for mb in mbs:
            ids, att, pmask, labels = mb.as_tuple()
            logits = self.stack.upper(self.lower_one(mb), ids, att, pmask)
            wanted = labels[pmask]
            correct += int((logits.argmax(-1) == wanted).sum())
            total += int(wanted.numel())
        return _reduced_accuracy(correct, total, collective)

    def edit_in_rounds(self, mbs: Sequence[MicroBatch], rounds: int,
                       collective: Collective | None = None) -> EditResult:
        """``hparams.edit_rounds`` solves for one batch: round 1 is the one-shot edit; round r > 1 caches H and ∇G
        on the model computing with the earlier rounds' summed ΔW (forward hooks adding x·ΣΔW in fp32 — the
        weights are never written, so 16-bit weights are not rounded and ΔW hooks already on the model stay) —
        the residual of the edit — and solves it with ``preserved_change_budget`` bounding the sum. A round is
        not solved once its cache pass finds the edit prompts' target-token accuracy at ``rounds_stop_accuracy``
        (round 1 always is). The result holds the summed ΔW; ``mu_shift`` is the largest shift of any round,
        ``cache_loss`` / ``n_tokens`` are round 1's. With the perplexity guard (:meth:`heldout_guard_on`, also
        for ``rounds`` = 1) each round's ΔW is scaled by the largest step keeping the held-out perplexity within
        ``max_heldout_ppl_ratio`` × the reference, and a scaled round is the last (:meth:`warn_guarded` says so).
        A later round (2, 3, …) after which the edit prompts' accuracy is *lower* than before it is undone (its
        entry gets ``undone``) and ends the rounds: the residual solve made the edit worse. The next round's cache
        pass measures that accuracy; when no pass follows (the last round, or one the guard scaled) a forward-only
        pass (:meth:`target_accuracy`) does. Round 1 is always kept."""
        stop = getattr(self.hparams, "rounds_stop_accuracy", None)
        guard = self.heldout_text(collective) if self.heldout_guard_on() else None
        earlier: dict[str, torch.Tensor] = {}  # the summed ΔW of the rounds so far
        before_last: dict[str, torch.Tensor] = {}  # the sum before the last solved round
        total: EditResult | None = None
        try:
            for r in range(rounds):
                self.later_round = r > 0
                # a third or later pass also ends the rounds when the last (later) round lowered the accuracy
                floor = total.rounds[-1]["accuracy_before"] if r > 1 else None
                with added_deltas(self.model, earlier) if r else contextlib.nullcontext():
                    result, accuracy = self._edit_round(mbs, collective, earlier if r else None,
                                                        stop if r else None, floor)
                if result is None:
                    assert total is not None
                    total.rounds.append({"accuracy_before": accuracy, "solved": False})
                    break
                entry = {"accuracy_before": accuracy, "solved": True}
                if guard is not None:
                    step, ratio = largest_step_within_perplexity(
                        guard[0].nll, guard[1], earlier, result.deltas, float(self.hparams.max_heldout_ppl_ratio),
                        int(self.hparams.heldout_search_steps))
                    entry.update(step=step, heldout_ppl_ratio=ratio)
                    if step < 1.0:
                        result.deltas = {n: d * step for n, d in result.deltas.items()}
                if total is None:
                    total = result
                else:
                    total.mu_shift = {n: max(total.mu_shift.get(n, 0.0), s) for n, s in result.mu_shift.items()}
                total.rounds.append(entry)
                before_last = dict(earlier)
                for name, delta in result.deltas.items():
                    earlier[name] = delta if name not in earlier else earlier[name] + delta
                if entry.get("step", 1.0) < 1.0:
                    break
            assert total is not None
            solved = [e for e in total.rounds if e["solved"]]
            if len(solved) > 1:  # the last solved round is a later one: did it lower the accuracy?
                last = solved[-1]
                if total.rounds[-1] is last:  # no cache pass followed it: measure, forward only
                    with added_deltas(self.model, earlier):
                        last["accuracy_after"] = self.target_accuracy(mbs, collective)
                    after = last["accuracy_after"]
                else:
                    after = total.rounds[-1]["accuracy_before"]
                if after < last["accuracy_before"]:
                    last["undone"] = True
                    earlier = before_last
        finally:
            self.later_round = False
        total.deltas = earlier
        self.warn_guarded(total)
        return total

    def warn_guarded(self, result: EditResult) -> None:
        """Warn when the perplexity guard scaled a round of ``result`` that was kept (RuntimeWarning; nothing is
        applied here; a scaled round that was then undone for lowering accuracy is not warned about)."""
        scaled = [(i, e) for i, e in enumerate(result.rounds) if e.get("step", 1.0) < 1.0 and not e.get("undone")]
        if not scaled:
            return
        i, e = scaled[0]
        limit = float(self.hparams.max_heldout_ppl_ratio)
        if i == 0 and e["step"] == 0.0:
            warnings.warn(f"AGRADE: the perplexity guard found no step of this batch's ΔW that keeps held-out "
                          f"perplexity within {limit:g}x the reference: the batch was NOT edited (ΔW = 0). Edit fewer "
                          f"facts per batch (batch_size) or raise max_heldout_ppl_ratio", RuntimeWarning, stacklevel=3)
            return
        warnings.warn(f"AGRADE: the perplexity guard scaled round {i + 1}'s ΔW by {e['step']:.3g} to keep held-out "
                      f"perplexity within {limit:g}x the reference (now {e['heldout_ppl_ratio']:.3f}x)"
                      + ("; later rounds were not solved" if i + 1 < int(self.hparams.edit_rounds) else "")
                      + ": the batch is edited less than asked", RuntimeWarning, stacklevel=3)

    def preserved_output_change(self, deltas: dict[str, torch.Tensor]) -> dict[str, float]:
        """:func:`preserved_output_change` with this editor's key statistics (empty without them)."""
        return preserved_output_change(self.model, self.second_moments or {}, deltas)

    def check_preserved_change(self, result: EditResult) -> None:
        """Fill ``result.preserved_change`` and raise :class:`PreservedChangeError` when a module exceeds
        ``hparams.max_preserved_change`` (nothing has been applied to the model at this point)."""
        result.preserved_change = self.preserved_output_change(result.deltas)
        limit = getattr(self.hparams, "max_preserved_change", None)
        if limit is None or not result.preserved_change:
            return
        worst = max(result.preserved_change, key=result.preserved_change.get)
        if result.preserved_change[worst] > limit:
            raise PreservedChangeError(
                f"AGRADE refused this batch: it would change {worst}'s output on ordinary text by "
                f"{result.preserved_change[worst]:.3g} (E‖kΔW‖²/E‖kW‖²) > max_preserved_change={limit:g}; the model "
                "was not edited. Edit fewer facts per batch (batch_size), raise log_mu_offset / log_lambda_offset, "
                "or raise max_preserved_change if you accept the damage")


def network_stage_deltas(model: nn.Module, stage: AGRADEEditor, first: dict[str, torch.Tensor],
                         prompts: Sequence[str], targets: Sequence[str], subjects: Sequence[str | None] | None
                         ) -> tuple[dict[str, torch.Tensor], EditResult]:
    """(``first`` + the ``stage`` network's ΔW summed per module, the stage's :class:`EditResult`): the stage's edit
    of the same requests computed on ``model`` with ``first`` added through temporary hooks (the model is unchanged
    when this returns). :meth:`AGRADEEditor.add_network_stage`'s step, and the value-site validation's."""
    with added_deltas(model, first), torch.enable_grad():
        second = stage.edit_deltas(prompts, targets, subjects=subjects)
    total = dict(first)
    for name, delta in second.deltas.items():
        total[name] = total[name] + delta if name in total else delta
    return total, second


def editor_layout_weight(model: nn.Module, name: str) -> torch.Tensor:
    """Module ``name``'s weight in the editor layout (``output = input @ W``), detached."""
    from ...core.weights import get_module, weight_grad_to_editor_layout

    module = get_module(model, name)
    return weight_grad_to_editor_layout(module, module.weight.detach())


@torch.no_grad()
def output_energy(C0: torch.Tensor, X: torch.Tensor) -> float:
    """E‖kX‖² = tr(XᵀC₀X) (fp64) for keys k with second moment C₀ = E[kkᵀ], clamped away from 0."""
    X = X.to(torch.float64)
    return max(float((X * (C0.to(torch.float64) @ X)).sum()), 1e-300)


@torch.no_grad()
def largest_step_within(C0: torch.Tensor, prior: torch.Tensor, delta: torch.Tensor, limit: float) -> float:
    """The largest t in [0, 1] with tr((P + tD)ᵀC₀(P + tD)) ≤ ``limit`` (P = ``prior``, D = ``delta``): the
    quadratic a + 2bt + ct² solved in closed form; 0 when P alone is over the limit."""
    a, c = output_energy(C0, prior), output_energy(C0, delta)
    b = float((prior.to(torch.float64) * (C0.to(torch.float64) @ delta.to(torch.float64))).sum())
    if a >= limit or c <= 0:
        return 0.0 if a >= limit else 1.0
    t = (-b + math.sqrt(max(b * b - c * (a - limit), 0.0))) / c
    return min(max(t, 0.0), 1.0)


@torch.no_grad()
def preserved_output_change(model: nn.Module, second_moments: dict[str, torch.Tensor],
                            deltas: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per module, E‖kΔW‖² / E‖kW‖² = tr(ΔWᵀC₀ΔW) / tr(WᵀC₀W) over ordinary-text keys k (C₀ = E[kkᵀ]): how much
    an edit changes the module's output on text like the statistics corpus, relative to the output itself
    (0.01 = a 10 % RMS change). Modules without statistics are left out."""
    return {name: output_energy(second_moments[name], delta)
            / output_energy(second_moments[name], editor_layout_weight(model, name))
            for name, delta in deltas.items() if name in second_moments}


def _reduced_accuracy(correct: int, total: int, collective: Collective | None) -> float:
    """correct / total summed over ranks (1 process: as given; 0 targets: 0)."""
    counts = torch.tensor([float(correct), float(total)], dtype=torch.float64)
    (collective or Collective()).all_reduce_(counts)
    return float(counts[0] / counts[1].clamp_min(1.0))


_PRESERVED_KEYS: dict[tuple, tuple] = {}


def preserved_keys_for(model: nn.Module, tok, hparams: AGRADEHyperParams
                       ) -> tuple[dict[str, torch.Tensor], dict[str, PreservedKeys]]:
    """(C₀, its eigendecomposition) per edited module: C₀ from :mod:`easyedit_agrade.core.preserved_stats`
    (computed once per model and cached on disk; mixed with the record prompts' statistics when
    ``preserved_records`` is set, :mod:`.preserved_records`), the eigendecomposition kept per model object and
    null-space threshold in this process."""
    import weakref

    from .preserved_records import mixed_second_moments, statistics_key

    names = LayerStack(model, list(hparams.inner_params)).module_names
    threshold = float(hparams.null_space_threshold) if hparams.null_space else None
    key = (id(model), tuple(names), statistics_key(hparams), threshold)
    stats = mixed_second_moments(model, tok, names, hparams, log=lambda s: print(f"[AGRADE] {s}", flush=True))
    hit = _PRESERVED_KEYS.get(key)
    if hit is not None and hit[0]() is model:
        return stats, hit[1]
    keys = {n: PreservedKeys.from_second_moment(stats[n], threshold) for n in names}
    for stale in [k for k, (ref, _) in _PRESERVED_KEYS.items() if ref() is None]:
        del _PRESERVED_KEYS[stale]
    _PRESERVED_KEYS[key] = (weakref.ref(model), keys)
    return stats, keys


class _PieceStore:
    """Row pieces of one module's G, in memory or (``folder`` given) as safetensors files deleted by ``close``."""

    def __init__(self, folder: str | None, tag: str) -> None:
        self.folder, self.tag = folder, tag.replace("/", "_")
        self.items: list = []

    def add(self, t: torch.Tensor) -> None:
        if self.folder is None:
            self.items.append(t)
            return
        from safetensors.torch import save_file

        path = f"{self.folder}/G-{self.tag}-{len(self.items):06d}.safetensors"
        save_file({"G": t.detach().contiguous().cpu()}, path)
        self.items.append((path, t.device))

    def pieces(self):
        for item in self.items:
            if self.folder is None:
                yield item
            else:
                from safetensors.torch import load_file

                path, device = item
                yield load_file(path, device=str(device))["G"]

    def close(self) -> None:
        if self.folder is not None:
            import os

            for path, _ in self.items:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
        self.items = []
