"""Eq 3 with a preserved-knowledge term: M = HᵀH + e^λ I + e^μ C₀, optionally on the null space of C₀.

C₀ = E[k kᵀ] is the uncentred second moment of the edited module's input keys over ordinary text (MEMIT's
"mom2"; see :mod:`easyedit_agrade.core.preserved_stats`). Eq 3's scalar ridge e^λ I treats every input direction
alike; e^μ C₀ makes the solve pay for changing the output on the directions ordinary text uses.

**Factorisation.** C₀ = U diag(s) Uᵀ is eigendecomposed once per module (:class:`PreservedKeys`). A basis B = U
(every direction) or B = U[:, s ≤ τ·s_max] (the AlphaEdit-style *null space* of C₀'s dominant subspace: ΔW is
then confined to directions ordinary text barely uses, so k·ΔW ≈ 0 for the dominant keys k) makes the regulariser
diagonal: R = Bᵀ(e^λ I + e^μ C₀)B = diag(d), d = e^λ + e^μ s. With the whitened rows H' = H B diag(d)^-½ the
system Bᵀ(HᵀH)B + diag(d) = diag(d)^½ (H'ᵀH' + I) diag(d)^½ is the plain ridge of eq 3 with λ = 0, so the checked
Cholesky of :mod:`.solve` (primal, or the T×T dual when T < rank B) is reused unchanged:

* eq 5: ΔW = B d^-½ (H'ᵀH' + I)⁻¹ H'ᵀG
* eq 6: P = H B M_B⁻¹ Bᵀ g_θ = H' (H'ᵀH' + I)⁻¹ d^-½ Bᵀ g_θ (M_B = Bᵀ(HᵀH)B + diag(d))
* ∂L/∂λ = −e^λ ⟨M_B⁻¹Bᵀg_θ, BᵀΔW⟩ and ∂L/∂μ = −e^μ ⟨M_B⁻¹Bᵀg_θ, diag(s) BᵀΔW⟩ (dM_B/dλ = e^λ I,
  dM_B/dμ = e^μ diag(s)); by the push-through identity M_B⁻¹Bᵀg_θ = d⁻¹ ⊙ Bᵀ(g_θ − HᵀP), so both come out of
  eq 6's solve without dividing by small numbers: e^λ/d_k and e^μ s_k/d_k lie in [0, 1].

With B = U (no null space) and μ → −∞ this is exactly eq 3 (tested); with the term off the editor never builds
this class, so the plain path stays bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .solve import RidgeFactorization, choose_method, factorize, factorize_gram


@dataclass
class PreservedKeys:
    """C₀'s eigendecomposition for one module, restricted to the kept basis.

    ``basis`` (Dh, r) has orthonormal columns (all of U, or C₀'s null-space eigenvectors); ``eigenvalues`` (r,)
    are C₀'s eigenvalues on those columns (≥ 0); ``n_removed`` counts the dominant directions left out;
    ``top`` is C₀'s largest eigenvalue.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    n_removed: int = 0
    top: float = 0.0

    @property
    def width(self) -> int:
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @classmethod
    def from_second_moment(cls, C0: torch.Tensor, null_space_threshold: float | None = None) -> "PreservedKeys":
        """Eigendecompose ``C0`` (Dh × Dh, symmetric PSD) in fp64. ``null_space_threshold`` τ: keep only the
        eigenvectors with eigenvalue ≤ τ · (largest eigenvalue) — the null space of the dominant subspace (None:
        keep all). Raises ValueError for a non-square / non-finite C₀ or a τ that keeps no direction."""
        if C0.dim() != 2 or C0.shape[0] != C0.shape[1]:
            raise ValueError(f"C0 must be square (Dh, Dh), got shape {tuple(C0.shape)}")
        C = C0.detach().to(torch.float64)
        if not bool(torch.isfinite(C).all()):
            raise ValueError("C0 has NaN/Inf entries")
        s, U = torch.linalg.eigh(0.5 * (C + C.T))
        s = s.clamp_min(0.0)
        top = float(s.max()) if s.numel() else 0.0
        removed = 0
        if null_space_threshold is not None:
            if not null_space_threshold > 0:
                raise ValueError(f"null_space_threshold must be > 0, got {null_space_threshold!r}")
            keep = s <= null_space_threshold * top
            removed = int((~keep).sum())
            if not bool(keep.any()):
                raise ValueError(f"null_space_threshold={null_space_threshold:g} keeps no direction of C0 "
                                 f"(smallest eigenvalue / largest = {float(s.min()) / top:.3g})")
            U, s = U[:, keep], s[keep]
        return cls(U.contiguous(), s.contiguous(), removed, top)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PreservedKeys":
        return PreservedKeys(self.basis.to(device=device, dtype=dtype), self.eigenvalues.to(device=device,
                             dtype=dtype), self.n_removed, self.top)


def regularizer_diagonal(keys: PreservedKeys, log_lambda, log_mu, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(d, e^λ, e^μ or None) with d = e^λ + e^μ s on the kept basis (the diagonal of R = Bᵀ(e^λ I + e^μ C₀)B)."""
    if log_lambda is None:
        raise ValueError("the preserved-knowledge solve needs eq 3's ridge (use_regularization: true)")
    dev = keys.basis.device
    lam = torch.exp(torch.as_tensor(log_lambda, dtype=dtype, device=dev).detach())
    s = keys.eigenvalues.to(dtype)
    if log_mu is None:
        return lam.expand_as(s).clone(), lam, None
    mu = torch.exp(torch.as_tensor(log_mu, dtype=dtype, device=dev).detach())
    d = lam + mu * s
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"e^log_lambda + e^log_mu·s is not finite (log_lambda={float(log_lambda):g}, "
                         f"log_mu={float(log_mu):g})")
    return d, lam, mu


class PreservedRidge:
    """M = HᵀH + e^λ I + e^μ C₀ on the kept basis, factored once for eqs 5 and 6 and the λ/μ gradients.

    Same interface as :class:`~easyedit_agrade.kernels.solve.RidgeFactorization` (``solve_delta``, ``project``,
    ``solve``, ``project_and_lambda_grad``) plus :meth:`project_and_ridge_grads`. Build it with
    :func:`factorize_preserved` (rows H) or :func:`factorize_gram_preserved` (a summed Gram HᵀH).
    """

    def __init__(self, inner: RidgeFactorization, H: torch.Tensor, keys: PreservedKeys, d: torch.Tensor,
                 lam: torch.Tensor, mu: torch.Tensor | None) -> None:
        self.inner, self._H, self.keys = inner, H, keys
        self._dtype = inner._dtype
        self._B = keys.basis.to(self._dtype)
        self._s = keys.eigenvalues.to(self._dtype)
        self._d = d.to(self._dtype)
        self._scale = self._d.rsqrt()
        self._lam, self._mu = lam.to(self._dtype), (None if mu is None else mu.to(self._dtype))
        self.method = inner.method
        self.info = dict(inner.info, preserved=True, basis_rank=keys.rank, n_removed=keys.n_removed,
                         exp_lambda=float(lam), exp_mu=None if mu is None else float(mu))

    # coordinates: x (Dh, k) -> d^-½ Bᵀ x (r, k) and back
    def _down(self, X: torch.Tensor) -> torch.Tensor:
        return self._scale[:, None] * (self._B.T @ X.to(self._dtype))

    def _up(self, Y: torch.Tensor) -> torch.Tensor:
        return self._B @ (self._scale[:, None] * Y.to(self._dtype))

    @torch.no_grad()
    def solve_delta(self, G: torch.Tensor) -> torch.Tensor:
        """Eq 5 with the preserved term: ΔW = B d^-½ (H'ᵀH' + I)⁻¹ H'ᵀG, shape (Dh, Dg)."""
        return self._up(self.inner.solve_delta(G))

    @torch.no_grad()
    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """B_basis M_B⁻¹ B_basisᵀ X for X of shape (Dh, k) (eq 5 from an accumulated HᵀG)."""
        return self._up(self.inner.solve(self._down(B)))

    @torch.no_grad()
    def project(self, g_theta: torch.Tensor) -> torch.Tensor:
        """Eq 6: P = H B M_B⁻¹ Bᵀ g_θ, shape (T, Dg)."""
        return self.inner.project(self._down(g_theta))

    @torch.no_grad()
    def project_and_ridge_grads(self, g_theta: torch.Tensor, delta: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(P of eq 6, ∂L/∂λ, ∂L/∂μ or None) from one solve (module docstring)."""
        g = g_theta.to(self._dtype)
        if g.shape != delta.shape or g.shape[0] != self._B.shape[0]:
            raise ValueError(f"g_theta {tuple(g.shape)} and delta {tuple(delta.shape)} must both be "
                             f"({self._B.shape[0]}, Dg)")
        P = self.project(g)
        H = self._H.to(self._dtype)
        Z = self._B.T @ (g - H.T @ P.to(self._dtype))  # = d ⊙ M_B⁻¹Bᵀg_θ
        W = self._B.T @ delta.to(self._dtype)
        zw = (Z * W).sum(dim=1) / self._d
        lam_grad = -(self._lam * zw).sum()
        mu_grad = None if self._mu is None else -(self._mu * self._s * zw).sum()
        return P, lam_grad, mu_grad

    @torch.no_grad()
    def project_and_lambda_grad(self, g_theta: torch.Tensor, delta: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        P, lam_grad, _ = self.project_and_ridge_grads(g_theta, delta)
        return P, lam_grad

    @torch.no_grad()
    def lambda_grad(self, g_theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.project_and_ridge_grads(g_theta, delta)[1]


@torch.no_grad()
def factorize_preserved(H: torch.Tensor, log_lambda, keys: PreservedKeys, log_mu=None, *, method: str = "auto",
                        backend: str | None = None) -> PreservedRidge:
    """Factor eq 3 with the preserved term from the rows ``H`` (T, Dh): the whitened rows H' = H B d^-½ go
    through :func:`~easyedit_agrade.kernels.solve.factorize` with λ = 0 (``method`` "auto" picks the T×T dual
    when T < rank B)."""
    if H.dim() != 2 or H.shape[1] != keys.width:
        raise ValueError(f"H must be (T, {keys.width}), got shape {tuple(H.shape)}")
    H = H.detach()
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    d, lam, mu = regularizer_diagonal(keys, log_lambda, log_mu, dtype)
    B = keys.basis.to(device=H.device, dtype=dtype)
    H_white = (H.to(dtype) @ B) * d.rsqrt().to(H.device)
    chosen = choose_method(H.shape[0], keys.rank) if method == "auto" else method
    inner = factorize(H_white, 0.0, method=chosen, backend=backend)
    return PreservedRidge(inner, H, keys, d, lam, mu)


@torch.no_grad()
def factorize_gram_preserved(gram: torch.Tensor, log_lambda, keys: PreservedKeys, log_mu=None,
                             H: torch.Tensor | None = None) -> PreservedRidge:
    """The streamed / data-parallel form: ``gram`` = HᵀH summed elsewhere (only its lower triangle is read, as in
    :func:`~easyedit_agrade.kernels.solve.factorize_gram`); ``H`` the rows this process holds (for eq 6). Use
    :meth:`PreservedRidge.solve` on the summed HᵀG for eq 5."""
    if gram.dim() != 2 or gram.shape != (keys.width, keys.width):
        raise ValueError(f"gram must be ({keys.width}, {keys.width}), got shape {tuple(gram.shape)}")
    dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
    d, lam, mu = regularizer_diagonal(keys, log_lambda, log_mu, dtype)
    lower = gram.tril().to(dtype)
    full = lower + lower.tril(-1).T
    B = keys.basis.to(device=gram.device, dtype=dtype)
    scale = d.rsqrt().to(gram.device)
    white = scale[:, None] * (B.T @ full @ B) * scale[None, :]
    if H is None:
        H = torch.empty(0, keys.width, dtype=dtype, device=gram.device)
    H_white = (H.detach().to(dtype) @ B) * scale
    inner = factorize_gram(white, 0.0, H_white)
    return PreservedRidge(inner, H.detach(), keys, d, lam, mu)
