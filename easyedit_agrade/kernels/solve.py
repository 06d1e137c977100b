"""Ridge factorisation of eq 3, reused by eq 5 (ΔW) and eq 6 (P), with the dual (Woodbury) form for T < Dh.

Primal: factor M = HᵀH + e^λ I (Dh × Dh).  Dual: factor K = HHᵀ + e^λ I_T (T × T) and use the push-through
identity M⁻¹Hᵀ = HᵀK⁻¹, so ΔW = HᵀK⁻¹G, P = K⁻¹(H g_θ) and M⁻¹B = (B − HᵀK⁻¹HB)/e^λ.

``method="auto"`` picks the dual exactly when 0 < T < Dh. Cost model (FLOPs, symmetric Gram):
primal T·Dh² + Dh³/3 + 2·Dh²·Dg per solve, dual T²·Dh + T³/3 + 2·T²·Dg per solve; the GEMMs with H
(2·T·Dh·Dg each) are common to both. Every term of the dual is smaller iff T < Dh, and so is its memory (T²).

Checked Cholesky, fallback chain (recorded in ``info["fallback"]``):
1. ``cholesky_ex`` in the compute dtype (fp32; fp64 for fp64 input); a non-finite Gram also counts as failure;
2. if that was fp32: the Gram is recomputed from H in fp64 (chunked) and factored in fp64 — no warning,
   the factor then stays fp64 and solves cast the right-hand sides;
3. diagonal jitter ε·mean(diag) I with ε = 1e-12, 1e-10, …, 1e-2, with a ``RuntimeWarning``;
4. otherwise :class:`FactorizationError` — a NaN/Inf factor is never returned.

``log_lambda=None`` (the "w/o regularization" ablation, M = HᵀH possibly singular) gives the minimum-norm
least-squares solution: the pseudo-inverse of the Gram (HᵀH)⁺, or (HHᵀ)⁺ in the dual, from an fp64
eigendecomposition with eigenvalues below n·eps64·max treated as zero. Then ΔW = H⁺G = Hᵀ(HHᵀ)⁺G.

Memory beyond the inputs and outputs: the Gram/K and its factor (2·n², n = Dh or T), one chunk of H cast to
the compute dtype (chunk·Dh) and the (Dh × Dg) or (T × Dg) right-hand side.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from . import dispatch
from . import reference as ref

METHODS = ("auto", "primal", "dual")
JITTERS = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


class FactorizationError(RuntimeError):
    """The ridge system could not be factored into a finite factor (see the fallback chain in ``solve``)."""


def choose_method(T: int, Dh: int) -> str:
    """``"dual"`` iff 0 < T < Dh (the cost model in the module docstring), else ``"primal"``."""
    return "dual" if 0 < T < Dh else "primal"


def _exp_lambda(log_lambda: float | torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lam = torch.exp(ref.as_scalar_tensor(log_lambda, like, dtype))
    if not bool(torch.isfinite(lam)):
        raise ValueError(f"e^log_lambda is not finite in {dtype} (log_lambda={float(log_lambda):g})")
    return lam


def _cholesky(matrix: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor, or None when the matrix is not (numerically) positive definite or not finite."""
    if not bool(torch.isfinite(matrix).all()):
        return None
    L, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0 or not bool(torch.isfinite(L.diagonal()).all()):
        return None
    return L


def _checked_cholesky(
    build: Callable[[torch.dtype], torch.Tensor], dtype: torch.dtype, info: dict
) -> torch.Tensor:
    """Factor ``build(dtype)`` (lower triangle read) following the fallback chain of the module docstring."""
    matrix = build(dtype)
    L = _cholesky(matrix)
    if L is None and dtype != torch.float64:
        matrix = build(torch.float64)
        L = _cholesky(matrix)
        info["fallback"] = "fp64"
    if L is None and bool(torch.isfinite(matrix).all()):
        diag = matrix.diagonal()
        scale = float(diag.abs().mean()) if diag.numel() else 1.0
        scale = scale if scale > 0 else 1.0
        for eps in JITTERS:
            jittered = matrix.clone()
            jittered.diagonal().add_(eps * scale)
            L = _cholesky(jittered)
            if L is not None:
                info.update(fallback="jitter", jitter=eps * scale)
                warnings.warn(
                    f"ridge matrix is not numerically positive definite even in fp64; added diagonal jitter "
                    f"{eps * scale:.3g} ({eps:g} x mean diagonal) to factor it",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
    if L is None:
        raise FactorizationError(
            "Cholesky of the ridge matrix failed in the compute dtype, in fp64 and with diagonal jitter up to "
            f"{JITTERS[-1]:g} x mean diagonal; H or e^log_lambda probably contains NaN/Inf"
        )
    diag = L.diagonal()
    info["cond_est"] = float((diag.max() / diag.min()) ** 2) if diag.numel() else 1.0
    return L


def _pinv_factor(gram64: torch.Tensor, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, 1/w with tiny w zeroed) of the fp64 eigendecomposition of a PSD Gram: A⁺ = V diag(1/w) Vᵀ."""
    if not bool(torch.isfinite(gram64).all()):
        raise FactorizationError("the Gram matrix has NaN/Inf entries; H contains non-finite values")
    w, V = torch.linalg.eigh(gram64)
    n = w.numel()
    top = float(w.max()) if n else 0.0
    keep = w > max(top, 0.0) * n * torch.finfo(torch.float64).eps
    inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    rank = int(keep.sum())
    info.update(rank=rank, cond_est=top / float(w[keep].min()) if rank else math.inf)
    return V, inv


def _ht_mm(H: torch.Tensor, Y: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """HᵀY (Dh × k) with H cast ``chunk`` rows at a time."""
    if H.dtype == dtype:
        return H.T @ Y
    out = torch.zeros(H.shape[1], Y.shape[1], device=Y.device, dtype=dtype)
    for start in range(0, H.shape[0], chunk):
        out.addmm_(H[start:start + chunk].to(dtype).T, Y[start:start + chunk])
    return out


def _h_mm(H: torch.Tensor, X: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """HX (T × k) with H cast ``chunk`` rows at a time."""
    if H.dtype == dtype:
        return H @ X
    out = torch.empty(H.shape[0], X.shape[1], device=X.device, dtype=dtype)
    for start in range(0, H.shape[0], chunk):
        torch.mm(H[start:start + chunk].to(dtype), X, out=out[start:start + chunk])
    return out


class RidgeFactorization:
    """One factorisation of M = HᵀH + e^λ I (eq 3) shared by eq 5, eq 6 and the λ gradient.

    Build it with :func:`factorize`. ``method`` is "primal" or "dual"; ``info`` records the fallback that
    fired ("none" | "fp64" | "jitter"), the jitter, the factor dtype, ``cond_est`` (condition of the factored
    matrix, M or K: (max/min Cholesky diagonal)², a lower bound; eigenvalue ratio for ``log_lambda=None``),
    ``exp_lambda`` (e^λ), and for ``log_lambda=None`` the numerical ``rank``.
    Results are in the compute dtype (fp32, or fp64 for fp64 H) and carry no autograd history.
    """

    def __init__(
        self,
        H: torch.Tensor,
        method: str,
        lam: torch.Tensor | None,
        factor: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        chunk_size: int,
        info: dict,
    ) -> None:
        self.method = method
        self.info = info
        self._H = H
        self._lam = lam
        self._factor = factor
        self._chunk = chunk_size
        self._dtype = ref.compute_dtype(H)

    def _inv(self, B: torch.Tensor) -> torch.Tensor:
        """A⁻¹B (A⁺B without λ) for the factored matrix A (M in the primal, K in the dual)."""
        if isinstance(self._factor, tuple):
            V, inv = self._factor
            y = V @ (inv[:, None] * (V.T @ B.to(V.dtype)))
        else:
            y = torch.cholesky_solve(B.to(self._factor.dtype), self._factor)
        return y.to(self._dtype)

    def _rhs(self, name: str, X: torch.Tensor, rows: int) -> torch.Tensor:
        if X.dim() != 2 or X.shape[0] != rows:
            raise ValueError(f"{name} must be 2-D with {rows} rows, got shape {tuple(X.shape)}")
        return X.to(device=self._H.device, dtype=self._dtype)

    def _ht(self, Y: torch.Tensor) -> torch.Tensor:
        return _ht_mm(self._H, Y, self._chunk, self._dtype)

    def _hx(self, X: torch.Tensor) -> torch.Tensor:
        return _h_mm(self._H, X, self._chunk, self._dtype)

    @torch.no_grad()
    def solve_delta(self, G: torch.Tensor) -> torch.Tensor:
        """Eq 5: ΔW = M⁻¹HᵀG (dual: HᵀK⁻¹G), shape (Dh, Dg), for G of shape (T, Dg)."""
        G = self._rhs("G", G, self._H.shape[0])
        if self.method == "dual":
            return self._ht(self._inv(G))
        return self._inv(self._ht(G))

    @torch.no_grad()
    def project(self, g_theta: torch.Tensor) -> torch.Tensor:
        """Eq 6: P = H M⁻¹ g_θ (dual: K⁻¹ H g_θ), shape (T, Dg), for g_θ = ∂L/∂ΔW of shape (Dh, Dg)."""
        g = self._rhs("g_theta", g_theta, self._H.shape[1])
        if self.method == "dual":
            return self._inv(self._hx(g))
        return self._hx(self._inv(g))

    @torch.no_grad()
    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """M⁻¹B (M⁺B for ``log_lambda=None``) for B of shape (Dh, k).

        In the dual, M⁻¹B = (B − HᵀK⁻¹HB)/e^λ loses digits by cancellation when e^λ ≪ ‖H‖²; use the primal
        method when you need M⁻¹ of arbitrary right-hand sides with tiny λ.
        """
        B = self._rhs("B", B, self._H.shape[1])
        if self.method == "primal":
            return self._inv(B)
        if self._lam is None:
            return self._ht(self._inv(self._inv(self._hx(B))))
        return (B - self._ht(self._inv(self._hx(B)))) / self._lam

    @torch.no_grad()
    def lambda_grad(self, g_theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """∂L/∂λ = −e^λ ⟨M⁻¹ g_θ, ΔW⟩ (0-d), from d/dλ of eq 5 with M of eq 3: dΔW/dλ = −e^λ M⁻¹ΔW.

        In training use :meth:`project_and_lambda_grad`, which shares the solve with eq 6.
        """
        return self.project_and_lambda_grad(g_theta, delta)[1]

    @torch.no_grad()
    def project_and_lambda_grad(
        self, g_theta: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P of eq 6, ∂L/∂λ) with one solve: primal X = M⁻¹g_θ gives P = HX and −e^λ⟨X, ΔW⟩; dual
        P = K⁻¹Hg_θ gives e^λ M⁻¹g_θ = g_θ − HᵀP, so ∂L/∂λ = −⟨g_θ − HᵀP, ΔW⟩ without dividing by e^λ."""
        if self._lam is None:
            raise ValueError("lambda_grad is undefined for the unregularised factorisation (log_lambda=None)")
        g = self._rhs("g_theta", g_theta, self._H.shape[1])
        d = self._rhs("delta", delta, self._H.shape[1])
        if d.shape != g.shape:
            raise ValueError(f"delta shape {tuple(d.shape)} does not match g_theta shape {tuple(g.shape)}")
        if self.method == "primal":
            X = self._inv(g)
            return self._hx(X), -self._lam * (X * d).sum()
        P = self._inv(self._hx(g))
        return P, -((g - self._ht(P)) * d).sum()


@torch.no_grad()
def factorize(
    H: torch.Tensor,
    log_lambda: float | torch.Tensor | None,
    *,
    method: str = "auto",
    chunk_size: int = 4096,
    backend: str | None = None,
) -> RidgeFactorization:
    """Factor M = HᵀH + e^λ I of eq 3 once, for eq 5 (``solve_delta``) and eq 6 (``project``).

    ``method``: "auto" (dual iff 0 < T < Dh), "primal" or "dual". ``log_lambda=None``: unregularised
    minimum-norm least squares via the pseudo-inverse. ``backend`` selects the Gram kernel (see
    ``resolve_backend``). Raises :class:`FactorizationError` rather than returning a non-finite factor.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if H.dim() != 2:
        raise ValueError(f"H must be 2-D (T, Dh), got shape {tuple(H.shape)}")
    H = H.detach()
    T, Dh = H.shape
    chosen = choose_method(T, Dh) if method == "auto" else method
    rows = H if chosen == "primal" else H.T  # Gram of rows: HᵀH (Dh × Dh) or HHᵀ (T × T)
    dtype = ref.compute_dtype(H)
    info: dict = {"method": chosen, "fallback": "none", "jitter": 0.0}

    if log_lambda is None:
        factor = _pinv_factor(ref.gram_ref(rows, chunk_size=chunk_size, dtype=torch.float64), info)
        info.update(exp_lambda=None, factor_dtype=str(torch.float64))
        return RidgeFactorization(H, chosen, None, factor, chunk_size, info)

    lam = _exp_lambda(log_lambda, H, dtype)

    def build(build_dtype: torch.dtype) -> torch.Tensor:
        if build_dtype == dtype:
            A = dispatch.gram(rows, chunk_size=chunk_size, lower_only=True, backend=backend)
        else:
            A = ref.gram_ref(rows, chunk_size=chunk_size, lower_only=True, dtype=build_dtype)
        A.diagonal().add_(_exp_lambda(log_lambda, H, build_dtype))
        return A

    L = _checked_cholesky(build, dtype, info)
    info.update(exp_lambda=float(lam), factor_dtype=str(L.dtype))
    return RidgeFactorization(H, chosen, lam, L, chunk_size, info)


@torch.no_grad()
def factorize_gram(
    gram: torch.Tensor,
    log_lambda: float | torch.Tensor | None,
    H: torch.Tensor | None = None,
    *,
    chunk_size: int = 4096,
) -> RidgeFactorization:
    """Primal factorisation of eq 3 from a Gram HᵀH computed elsewhere — summed over row-chunks streamed from
    a cache, or all-reduced over the ranks of a data-parallel edit (each rank holds only its own rows of H).

    ``gram`` (Dh × Dh; only the lower triangle is read) is the full HᵀH; ``H`` (optional) are the rows this
    process holds, used by :meth:`RidgeFactorization.project` (P = H M⁻¹ g_θ stays local). Use
    :meth:`RidgeFactorization.solve` on the (all-reduced) HᵀG for eq 5 — ``solve_delta`` would only see the local
    rows. Same fallback chain as :func:`factorize`, except that the fp64 retry casts the given Gram (its rows
    are gone) instead of recomputing it.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (Dh, Dh), got shape {tuple(gram.shape)}")
    Dh = gram.shape[0]
    dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
    if H is None:
        H = torch.empty(0, Dh, dtype=dtype, device=gram.device)
    elif H.dim() != 2 or H.shape[1] != Dh:
        raise ValueError(f"H must be (T, {Dh}), got shape {tuple(H.shape)}")
    H = H.detach()
    info: dict = {"method": "primal", "fallback": "none", "jitter": 0.0, "from_gram": True}
    if log_lambda is None:
        lower = gram.tril().to(torch.float64)
        factor = _pinv_factor(lower + lower.tril(-1).T, info)
        info.update(exp_lambda=None, factor_dtype=str(torch.float64))
        return RidgeFactorization(H, "primal", None, factor, chunk_size, info)
    lam = _exp_lambda(log_lambda, gram, dtype)

    def build(build_dtype: torch.dtype) -> torch.Tensor:  # one Dh×Dh copy besides the given Gram and the factor
        A = gram.tril().to(build_dtype)
        A.diagonal().add_(_exp_lambda(log_lambda, gram, build_dtype))
        return A

    L = _checked_cholesky(build, dtype, info)
    info.update(exp_lambda=float(lam), factor_dtype=str(L.dtype))
    fact = RidgeFactorization(H, "primal", lam, L, chunk_size, info)
    fact._dtype = dtype  # results in the Gram's precision even when the local rows H are fp32
    return fact
