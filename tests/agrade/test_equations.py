"""Eqs 1–6 numerically: normal equations, eq 4 orthogonality, kernels agreement, the singular (w/o reg.) case."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade import kernels
from easyedit_agrade.models.agrade import equations as eq


def _data(T=7, Dh=10, Dg=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(T, Dh, generator=g, dtype=torch.float64)
    return H, torch.randn(T, Dh, generator=g, dtype=torch.float64), torch.randn(T, Dg, generator=g, dtype=torch.float64)


def test_eq1_eq2_match_kernels():
    H, Ht, gt = _data()
    c = eq.eq1_adjustment_coefficients(H, Ht, 0.3)
    G = eq.eq2_scaled_gradient(c, gt)
    kc, kG = kernels.adjust_and_scale(H, Ht, gt, 0.3)
    assert torch.allclose(c, kc) and torch.allclose(G, kG)
    assert torch.allclose(c, -0.3 * (H * Ht).sum(1))


@pytest.mark.parametrize("method", ["primal", "dual"])
@pytest.mark.parametrize("T", [4, 15])
def test_eq5_satisfies_normal_equations(method, T):
    H, _, G = _data(T=T)
    fact = eq.eq3_factorize(H, torch.tensor(-0.5, dtype=torch.float64), method=method)
    delta = eq.eq5_delta(fact, G)
    M = eq.eq3_regularized_matrix(H, -0.5)
    assert torch.allclose(M @ delta, H.T @ G, atol=1e-10, rtol=1e-10)


def test_eq5_without_regularization_is_min_norm_least_squares():
    H, _, G = _data(T=4)  # T < Dh: HᵀH is singular
    fact = eq.eq3_factorize(H, None)
    delta = eq.eq5_delta(fact, G)
    assert torch.isfinite(delta).all()
    assert torch.allclose((H.T @ H) @ delta, H.T @ G, atol=1e-9)
    assert torch.allclose(delta, torch.linalg.pinv(H) @ G, atol=1e-9)


def test_eq4_orthogonal_and_skips_other_shapes():
    _, _, G = _data()
    _, _, Gp = _data(seed=1)
    out = eq.eq4_project_out(G, Gp)
    assert abs(float((out * Gp).sum())) < 1e-10
    assert torch.equal(eq.eq4_project_out(G, None), G)
    assert torch.equal(eq.eq4_project_out(G, torch.zeros_like(G)), G)
    assert torch.equal(eq.eq4_project_out(G, torch.randn(G.shape[0], G.shape[1] + 1, dtype=G.dtype)), G)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_eq6_and_lambda_gradient(method):
    H, _, G = _data(T=6)
    log_lambda = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    M = eq.eq3_regularized_matrix(H, log_lambda)
    delta = torch.linalg.solve(M, H.T @ G)
    g_theta = torch.randn_like(delta)
    (delta * g_theta).sum().backward()
    fact = eq.eq3_factorize(H, log_lambda, method=method)
    P, lam = eq.eq6_and_lambda_gradient(fact, H, g_theta, delta.detach())
    assert torch.allclose(P, H @ torch.linalg.solve(M.detach(), g_theta), atol=1e-10)
    assert torch.allclose(lam, log_lambda.grad, atol=1e-10)
    P_noproj = eq.eq6_projected_gradient(fact, H, g_theta, use_gradient_projection=False)
    assert torch.allclose(P_noproj, H @ g_theta)


def test_eq7_surrogate_gradient_is_P():
    _, _, G = _data()
    G = G.clone().requires_grad_(True)
    P = torch.randn_like(G)
    eq.eq7_surrogate_loss(P, G).backward()
    assert torch.equal(G.grad, P)
