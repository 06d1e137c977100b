"""Proof of correctness: the surrogate (eq 7 + the λ formula) gives the exact meta-gradient.

On tiny float64 models, the gradients that ``AGRADETrainer.compute_gradients`` leaves on every hypernetwork
parameter, η and λ equal full autograd through an explicit differentiable solve (``torch.linalg.solve`` of eq 3)
and an edited full-model forward, to <= 1e-6 relative — with eq 4 on and off, for nn.Linear (LLaMA) and Conv1D
(GPT-2) layouts, with primal and dual (Woodbury) factorisations, and with eqs 1–2 and 4 on the Triton backend
(autograd.Functions with the fused backward kernels; interpreted on CPU). The reference writes eqs 1–4 out in
plain torch, independent of the code under test.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from easyedit_agrade.core.tokenize import encode_prompt_target
from easyedit_agrade.core.weights import get_module, is_conv1d
from easyedit_agrade.models.agrade import AGRADETrainer
from easyedit_agrade.models.agrade import equations as eq

from agrade_helpers import GPT2_PARAMS, LLAMA_PARAMS, perturb, records, tiny_gpt2, tiny_llama, training_config


def _full_autograd_grads(trainer: AGRADETrainer, recs) -> dict[str, torch.Tensor]:
    """Reference: eqs 1–5 written out in plain torch with an explicit solve, ΔW added through hooks, full-model
    losses."""
    cfg, ed, nets, model, tok = trainer.config, trainer.editor, trainer.nets, trainer.model, trainer.tok
    sw = ed.switches
    cache = ed.cache(ed.encode([r.prompt for r in recs], [r.target_new for r in recs]))
    nets.zero_grad(set_to_none=True)
    deltas = {}
    G_prev = None
    for name in ed.stack.module_names:
        H, grad = cache.get(name)
        Ht, gt = nets(name, H, grad)
        if sw.adjustment:
            c = -nets.lr(name) * (H * Ht).sum(dim=1)  # eq 1
            G = c[:, None] * gt  # eq 2
        else:
            G = gt
        if sw.weight_projection and G_prev is not None and float((G_prev * G_prev).sum()) > 0:  # eq 4
            G = G - ((G * G_prev).sum() / (G_prev * G_prev).sum()) * G_prev
        if ed.preserved is None:
            M = eq.eq3_regularized_matrix(H, nets.log_lambda(name))
            deltas[name] = torch.linalg.solve(M, H.T @ G)
        else:  # eq 3 + e^μ C₀ on C₀'s kept eigenbasis B (all of it, or its null space), as a dense solve
            keys = ed.preserved[name]
            B, s = keys.basis, keys.eigenvalues
            HB = H @ B
            M = HB.T @ HB + torch.exp(nets.log_lambda(name)) * torch.eye(B.shape[1], dtype=H.dtype)
            if nets.log_mu(name) is not None:
                M = M + torch.exp(nets.log_mu(name)) * torch.diag(s)
            deltas[name] = B @ torch.linalg.solve(M, HB.T @ G)
        G_prev = G.detach()

    handles = []
    for name, d in deltas.items():
        handles.append(get_module(model, name).register_forward_hook(
            lambda m, i, o, d=d: o + i[0] @ d))

    def mean_ce(prompts, targets):
        b = encode_prompt_target(tok, prompts, targets, max_length=cfg.max_length)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        pm = b.predict_mask
        return F.cross_entropy(logits[pm], b.shifted_labels[pm], reduction="mean")

    try:
        with torch.no_grad():
            for h in handles:
                h.remove()
            b = encode_prompt_target(tok, [r.locality_prompt for r in recs], [r.locality_ground_truth for r in recs],
                                     max_length=cfg.max_length)
            ref = torch.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                                    .logits[b.predict_mask], -1)
        handles = [get_module(model, name).register_forward_hook(lambda m, i, o, d=d: o + i[0] @ d)
                   for name, d in deltas.items()]
        logp = torch.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                                 .logits[b.predict_mask], -1)
        kl = (ref.exp() * (ref - logp)).sum(-1).mean()
        loss = (cfg.gen_coef * mean_ce([r.rephrase_prompt for r in recs], [r.target_new for r in recs])
                + cfg.edit_coef * mean_ce([r.prompt for r in recs], [r.target_new for r in recs])
                + cfg.loc_coef * kl)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: p.grad.detach().clone() for n, p in nets.named_parameters() if p.grad is not None}


def _check(model, params, tok, solver: str, **switches):
    cfg = training_config(params, solver=solver, **switches)
    recs = records(4)
    trainer = AGRADETrainer(cfg, train_set=recs, val_set=recs, model=model, tok=tok, progress=False,
                            out_dir="unused")
    if cfg.uses_preserved_keys():  # the term is really in the solve (and the null space really removes directions)
        assert trainer.editor.preserved is not None
        assert all((k.n_removed > 0) == cfg.null_space for k in trainer.editor.preserved.values())
    perturb(trainer.nets)
    trainer.nets.train()
    trainer.opt.zero_grad(set_to_none=True)
    trainer.compute_gradients(recs)  # observes the normaliser once (train mode), then surrogate gradients
    ours = {n: p.grad.detach().clone() for n, p in trainer.nets.named_parameters() if p.grad is not None}
    trainer.nets.eval()  # the reference must not move the normaliser
    ref = _full_autograd_grads(trainer, recs)
    names = {n for n, _ in trainer.nets.named_parameters()}
    assert set(ref) == names, f"reference lacks grads for {names - set(ref)}"
    assert set(ours) == names, f"surrogate lacks grads for {names - set(ours)}"
    for n in sorted(names):
        a, b = ours[n], ref[n]
        rel = float((a - b).norm() / b.norm().clamp_min(1e-300))
        assert b.norm() > 0, f"reference gradient of {n} is zero; the test would be vacuous"
        assert rel <= 1e-6, f"{n}: relative error {rel:.3e} (|ref| = {float(b.norm()):.3e})"


@pytest.mark.parametrize("weight_projection", [True, False])
@pytest.mark.parametrize("solver", ["primal", "dual"])
def test_surrogate_equals_autograd_llama(tok, weight_projection, solver):
    _check(tiny_llama(len(tok)), LLAMA_PARAMS, tok, solver, use_weight_projection=weight_projection)


@pytest.mark.parametrize("weight_projection", [True, False])
def test_surrogate_equals_autograd_gpt2_conv1d(tok, weight_projection):
    model = tiny_gpt2(len(tok))
    assert is_conv1d(get_module(model, GPT2_PARAMS[0][:-7]))
    _check(model, GPT2_PARAMS, tok, "auto", use_weight_projection=weight_projection)


@pytest.mark.parametrize("solver", ["primal", "dual"])
def test_surrogate_equals_autograd_on_triton_backend(tok, solver, monkeypatch):
    """The trainer's eqs 1–2 and 4 through the Triton kernels and their fused backward (interpreted on CPU)."""
    from easyedit_agrade.kernels import dispatch

    if not dispatch.triton_importable():
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    used, fused_backward = [], dispatch.adjust_and_scale_backward

    def counted(*args, **kwargs):
        used.append(kwargs.get("backend", args[-1] if len(args) > 6 else None))
        return fused_backward(*args, **kwargs)

    monkeypatch.setattr(dispatch, "adjust_and_scale_backward", counted)
    _check(tiny_llama(len(tok)), LLAMA_PARAMS, tok, solver, kernels_backend="triton")
    assert used and set(used) == {"triton"}, f"the fused Triton backward was not used: {used}"


@pytest.fixture
def preserved_settings(tmp_path):
    """A small corpus and a private statistics folder for the preserved-knowledge term on the tiny models."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"Sentence {i} says that the {w} is near the river and the old town."
                               for i, w in enumerate(["bridge", "school", "market", "church", "station"] * 20)),
                      encoding="utf-8")
    return dict(preserved_corpus=str(corpus), preserved_tokens=256, preserved_window=32,
                preserved_stats_dir=str(tmp_path / "stats"))


@pytest.mark.parametrize("null_space", [False, True])
@pytest.mark.parametrize("solver", ["primal", "dual"])
def test_surrogate_with_preserved_term_equals_autograd(tok, preserved_settings, null_space, solver):
    """∂L/∂μ (and every other gradient) with M = HᵀH + e^λ I + e^μ C₀, on C₀'s whole eigenbasis or its null
    space, equals full autograd through a dense solve."""
    _check(tiny_llama(len(tok)), LLAMA_PARAMS, tok, solver, use_preserved_cov=True, log_mu_init=-2.0,
           null_space=null_space, null_space_threshold=0.05, **preserved_settings)


def test_surrogate_null_space_only_equals_autograd(tok, preserved_settings):
    _check(tiny_gpt2(len(tok)), GPT2_PARAMS, tok, "auto", null_space=True, null_space_threshold=0.05,
           **preserved_settings)
