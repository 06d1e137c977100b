"""The preserved-knowledge ridge (eq 3 + e^μ C₀, optional null space) against explicit fp64 references and
autograd: ΔW (eq 5), P (eq 6), ∂L/∂λ and ∂L/∂μ, the streamed Gram form, the null-space property, and the
reduction to plain eq 3."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.kernels import factorize
from easyedit_agrade.kernels.preserved import PreservedKeys, factorize_gram_preserved, factorize_preserved


def _problem(T, Dh=12, Dg=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(T, Dh, generator=g, dtype=torch.float64)
    G = torch.randn(T, Dg, generator=g, dtype=torch.float64)
    gt = torch.randn(Dh, Dg, generator=g, dtype=torch.float64)
    # an anisotropic PSD second moment: a few dominant directions, as for real keys
    K = torch.randn(400, Dh, generator=g, dtype=torch.float64) * torch.logspace(1, -2, Dh, dtype=torch.float64)
    C0 = K.T @ K / 400
    return H, G, gt, C0


def _reference(H, G, C0, log_lambda, log_mu, basis=None):
    """ΔW(λ, μ) through an explicit dense solve (differentiable in λ, μ and G)."""
    Dh = H.shape[1]
    B = torch.eye(Dh, dtype=H.dtype) if basis is None else basis
    M = B.T @ (H.T @ H + torch.exp(log_lambda) * torch.eye(Dh, dtype=H.dtype) + torch.exp(log_mu) * C0) @ B
    return B @ torch.linalg.solve(M, B.T @ H.T @ G)


@pytest.mark.parametrize("T", [4, 30])  # dual (T < Dh) and primal
@pytest.mark.parametrize("null_space", [None, 1e-2])
def test_delta_projection_and_ridge_gradients_match_autograd(T, null_space):
    H, G, gt, C0 = _problem(T)
    keys = PreservedKeys.from_second_moment(C0, null_space)
    log_lambda, log_mu = torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.7, dtype=torch.float64)
    fact = factorize_preserved(H, log_lambda, keys, log_mu)
    assert fact.method == ("dual" if T < keys.rank else "primal")
    delta = fact.solve_delta(G)

    ll, lm = log_lambda.clone().requires_grad_(), log_mu.clone().requires_grad_()
    Gr = G.clone().requires_grad_()
    basis = None if null_space is None else keys.basis
    ref = _reference(H, Gr, C0, ll, lm, basis)
    torch.testing.assert_close(delta, ref.detach(), rtol=1e-9, atol=1e-10)
    (ref * gt).sum().backward()

    P, lam_grad, mu_grad = fact.project_and_ridge_grads(gt, delta)
    torch.testing.assert_close(P, Gr.grad, rtol=1e-8, atol=1e-10)  # eq 7: ∂⟨g_θ, ΔW⟩/∂G = P
    torch.testing.assert_close(lam_grad, ll.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(mu_grad, lm.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(fact.project(gt), P)
    torch.testing.assert_close(fact.lambda_grad(gt, delta), lam_grad)


@pytest.mark.parametrize("null_space", [None, 1e-2])
def test_gram_form_equals_rows_form(null_space):
    H, G, gt, C0 = _problem(30)
    keys = PreservedKeys.from_second_moment(C0, null_space)
    rows = factorize_preserved(H, 0.5, keys, 2.0)
    gram = factorize_gram_preserved((H.T @ H).tril(), 0.5, keys, 2.0, H)  # only the lower triangle is read
    torch.testing.assert_close(gram.solve(H.T @ G), rows.solve_delta(G), rtol=1e-9, atol=1e-11)
    d = rows.solve_delta(G)
    for a, b in zip(gram.project_and_ridge_grads(gt, d), rows.project_and_ridge_grads(gt, d)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_null_space_edit_leaves_dominant_keys_unchanged():
    H, G, _, C0 = _problem(30)
    keys = PreservedKeys.from_second_moment(C0, 1e-2)
    assert keys.n_removed > 0 and keys.rank + keys.n_removed == C0.shape[0]
    delta = factorize_preserved(H, 0.0, keys).solve_delta(G)
    s, U = torch.linalg.eigh(C0)
    dominant = U[:, s > 1e-2 * s.max()]
    # keys in C₀'s dominant subspace see (numerically) no change of the module output
    assert float((dominant.T @ delta).norm()) < 1e-10 * float(delta.norm())
    # without the restriction they would
    free = factorize_preserved(H, 0.0, PreservedKeys.from_second_moment(C0)).solve_delta(G)
    assert float((dominant.T @ free).norm()) > 1e-2 * float(free.norm())


def test_without_mu_and_null_space_it_is_plain_eq3():
    H, G, gt, C0 = _problem(30)
    keys = PreservedKeys.from_second_moment(C0)
    plain = factorize(H, 0.7)
    whitened = factorize_preserved(H, 0.7, keys, None)
    torch.testing.assert_close(whitened.solve_delta(G), plain.solve_delta(G), rtol=1e-9, atol=1e-11)
    d = plain.solve_delta(G)
    P0, lam0 = plain.project_and_lambda_grad(gt, d)
    P1, lam1, mu1 = whitened.project_and_ridge_grads(gt, d)
    torch.testing.assert_close(P1, P0, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lam1, lam0, rtol=1e-8, atol=1e-11)
    assert mu1 is None


def test_large_mu_suppresses_change_on_preserved_keys():
    """The point of the term: a stronger e^μ shrinks the output change on ordinary-text keys (E‖kΔW‖² = tr ΔWᵀC₀ΔW)."""
    H, G, _, C0 = _problem(30)
    keys = PreservedKeys.from_second_moment(C0)
    damage = [float(torch.trace(d.T @ C0 @ d)) for d in
              (factorize_preserved(H, 0.0, keys, mu).solve_delta(G) for mu in (-5.0, 0.0, 3.0, 6.0))]
    assert damage == sorted(damage, reverse=True) and damage[-1] < 0.05 * damage[0]


def test_bad_inputs_are_named():
    H, G, _, C0 = _problem(8)
    keys = PreservedKeys.from_second_moment(C0)
    with pytest.raises(ValueError, match="use_regularization"):
        factorize_preserved(H, None, keys, 0.0)
    with pytest.raises(ValueError, match=r"H must be \(T, 12\)"):
        factorize_preserved(H[:, :5], 0.0, keys)
    with pytest.raises(ValueError, match="keeps no direction"):
        PreservedKeys.from_second_moment(torch.eye(12, dtype=torch.float64), 1e-3)
    with pytest.raises(ValueError, match="NaN"):
        PreservedKeys.from_second_moment(torch.full((3, 3), float("nan")))
