"""Ablation switches (the paper's Table 2) and the malmen preset change exactly what they should."""
from __future__ import annotations

import torch

from agrade_helpers import LLAMA_PARAMS, perturb, records, tiny_llama, training_config
from easyedit_agrade.models.agrade import AGRADETrainer


def _trainer(tok, **switches):
    cfg = training_config(LLAMA_PARAMS, **switches)
    recs = records(4)
    tr = AGRADETrainer(cfg, train_set=recs, val_set=recs, model=tiny_llama(len(tok)), tok=tok, progress=False,
                       out_dir="unused")
    perturb(tr.nets)
    tr.nets.train()
    return tr, recs


def _edit(tr, recs):
    ed = tr.editor
    cache = ed.cache(ed.encode([r.prompt for r in recs], [r.target_new for r in recs]))
    for n in ed.stack.module_names:
        tr.nets.observe(n, *cache.get(n))
    return cache, ed.compute(cache)


def test_switch_resolution():
    assert training_config(LLAMA_PARAMS, preset="malmen").switches().weight_projection is False
    s = training_config(LLAMA_PARAMS).switches()
    assert (s.adjustment, s.regularization, s.weight_projection, s.gradient_projection) == (True,) * 4


def test_weight_projection_on_makes_consecutive_G_orthogonal(tok):
    tr, recs = _trainer(tok)
    _, res = _edit(tr, recs)
    g0, g1 = res.modules[0].G, res.modules[1].G
    assert res.modules[1].G_prev is not None
    assert abs(float((g0 * g1).sum())) < 1e-9 * float(g0.norm() * g1.norm())
    for preset_or_flag in ({"use_weight_projection": False}, {"preset": "malmen"}):
        tr2, _ = _trainer(tok, **preset_or_flag)
        _, res2 = _edit(tr2, recs)
        assert res2.modules[1].G_prev is None
        assert abs(float((res2.modules[0].G * res2.modules[1].G).sum())) > 1e-6


def test_without_adjustment_G_is_projected_gradient_and_eta_unused(tok):
    tr, recs = _trainer(tok, use_adjustment=False, use_weight_projection=False)
    cache, res = _edit(tr, recs)
    name = res.modules[0].name
    _, grad_tilde = tr.nets(name, *cache.get(name))
    assert torch.allclose(res.modules[0].G, grad_tilde.detach())
    tr.opt.zero_grad(set_to_none=True)
    tr.compute_gradients(recs)
    eta = tr.nets.net(name).lr
    assert eta.grad is None or float(eta.grad.abs().sum()) == 0.0


def test_without_regularization_uses_pseudo_inverse_and_lambda_unused(tok):
    tr, recs = _trainer(tok, use_regularization=False)
    _, res = _edit(tr, recs)
    assert res.modules[0].fact.info["exp_lambda"] is None
    tr.opt.zero_grad(set_to_none=True)
    tr.compute_gradients(recs)
    lam = tr.nets.net(res.modules[0].name).log_lambda
    assert lam.grad is None or float(lam.grad.abs().sum()) == 0.0


def test_without_gradient_projection_changes_only_the_training_signal(tok):
    grads = {}
    deltas = {}
    for flag in (True, False):
        tr, recs = _trainer(tok, use_gradient_projection=flag)
        _, res = _edit(tr, recs)
        deltas[flag] = res.deltas
        tr.opt.zero_grad(set_to_none=True)
        tr.compute_gradients(recs)
        grads[flag] = torch.cat([p.grad.flatten() for n, p in tr.nets.named_parameters()
                                 if p.grad is not None and "log_lambda" not in n])
    for n in deltas[True]:
        assert torch.allclose(deltas[True][n], deltas[False][n])  # the edit itself is unchanged
    assert float((grads[True] - grads[False]).norm()) > 1e-3 * float(grads[True].norm())
