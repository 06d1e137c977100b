"""Value-optimised AGRADE edits: ``value_source: optimized`` (beyond the paper; docs/agrade.md, *Value-optimised
edits*).

AGRADE's hypernetwork turns each cached row's (H, ∇G) into the G of eq 5 in one shot. At its edit site (the last
layers, target rows) a CounterFact paraphrase receives only the share of the edit its last-token key has in common
with the edit prompt's, and a one-shot G cannot make the edit at the early layers where the subject's keys carry it
to paraphrases (docs/agrade_generalization.md §1–3). With ``value_source: optimized`` G is found at edit time
instead — MEMIT's values (Meng et al. 2023), optimised for **all requests of a batch in one set of passes**, then
solved with the preserved-knowledge system of eq 3/5:

1. :func:`optimise_values` — per request a vector δᵢ added to the residual stream leaving the last edited layer L
   at the subject's last token, Adam on the summed per-prompt target NLL + ``weight_decay``·‖δᵢ‖²/‖hᵢ‖², clamped to
   ‖δᵢ‖ ≤ ``clamp``·‖hᵢ‖ after each step, over the prompt and ``value_prefixes`` context-prefixed copies of it
   (sentences of the statistics corpus, ROME's context templates). The δᵢ are independent: one pass over the
   batch (layers above L, logits only at target positions) steps all of them; a request whose mean NLL is below
   ``stop_nll`` stops (MEMIT's early stop) and leaves the passes.
2. :func:`spread_values` — for each edited module l in layer order, with the keys Kₗ at the subject's last token
   (averaged over the prompt's copies) and the residual still missing at layer L, Rₗ = (zᵢ − h_L,i)/(modules left),
   taken on the model with the earlier modules' ΔW added: :func:`memit_layer_update`. ``value_sweeps`` > 1
   repeats this pass, each module re-solved for its own current change plus its share of what is still missing.

The model is unchanged when this returns (ΔW of earlier modules is added through temporary fp32 hooks).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.cache import LayerStack, find_decoder_layers
from ...core.editor_base import MicroBatch, encode_micro_batches
from ...core.weights import added_deltas, get_module


@dataclass
class ValueBatch:
    """One micro-batch of (prefix +) prompt + target with the rows' request indices."""

    mb: MicroBatch
    subject: torch.Tensor  # (B, L) bool: the subject's last token
    request: torch.Tensor  # (B,) long: the request each row belongs to
    plain: torch.Tensor  # (B,) bool: the row is the request's own prompt (no prefix)


class _Stop(Exception):
    pass


def context_prefixes(path: str | Path, k: int, seed: int = 0, min_words: int = 5, max_words: int = 12) -> list[str]:
    """``k`` short sentences of a WikiText file (no markup, ``<unk>``, ``@`` or quotes), each ending with '. ' —
    the context prefixes of ROME/MEMIT's value search, drawn from the statistics corpus (never the test text)."""
    if k <= 0:
        return []
    sentences = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in line.split(" . "):
            words = s.split()
            if min_words <= len(words) <= max_words and "<unk>" not in s and "@" not in s and '"' not in s:
                text = " ".join(words).replace(" ,", ",").replace(" 's", "'s").replace("( ", "(").replace(" )", ")")
                sentences.append(text + ". ")
    if len(sentences) < k:
        raise ValueError(f"{path}: only {len(sentences)} usable sentences for {k} context prefixes")
    return random.Random(seed).sample(sentences, k)


def encode_value_batches(tok, prompts: Sequence[str], targets: Sequence[str], subjects: Sequence[str | None],
                         prefixes: Sequence[str], *, micro_batch: int, device) -> list[ValueBatch]:
    """Tokenised copies of every request (its prompt, then each prefix + prompt) with the subject's last token
    marked. Raises ``ValueError`` naming the request when its subject is missing or not in its prompt."""
    n = len(prompts)
    texts, tgts, subs = [], [], []
    for pre in [""] + list(prefixes):
        texts += [pre + p for p in prompts]
        tgts += list(targets)
        subs += list(subjects)
    mbs = encode_micro_batches(tok, texts, tgts, max_length=None, micro_batch=micro_batch, device=device,
                               subjects=subs, key_positions="target+subject")
    out, found = [], torch.zeros(n, dtype=torch.bool)
    for mb in mbs:
        subj = mb.subject_mask
        rows = mb.record_ids.to(torch.long)
        has = subj.any(1).cpu()
        found[(rows % n)[has & (rows < n)]] = True
        out.append(ValueBatch(mb, subj, rows % n, rows < n))
    missing = (~found).nonzero()[:, 0].tolist()
    if missing:
        i = missing[0]
        raise ValueError(f"request {i}: value_source: optimized needs the subject inside the prompt "
                         f"(subject {subjects[i]!r}, prompt {prompts[i]!r}; {len(missing)} such request(s))")
    return out


def _rows(vb: ValueBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch index, position, request) of every subject row of a value batch."""
    b, pos = vb.subject.nonzero(as_tuple=True)
    return b, pos, vb.request[b.cpu()].to(b.device)


def _take(vb: ValueBatch, keep: torch.Tensor, hidden: torch.Tensor) -> tuple[ValueBatch, torch.Tensor]:
    """The rows ``keep`` (B,) bool of a value batch and its hidden state."""
    mb = vb.mb
    idx = keep.nonzero()[:, 0]
    sub = MicroBatch(mb.input_ids[idx], mb.attention_mask[idx], mb.predict_mask[idx], mb.labels[idx],
                     mb.record_ids[idx.cpu()])
    return ValueBatch(sub, vb.subject[idx], vb.request[idx.cpu()], vb.plain[idx.cpu()]), hidden[idx]


def _prompt_nll(top: LayerStack, vb: ValueBatch, hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B,) mean target NLL of each prompt of a value batch with its request's δ added at the subject's last token
    of ``hidden`` (the state entering ``top``'s first layer); differentiable w.r.t. ``delta``."""
    b, pos, req = _rows(vb)
    add = torch.zeros_like(hidden)
    add[b, pos] = delta[req.cpu()].to(device=hidden.device, dtype=hidden.dtype)
    logits = top.upper(hidden + add, vb.mb.input_ids, vb.mb.attention_mask, vb.mb.predict_mask)
    nll = F.cross_entropy(logits.float(), vb.mb.target_labels, reduction="none")
    per = torch.zeros(len(vb.request), device=nll.device).index_add(0, vb.mb.predict_mask.nonzero()[:, 0], nll)
    return per / vb.mb.predict_mask.sum(1).clamp_min(1)


def optimise_values(model: nn.Module, batches: Sequence[ValueBatch], n_requests: int, layer: int, *, steps: int,
                    lr: float, weight_decay: float, clamp: float, stop_nll: float
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(δ, h, info): δ (n, d) added at the output of decoder layer ``layer`` at each request's subject's last token
    that makes the model predict the targets (module docstring, step 1); h (n, d) the unchanged hidden state there
    for each request's own prompt; info = {"steps", "nll_start", "nll_end", "converged", "delta_ratio_median",
    "delta_ratio_q90"} (the last two: ‖δᵢ‖/‖hᵢ‖ over the requests)."""
    path, layers = find_decoder_layers(model)
    if layer + 1 >= len(layers):
        raise ValueError(f"value_source: optimized needs the last edited layer ({layer}) below the model's last "
                         f"decoder layer ({len(layers) - 1})")
    first_param = next(name for name, _ in layers[layer + 1].named_parameters())
    top = LayerStack(model, [f"{path}.{layer + 1}.{first_param}"])  # starts at the input of layer + 1
    lowered = [top.lower(vb.mb.input_ids, vb.mb.attention_mask) for vb in batches]
    d = lowered[0].shape[-1]
    h = torch.zeros(n_requests, d, dtype=torch.float32)
    for vb, hid in zip(batches, lowered):
        b, pos, req = _rows(vb)
        plain = vb.plain[b.cpu()].to(b.device)
        h[req[plain].cpu()] = hid[b[plain], pos[plain]].float().cpu()
    h_norm = h.norm(dim=-1).clamp_min(1e-6)
    delta = torch.zeros(n_requests, d, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    active = torch.ones(n_requests, dtype=torch.bool)
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    info: dict = {"steps": 0, "nll_start": None, "nll_end": None}
    try:
        for step in range(steps):
            opt.zero_grad()
            nll_sum = torch.zeros(n_requests, dtype=torch.float64)
            n_prompts = torch.zeros(n_requests, dtype=torch.float64)
            for vb, hid in zip(batches, lowered):
                keep = active[vb.request]
                if not bool(keep.any()):
                    continue
                sub, hs = (vb, hid) if bool(keep.all()) else _take(vb, keep.to(hid.device), hid)
                per_prompt = _prompt_nll(top, sub, hs, delta)
                per_prompt.sum().backward()
                nll_sum.index_add_(0, sub.request, per_prompt.detach().double().cpu())
                n_prompts.index_add_(0, sub.request, torch.ones(len(sub.request), dtype=torch.float64))
            mean = nll_sum[active] / n_prompts[active].clamp_min(1)
            info["nll_start"] = float(mean.mean()) if info["nll_start"] is None else info["nll_start"]
            info["steps"] = step + 1
            converged = torch.zeros_like(active)
            converged[active] = mean < stop_nll
            active &= ~converged
            if not bool(active.any()):
                break
            frozen = ~active
            (weight_decay * ((delta ** 2).sum(-1) / h_norm ** 2)[~frozen].sum()).backward()
            kept = delta.detach()[frozen].clone()
            opt.step()
            with torch.no_grad():
                delta[frozen] = kept  # converged requests keep their δ (Adam's momentum would move them)
                scale = (clamp * h_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
        info["converged"] = int(n_requests - int(active.sum()))
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    info["nll_end"] = _mean_nll(top, batches, lowered, delta.detach(), n_requests)
    ratio = delta.detach().norm(dim=-1) / h_norm
    info["delta_ratio_median"] = float(ratio.median())
    info["delta_ratio_q90"] = float(torch.quantile(ratio, 0.9))
    return delta.detach(), h, info


@torch.no_grad()
def _mean_nll(top: LayerStack, batches, lowered, delta: torch.Tensor, n_requests: int) -> float:
    """Mean over requests of the per-prompt mean target NLL with δ added."""
    nll_sum = torch.zeros(n_requests, dtype=torch.float64)
    count = torch.zeros(n_requests, dtype=torch.float64)
    for vb, hid in zip(batches, lowered):
        nll_sum.index_add_(0, vb.request, _prompt_nll(top, vb, hid, delta).double().cpu())
        count.index_add_(0, vb.request, torch.ones(len(vb.request), dtype=torch.float64))
    return float((nll_sum / count.clamp_min(1)).mean())


def memit_layer_update(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, c0_weight: float) -> torch.Tensor:
    """MEMIT's batch update of one layer (Meng et al. 2023, eq 14: ΔW = R Kᵀ (λC₀ + K Kᵀ)⁻¹), in the editor's
    layout and eq 5's form: ΔW = (KᵀK + λ·C₀)⁻¹ KᵀR for n rows of keys K (n, Dh) and residuals R (n, Dg), with
    C₀ = E[kkᵀ] of the module's keys on ordinary text and λ = ``c0_weight`` (MEMIT's ``mom2_update_weight``: the
    number of ordinary-text keys the solve keeps as they are, weighed against the n edit keys; see
    :func:`preserved_c0_weight`). fp64."""
    K = K.double()
    M = K.T @ K + float(c0_weight) * C0.double()
    L = torch.linalg.cholesky(M)
    return torch.cholesky_solve(K.T @ R.double(), L)


def preserved_c0_weight(n_edits: int, per_edit: float | None = None, keys: float | None = None) -> float:
    """λ of :func:`memit_layer_update` for a batch of ``n_edits``: ``per_edit``·n (``value_preserved_weight``,
    growing with the batch), capped at ``keys`` (``value_preserved_keys``, a constant count of ordinary-text keys
    as MEMIT's ``mom2_update_weight``) — min(w·n, keys) when both are given, either alone otherwise."""
    if per_edit is None and keys is None:
        raise ValueError("give value_preserved_weight (λ = w·n), value_preserved_keys (λ constant) or both "
                         "(λ = min(w·n, keys))")
    scaled = None if per_edit is None else float(per_edit) * int(n_edits)
    return min(float(v) for v in (keys, scaled) if v is not None)


@torch.no_grad()
def _keys_and_outputs(model: nn.Module, batches: Sequence[ValueBatch], n_requests: int, module: nn.Module,
                      out_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """K (n, Dh): ``module``'s input at each request's subject's last token, averaged over its copies; H (n, d):
    ``out_layer``'s output there for the request's own prompt. Stops each pass after ``out_layer``."""
    box: dict = {}

    def keep_input(_m, args, _out):
        box["k"] = args[0].detach()

    def keep_output_and_stop(_m, _args, out):
        box["h"] = (out[0] if isinstance(out, tuple) else out).detach()
        raise _Stop

    keys = counts = outs = None
    h1 = module.register_forward_hook(keep_input)
    h2 = out_layer.register_forward_hook(keep_output_and_stop)
    try:
        for vb in batches:
            try:
                model(input_ids=vb.mb.input_ids, attention_mask=vb.mb.attention_mask, use_cache=False)
            except _Stop:
                pass
            b, pos, req = _rows(vb)
            k = box["k"][b, pos].double().cpu()
            if keys is None:
                keys = torch.zeros(n_requests, k.shape[-1], dtype=torch.float64)
                counts = torch.zeros(n_requests, dtype=torch.float64)
                outs = torch.zeros(n_requests, box["h"].shape[-1], dtype=torch.float64)
            plain = vb.plain[b.cpu()].to(b.device)
            outs[req[plain].cpu()] = box["h"][b[plain], pos[plain]].double().cpu()
            req = req.cpu()
            keys.index_add_(0, req, k)
            counts.index_add_(0, req, torch.ones(len(req), dtype=torch.float64))
    finally:
        h1.remove()
        h2.remove()
    return keys / counts.clamp_min(1)[:, None], outs


def spread_values(model: nn.Module, batches: Sequence[ValueBatch], n_requests: int, module_names: Sequence[str],
                  out_layer: nn.Module, z: torch.Tensor, second_moments: dict[str, torch.Tensor], c0_weight: float,
                  sweeps: int = 1) -> dict[str, torch.Tensor]:
    """ΔW per edited module (editor layout, fp64), module by module in layer order (module docstring, step 2),
    each solved by :func:`memit_layer_update` with λ = ``c0_weight``;
    each module's keys and the residual are taken with every other module's current ΔW added (temporary hooks).
    ``sweeps`` > 1 repeats the pass: a module's target is then its own current output change plus its share of the
    residual still missing, KₗΔWₗ + Rₗ, so each re-solve replaces its ΔW (block coordinate descent on the
    modules' ridge problems) and the residual the first pass left moves into the modules that can still take it."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
        raise ValueError(f"sweeps must be an integer >= 1, got {sweeps!r}")
    deltas: dict[str, torch.Tensor] = {}
    for _ in range(sweeps):
        for i, name in enumerate(module_names):
            with added_deltas(model, deltas):
                K, cur = _keys_and_outputs(model, batches, n_requests, get_module(model, name), out_layer)
            R = (z.double() - cur) / (len(module_names) - i)
            if name in deltas:
                R = R + K @ deltas[name]
            deltas[name] = memit_layer_update(K, R, second_moments[name], c0_weight)
    return deltas


@torch.no_grad()
def met_share(model: nn.Module, batches: Sequence[ValueBatch], n_requests: int, module_names: Sequence[str],
              out_layer: nn.Module, z: torch.Tensor, h: torch.Tensor, deltas: dict[str, torch.Tensor]
              ) -> torch.Tensor:
    """(n,) fp64: 1 − ‖zᵢ − h′ᵢ‖/‖zᵢ − hᵢ‖ per request — the share of its value the ΔW place at ``out_layer``'s
    output for its own prompt (h′ with ``deltas`` added; 1: z reached, 0: no closer than the unedited h, < 0:
    further away)."""
    with added_deltas(model, deltas):
        _, cur = _keys_and_outputs(model, batches, n_requests, get_module(model, module_names[-1]), out_layer)
    need = (z.double() - h.double()).norm(dim=-1).clamp_min(1e-12)
    return 1 - (z.double() - cur).norm(dim=-1) / need


def met_summary(met: torch.Tensor) -> dict[str, float]:
    """{"met_median", "met_q10"} of :func:`met_share`'s per-request shares (the edit report's fields)."""
    met = met.float()
    return {"met_median": float(met.median()), "met_q10": float(torch.quantile(met, 0.1))}
