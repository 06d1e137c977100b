"""Eqs 1–7 numerically: normal equations, eq 4 orthogonality and its piece-wise form, the singular (w/o reg.) case,
and the eq 6–7 meta-gradient against autograd through the solve."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.models.agrade import equations as eq


def _data(T=7, Dh=10, Dg=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(T, Dh, generator=g, dtype=torch.float64)
    return H, torch.randn(T, Dh, generator=g, dtype=torch.float64), torch.randn(T, Dg, generator=g, dtype=torch.float64)


def test_eq1_eq2_formula_and_gradient():
    H, Ht, gt = _data()
    Ht.requires_grad_(True)
    eta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    G = eq.eq1_eq2_adjusted_gradient(H, Ht, gt, eta)
    c = torch.stack([-0.3 * torch.dot(H[i], Ht[i].detach()) for i in range(H.shape[0])])
    torch.testing.assert_close(G.detach(), c[:, None] * gt, rtol=1e-14, atol=0)
    G.sum().backward()  # d/dη Σ G = −Σ_i ⟨H_i, H̃_i⟩ Σ_j ∇G̃_ij
    torch.testing.assert_close(eta.grad, -((H * Ht.detach()).sum(1) * gt.sum(1)).sum(), rtol=1e-13, atol=0)


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


def test_eq4_from_statistics_summed_over_pieces_equals_eq4():
    """The streamed / data-parallel form: inner products summed over row pieces, then the update piece by piece."""
    _, _, G = _data(T=9)
    _, _, Gp = _data(T=9, seed=1)
    pieces = [slice(0, 4), slice(4, 5), slice(5, 9)]
    num, den = (sum(x) for x in zip(*(eq.eq4_inner_products(G[p], Gp[p]) for p in pieces)))
    coefficient = eq.eq4_coefficient(num, den)
    streamed = torch.cat([eq.eq4_subtract(G[p], Gp[p], coefficient) for p in pieces])
    torch.testing.assert_close(streamed, eq.eq4_project_out(G, Gp), rtol=1e-13, atol=1e-14)
    assert eq.eq4_coefficient(num, torch.zeros(())) is None
    H = torch.randn(9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    summed = torch.zeros(10, G.shape[1], dtype=torch.float64)  # eq 5's right-hand side, likewise
    for p in pieces:
        eq.eq5_rhs(H[p], G[p], summed)
    torch.testing.assert_close(summed, H.T @ G, rtol=1e-13, atol=1e-13)


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


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_eq6_eq7_give_the_meta_gradient_of_the_solve(method):
    """The decoupled meta-gradient: differentiating L(W + ΔW(G)) through the actual solve of eqs 3 and 5 gives, for
    G and everything G depends on (H̃, ∇G̃, η via eqs 1–2), the gradient of the eq 7 surrogate Σ P ⊙ G with P of
    eq 6 computed from g_θ = ∂L/∂ΔW alone."""
    T = 4 if method == "dual" else 13  # T < Dh = 10 (dual) and T > Dh (primal)
    H, Ht, gt = _data(T=T)
    g = torch.Generator().manual_seed(5)
    W = torch.randn(10, 5, generator=g, dtype=torch.float64)
    X, Y = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    log_lambda = torch.tensor(-0.7, dtype=torch.float64)

    def loss(delta):  # a non-linear editing loss on probe inputs
        return (torch.tanh(X @ (W + delta)) * Y).sum() + 0.1 * ((W + delta) ** 2).sum()

    def leaves():
        return (Ht.clone().requires_grad_(True), gt.clone().requires_grad_(True),
                torch.tensor(0.6, dtype=torch.float64, requires_grad=True))

    # reference: full autograd through ΔW = M⁻¹HᵀG with M = HᵀH + e^λ I
    ref_leaves = leaves()
    G = eq.eq1_eq2_adjusted_gradient(H, *ref_leaves)
    delta = torch.linalg.solve(eq.eq3_regularized_matrix(H, log_lambda), H.T @ G)
    expected = torch.autograd.grad(loss(delta), ref_leaves)

    # ours: ΔW without grad, g_θ from the loss alone, P of eq 6, surrogate of eq 7 backpropagated into G
    our_leaves = leaves()
    G = eq.eq1_eq2_adjusted_gradient(H, *our_leaves)
    fact = eq.eq3_factorize(H, log_lambda, method=method)
    assert fact.method == method
    delta = eq.eq5_delta(fact, G).requires_grad_(True)
    g_theta = torch.autograd.grad(loss(delta), delta)[0]
    P = eq.eq6_projected_gradient(fact, H, g_theta)
    got = torch.autograd.grad(eq.eq7_surrogate_loss(P, G), our_leaves)
    for a, b in zip(got, expected):
        assert float(b.norm()) > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
