"""AGRADE's equations, one function each (numbers as in the paper "Editing Large Language Models via Adaptive
Gradient Guidance").

Shapes: H, H̃ (T, Dh); ∇G, ∇G̃, G, P (T, Dg); ΔW and g_θ (Dh, Dg) in the *editor layout*
(``output += input @ ΔW``; see :mod:`easyedit_agrade.core.weights` for nn.Linear / Conv1D).

Eqs 1–2 and 4 run through the kernels' dispatcher (:mod:`easyedit_agrade.kernels`: fused Triton kernels on CUDA,
the torch reference on CPU) and are differentiable on both (the trainer backpropagates through them into the
hypernetwork); eq 7 is plain torch. Eqs 3, 5 and 6 and the λ gradient go through the kernels' solver (a checked
Cholesky factorisation, primal or dual/Woodbury, with an fp64 and jitter fallback; never NaN).
:func:`eq3_regularized_matrix` builds M explicitly only for tests and small references.

The in-memory and the streamed / data-parallel edit use the same functions: eqs 1–2 are row-wise (any piece of
rows), eq 4 splits into :func:`eq4_inner_products` (sums, accumulated over pieces and ranks) and
:func:`eq4_subtract`; eq 3 is factored from the rows (:func:`eq3_factorize`) or from an accumulated Gram
(:func:`eq3_gram` summed into :func:`eq3_factorize_gram`).
"""
from __future__ import annotations

import torch

from ...kernels import RidgeFactorization, adjust_and_scale, factorize, factorize_gram, project_out
from ...kernels import gram as gram_of_rows
from ...kernels.reference import projection_dots_ref, subtract_projection_ref
from ...kernels.preserved import PreservedKeys, PreservedRidge, factorize_gram_preserved, factorize_preserved


def eq1_eq2_adjusted_gradient(H: torch.Tensor, H_tilde: torch.Tensor, grad_tilde: torch.Tensor,
                              eta: torch.Tensor | float, *, backend: str | None = None) -> torch.Tensor:
    """Eq 1: c_i = −η Σ_j H_ij H̃_ij (T,), and eq 2: G = c ⊙ ∇G̃ (row i of ∇G̃ scaled by c_i) → (T, Dg).

    One fused pass (:func:`~easyedit_agrade.kernels.adjust_and_scale`); differentiable in H̃, ∇G̃ and η."""
    return adjust_and_scale(H, H_tilde, grad_tilde, eta, backend=backend)[1]


def eq3_regularized_matrix(H: torch.Tensor, log_lambda: torch.Tensor | float | None) -> torch.Tensor:
    """Eq 3: M = HᵀH + e^λ I_{Dh} (explicit; ``log_lambda=None`` gives HᵀH, the "w/o regularization" ablation)."""
    M = H.T @ H
    if log_lambda is None:
        return M
    lam = torch.exp(torch.as_tensor(log_lambda, dtype=H.dtype, device=H.device))
    return M + lam * torch.eye(H.shape[1], dtype=H.dtype, device=H.device)


def eq3_factorize(H: torch.Tensor, log_lambda: torch.Tensor | float | None, *, method: str = "auto",
                  backend: str | None = None, preserved: PreservedKeys | None = None,
                  log_mu: torch.Tensor | float | None = None) -> RidgeFactorization | PreservedRidge:
    """Eq 3, factored once (kernels' checked Cholesky; dual form when T < Dh) for eqs 5 and 6.

    ``preserved`` (the preserved-knowledge term, :mod:`easyedit_agrade.kernels.preserved`): M = HᵀH + e^λ I +
    e^μ C₀ on the kept basis of C₀ (all of it, or its null space); ``log_mu`` None drops the e^μ C₀ term (null
    space only). Without ``preserved`` this is the paper's eq 3 exactly.
    """
    ll = _detached(log_lambda)
    if preserved is not None:
        return factorize_preserved(H.detach(), ll, preserved, _detached(log_mu), method=method, backend=backend)
    return factorize(H.detach(), ll, method=method, backend=backend)


def eq3_gram(H: torch.Tensor, out: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Eq 3's HᵀH for a piece of rows, added in place to the lower triangle of ``out`` (Dh × Dh, its dtype is the
    accumulator's) — the streamed / data-parallel Gram, summed over pieces (and ranks) for
    :func:`eq3_factorize_gram`. Through :func:`~easyedit_agrade.kernels.gram` (the Triton kernel on CUDA)."""
    return gram_of_rows(H.detach(), lower_only=True, out=out, backend=backend)


def eq3_factorize_gram(gram: torch.Tensor, log_lambda: torch.Tensor | float | None, H: torch.Tensor | None, *,
                       preserved: PreservedKeys | None = None,
                       log_mu: torch.Tensor | float | None = None) -> RidgeFactorization | PreservedRidge:
    """Eq 3 from an accumulated Gram HᵀH (streamed / data-parallel; ``H`` the local rows for eq 6), with the same
    optional preserved-knowledge term as :func:`eq3_factorize`. Solve eq 5 with ``.solve(HᵀG)``."""
    ll = _detached(log_lambda)
    if preserved is not None:
        return factorize_gram_preserved(gram, ll, preserved, _detached(log_mu), H)
    return factorize_gram(gram, ll, H)


def _detached(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def eq4_inner_products(G: torch.Tensor, G_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 4's statistics (⟨G, G_prev⟩, ⟨G_prev, G_prev⟩), G_prev detached; sums over rows, so a streamed or
    data-parallel edit adds them up over row pieces and ranks. Differentiable in G."""
    return projection_dots_ref(G, G_prev)


def eq4_coefficient(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor | None:
    """Eq 4's coefficient ⟨G, G_prev⟩ / ⟨G_prev, G_prev⟩ from the (summed) :func:`eq4_inner_products`; None when
    ⟨G_prev, G_prev⟩ = 0 (nothing to project out)."""
    return None if float(den) == 0.0 else num / den


def eq4_subtract(G: torch.Tensor, G_prev: torch.Tensor, coefficient: torch.Tensor | float) -> torch.Tensor:
    """Eq 4's update G − coefficient · G_prev (G_prev detached), coefficient = ⟨G, G_prev⟩ / ⟨G_prev, G_prev⟩
    from the (summed) :func:`eq4_inner_products`."""
    return subtract_projection_ref(G, G_prev, coefficient)


def eq4_project_out(G: torch.Tensor, G_prev: torch.Tensor | None, all_reduce=None, *,
                    backend: str | None = None) -> torch.Tensor:
    """Eq 4: G ← G − (⟨G, G_prev⟩ / ⟨G_prev, G_prev⟩) G_prev, with G_prev detached.

    ``G_prev`` None, of a different shape (modules of different widths cannot be projected) or zero: G unchanged.
    Differentiable in G; the map is an orthogonal projection, hence self-adjoint (its cotangent is the same
    projection of the upstream cotangent). On one process this is :func:`~easyedit_agrade.kernels.project_out`
    (one fused kernel on CUDA). ``all_reduce`` (data-parallel editing: each rank holds some rows of G and G_prev)
    sums :func:`eq4_inner_products` over ranks, differentiably, so every rank applies the global coefficient.
    """
    if G_prev is None or G_prev.shape != G.shape:
        return G
    if all_reduce is None:
        return project_out(G, G_prev, backend=backend)[0]
    num, den = eq4_inner_products(G, G_prev)
    both = all_reduce(torch.stack([num, den.detach()]))
    coefficient = eq4_coefficient(both[0], both[1].detach())
    return G if coefficient is None else eq4_subtract(G, G_prev, coefficient)


def eq5_delta(fact: RidgeFactorization, G: torch.Tensor) -> torch.Tensor:
    """Eq 5: ΔW = M⁻¹ HᵀG → (Dh, Dg) from the rows G (no autograd history; the dual form never builds HᵀG)."""
    return fact.solve_delta(G.detach())


def eq5_rhs(H: torch.Tensor, G: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Eq 5's right-hand side HᵀG for a piece of rows, added in place to ``out`` (Dh × Dg, its dtype is the
    accumulator's) — summed over pieces (and ranks) for :func:`eq5_delta_from_rhs`."""
    return out.addmm_(H.detach().to(out.dtype).T, G.detach().to(out.dtype))


def eq5_delta_from_rhs(fact: RidgeFactorization, rhs: torch.Tensor) -> torch.Tensor:
    """Eq 5: ΔW = M⁻¹ (HᵀG) from the accumulated :func:`eq5_rhs` (streamed / data-parallel; no autograd history)."""
    return fact.solve(rhs)


def eq6_projected_gradient(fact: RidgeFactorization, H: torch.Tensor, g_theta: torch.Tensor,
                           use_gradient_projection: bool = True) -> torch.Tensor:
    """Eq 6: P = H M⁻¹ g_θ (g_θ = ∂L/∂ΔW in the (Dh, Dg) layout) → (T, Dg).

    ``use_gradient_projection=False`` is the "w/o gradient projection" ablation: P = H g_θ (no M⁻¹ weighting;
    then eq 7's gradient is no longer the exact meta-gradient).
    """
    if use_gradient_projection:
        return fact.project(g_theta)
    return H.detach().to(g_theta.dtype) @ g_theta


def eq7_surrogate_loss(P: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Eq 7: L_AGRADE = Σ_i Σ_j P_ij G_ij (P detached). Its gradient w.r.t. the hypernetwork parameters and η
    equals the meta-gradient ⟨g_θ, ∂ΔW/∂·⟩ because ∂⟨g_θ, M⁻¹HᵀG⟩/∂G = H M⁻¹ g_θ = P (M symmetric)."""
    return (P.detach() * G).sum()


def lambda_gradient(fact: RidgeFactorization, g_theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """∂L/∂λ = −e^λ ⟨M⁻¹ g_θ, ΔW⟩ (from dM/dλ = e^λ I in eq 3 and eq 5): dΔW/dλ = −e^λ M⁻¹ ΔW."""
    return fact.lambda_grad(g_theta, delta)


def eq6_and_lambda_gradient(fact: RidgeFactorization, H: torch.Tensor, g_theta: torch.Tensor, delta: torch.Tensor,
                            *, use_gradient_projection: bool = True,
                            regularization: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(P of eq 6, ∂L/∂λ or None without regularisation), sharing one solve when both are needed."""
    P, lam, _ = eq6_and_ridge_gradients(fact, H, g_theta, delta, use_gradient_projection=use_gradient_projection,
                                        regularization=regularization)
    return P, lam


def eq6_and_ridge_gradients(fact, H: torch.Tensor, g_theta: torch.Tensor, delta: torch.Tensor, *,
                            use_gradient_projection: bool = True, regularization: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(P of eq 6, ∂L/∂λ, ∂L/∂μ), sharing one solve: ∂L/∂λ = −e^λ ⟨M⁻¹g_θ, ΔW⟩ and, with the preserved-knowledge
    term, ∂L/∂μ = −e^μ ⟨M⁻¹g_θ, C₀ΔW⟩ (dM/dμ = e^μ C₀); None where the parameter is not in the solve."""
    preserved = hasattr(fact, "project_and_ridge_grads")
    if regularization and use_gradient_projection:
        if preserved:
            return fact.project_and_ridge_grads(g_theta, delta)
        P, lam = fact.project_and_lambda_grad(g_theta, delta)
        return P, lam, None
    P = eq6_projected_gradient(fact, H, g_theta, use_gradient_projection)
    if not regularization:
        return P, None, None
    if preserved:
        return (P, *fact.project_and_ridge_grads(g_theta, delta)[1:])
    return P, lambda_gradient(fact, g_theta, delta), None
