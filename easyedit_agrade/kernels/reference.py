"""Torch reference implementations of AGRADE's per-module linear algebra (the ground truth).

Every function here is plain torch code: it is the torch backend of :mod:`.dispatch` (what CPU runs) and the
ground truth the Triton kernels in ``triton_ops`` are tested against. Eqs 1, 2 and 4 are differentiable through
autograd (the trainer backpropagates through them on the torch backend). Shapes: ``H``, ``H_tilde`` are (T, Dh);
``grad_tilde``, ``G``, ``P`` are (T, Dg). Computation happens in :func:`compute_dtype` of the inputs (fp32, or
fp64 when an input is fp64).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

Scalar = float | torch.Tensor

# Row-panel height of the symmetric Gram: narrower panels skip more of the upper triangle but make
# smaller GEMMs; 384 was fastest on CPU for D in 1376..2048 (about 1.35x faster than a full HᵀH).
SYMMETRIC_PANEL = 384
# Rows per step of the row-wise dot products (a 256 × 1536 fp32 slice is 1.5 MB).
ROW_CHUNK = 256


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any given tensor is fp64, else fp32 (bf16/fp16 inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def as_scalar_tensor(x: Scalar, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached 0-d tensor on ``like``'s device (no host synchronisation for tensor inputs)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"expected a scalar, got a tensor of shape {tuple(x.shape)}")
        return x.detach().reshape(()).to(device=like.device, dtype=dtype)
    return torch.tensor(float(x), device=like.device, dtype=dtype)


def row_chunks(H: torch.Tensor | Iterable[torch.Tensor], chunk_size: int) -> Iterator[torch.Tensor]:
    """Yield (t, D) row blocks of ``H``: slices of a tensor, or the items of an iterable of row-chunks."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(H, torch.Tensor):
        if H.dim() != 2:
            raise ValueError(f"H must be 2-D (T, D), got shape {tuple(H.shape)}")
        for start in range(0, max(H.shape[0], 1), chunk_size):
            yield H[start:start + chunk_size]
        return
    for chunk in H:
        if not isinstance(chunk, torch.Tensor) or chunk.dim() != 2:
            raise ValueError("every row-chunk of H must be a 2-D tensor (t, D)")
        yield chunk


def gram_ref(
    H: torch.Tensor | Iterable[torch.Tensor],
    *,
    chunk_size: int = 4096,
    lower_only: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Gram matrix HᵀH of eq 3 (without the e^λ I term), streamed over T in row-chunks.

    Each chunk is cast to the compute dtype on its own (extra memory O(chunk·D)) and only the lower
    triangle is accumulated, one row panel of SYMMETRIC_PANEL rows at a time (the diagonal blocks are
    computed whole: 5/8 of the FLOPs of a full product for D = 4 panels). With
    ``lower_only`` the strict upper triangle of the result is zero, otherwise it is mirrored.
    ``dtype`` forces the accumulation dtype (default: :func:`compute_dtype` of the first chunk).
    """
    acc: torch.Tensor | None = None
    for chunk in row_chunks(H, chunk_size):
        if acc is None:
            dim = chunk.shape[1]
            acc = torch.zeros(dim, dim, device=chunk.device, dtype=dtype or compute_dtype(chunk))
        elif chunk.shape[1] != acc.shape[0]:
            raise ValueError(f"row-chunks disagree on the width: {chunk.shape[1]} vs {acc.shape[0]}")
        x = chunk.to(acc.dtype)
        for start in range(0, acc.shape[0], SYMMETRIC_PANEL):  # row panel [start:stop, :stop] of the lower part
            stop = min(start + SYMMETRIC_PANEL, acc.shape[0])
            acc[start:stop, :stop].addmm_(x[:, start:stop].T, x[:, :stop])
    if acc is None:
        raise ValueError("H has no row-chunks; pass a (0, D) tensor for an empty H")
    acc.tril_()
    if not lower_only:
        acc.add_(acc.tril(-1).T)
    return acc


def row_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ_j a_ij b_ij per row in ``dtype``, ROW_CHUNK rows at a time: casts and the product temporary stay
    chunk-sized (and in cache)."""
    if a.shape[0] <= ROW_CHUNK:
        return torch.linalg.vecdot(a.to(dtype), b.to(dtype))
    return torch.cat([
        torch.linalg.vecdot(a[start:start + ROW_CHUNK].to(dtype), b[start:start + ROW_CHUNK].to(dtype))
        for start in range(0, a.shape[0], ROW_CHUNK)
    ])


def adjust_and_scale_ref(
    H: torch.Tensor, H_tilde: torch.Tensor, grad_tilde: torch.Tensor, eta: Scalar
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs 1–2: c_i = −η Σ_j H_ij H̃_ij and G = c ⊙ ∇G̃ (row scaling). Returns (c (T,), G (T, Dg)).

    Differentiable in H̃, ∇G̃ and η (a tensor η keeps its autograd history)."""
    dtype = compute_dtype(H, H_tilde, grad_tilde)
    eta_t = eta.to(dtype) if isinstance(eta, torch.Tensor) else eta
    c = -eta_t * (H.to(dtype) * H_tilde.to(dtype)).sum(dim=1)
    return c, c[:, None] * grad_tilde  # type promotion: the result is in c's dtype


def projection_dots_ref(G: torch.Tensor, G_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 4's inner products (⟨G, G_prev⟩, ⟨G_prev, G_prev⟩), G_prev detached: sums over rows, so they can be
    accumulated over row pieces and ranks. Differentiable in G."""
    dtype = compute_dtype(G, G_prev)
    g, p = G.to(dtype), G_prev.detach().to(dtype)
    return (g * p).sum(), (p * p).sum()


def subtract_projection_ref(G: torch.Tensor, G_prev: torch.Tensor, alpha: Scalar) -> torch.Tensor:
    """Eq 4's update G − alpha · G_prev (G_prev detached), for alpha = ⟨G, G_prev⟩ / ⟨G_prev, G_prev⟩."""
    dtype = compute_dtype(G, G_prev)
    return G.to(dtype) - alpha * G_prev.detach().to(dtype)


def project_out_ref(
    G: torch.Tensor, G_prev: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 4: G ← G − (⟨G, G_prev⟩ / ⟨G_prev, G_prev⟩) G_prev with Frobenius inner products (G_prev detached).

    Returns (G_projected, alpha). When G_prev is None or ⟨G_prev, G_prev⟩ = 0 the result is G itself and
    alpha = 0, decided on the device without a host synchronisation. Differentiable in G.
    """
    dtype = compute_dtype(G, G_prev)
    if G_prev is None:
        return G.to(dtype), torch.zeros((), device=G.device, dtype=dtype)
    if G_prev.shape != G.shape:
        raise ValueError(f"G_prev shape {tuple(G_prev.shape)} does not match G shape {tuple(G.shape)}")
    num, den = projection_dots_ref(G, G_prev)
    alpha = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return subtract_projection_ref(G, G_prev, alpha), alpha


def adjust_and_scale_backward_ref(
    P: torch.Tensor,
    H: torch.Tensor,
    H_tilde: torch.Tensor,
    grad_tilde: torch.Tensor,
    c: torch.Tensor,
    eta: Scalar,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cotangents of eqs 1–2 for an upstream cotangent ``P`` of G (H is data, not differentiated).

    With u_i = ⟨P_i, ∇G̃_i⟩: d∇G̃_i = c_i P_i, dH̃_i = −η u_i H_i, dη = −Σ_i u_i ⟨H_i, H̃_i⟩.
    For the eq 4 projection in between, pass the projected cotangent (the projection is self-adjoint).
    Returns (d_H_tilde (T, Dh), d_grad_tilde (T, Dg), d_eta 0-d).
    """
    dtype = compute_dtype(P, H, H_tilde, grad_tilde, c)
    eta_t = eta.to(dtype) if isinstance(eta, torch.Tensor) else eta
    u = row_dot(P, grad_tilde, dtype)
    d_grad_tilde = c.to(dtype)[:, None] * P  # type promotion: results in the compute dtype
    d_H_tilde = (-eta_t * u)[:, None] * H
    d_eta = -torch.dot(u, row_dot(H, H_tilde, dtype))
    return d_H_tilde, d_grad_tilde, d_eta
