"""Backend choice (Triton or torch) and the public row-wise / Gram ops.

Rule: ``backend`` argument > ``EASYEDIT_AGRADE_KERNELS`` env var (``auto``|``torch``|``triton``) > ``auto``.
``auto`` picks Triton for CUDA tensors when the ``triton`` package is importable, torch otherwise. Forcing
``triton`` where it cannot run raises a ``RuntimeError``; CPU tensors are allowed only with
``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests). Triton is imported only when it runs.

All ops run under ``torch.no_grad()``: outputs never carry autograd history, whichever backend ran
(the editor applies the cotangents itself, see ``adjust_and_scale_backward``).
"""
from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Iterable
from functools import lru_cache

import torch

from . import reference as ref
from .reference import Scalar

ENV_VAR = "EASYEDIT_AGRADE_KERNELS"
BACKENDS = ("auto", "torch", "triton")


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _triton_refusal(t: torch.Tensor) -> str | None:
    """Why Triton cannot run on ``t``, or None when it can."""
    if not triton_importable():
        return "the triton package is not installed"
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return f"Triton kernels need CUDA tensors (got device {t.device}); set TRITON_INTERPRET=1 to interpret on CPU"


def resolve_backend(t: torch.Tensor, backend: str | None = None) -> str:
    """Return "triton" or "torch" for ops on tensor ``t`` (argument > env var > auto, see module doc)."""
    choice = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; expected one of {BACKENDS}")
    if choice == "torch":
        return "torch"
    refusal = _triton_refusal(t)
    if choice == "triton":
        if refusal is not None:
            raise RuntimeError(f"kernel backend 'triton' was requested but cannot run: {refusal}")
        return "triton"
    return "triton" if refusal is None and t.device.type == "cuda" else "torch"


def _triton_ops():
    from . import triton_ops

    return triton_ops


def _check_rows(name: str, x: torch.Tensor, rows: int, like: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[0] != rows:
        raise ValueError(f"{name} must be 2-D with {rows} rows, got shape {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device}, expected {like.device}")


@torch.no_grad()
def gram(
    H: torch.Tensor | Iterable[torch.Tensor],
    *,
    chunk_size: int = 4096,
    lower_only: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Gram matrix HᵀH of eq 3 (add e^λ I yourself or use ``factorize``), streamed over T.

    ``H`` is a (T, D) tensor or an iterable of (t, D) row-chunks (H need not be resident). Accumulates in
    fp32 (fp64 for fp64 input); extra memory O(D² + chunk·D). ``lower_only`` leaves the strict upper
    triangle zero (enough for Cholesky). The torch backend casts and multiplies ``chunk_size`` rows at a
    time; the Triton kernel streams a tensor's rows itself and casts tiles in registers.
    """
    if isinstance(H, torch.Tensor):
        if H.dim() != 2:
            raise ValueError(f"H must be 2-D (T, D), got shape {tuple(H.shape)}")
        first, source, whole = H, H, [H]
    else:
        chunks = ref.row_chunks(H, chunk_size)
        first = next(chunks, None)
        if first is None:
            raise ValueError("H has no row-chunks; pass a (0, D) tensor for an empty H")
        source = whole = itertools.chain([first], chunks)
    if resolve_backend(first, backend) == "triton":
        return _triton_ops().gram(whole, lower_only=lower_only)
    return ref.gram_ref(source, chunk_size=chunk_size, lower_only=lower_only)


@torch.no_grad()
def adjust_and_scale(
    H: torch.Tensor,
    H_tilde: torch.Tensor,
    grad_tilde: torch.Tensor,
    eta: Scalar,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs 1–2 fused: c_i = −η Σ_j H_ij H̃_ij (eq 1), G = c ⊙ ∇G̃ (eq 2). Returns (c (T,), G (T, Dg))."""
    if H.dim() != 2:
        raise ValueError(f"H must be 2-D (T, Dh), got shape {tuple(H.shape)}")
    if H_tilde.shape != H.shape:
        raise ValueError(f"H_tilde shape {tuple(H_tilde.shape)} does not match H shape {tuple(H.shape)}")
    _check_rows("H_tilde", H_tilde, H.shape[0], H)
    _check_rows("grad_tilde", grad_tilde, H.shape[0], H)
    if resolve_backend(H, backend) == "triton":
        return _triton_ops().adjust_and_scale(H, H_tilde, grad_tilde, eta)
    cd = ref.compute_dtype(H, H_tilde, grad_tilde)
    return ref.adjust_and_scale_ref(H, H_tilde, grad_tilde, ref.as_scalar_tensor(eta, H, cd))


@torch.no_grad()
def project_out(
    G: torch.Tensor, G_prev: torch.Tensor | None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 4: G − (⟨G, G_prev⟩ / ⟨G_prev, G_prev⟩) G_prev. Returns (G_projected, alpha (0-d)).

    G_prev None or ⟨G_prev, G_prev⟩ = 0 gives G (in the compute dtype) and alpha = 0; mismatched shapes
    raise ``ValueError``. The eq 4 cotangent is the same projection applied to the upstream cotangent.
    """
    if G.dim() != 2:
        raise ValueError(f"G must be 2-D (T, Dg), got shape {tuple(G.shape)}")
    if G_prev is not None:
        if G_prev.shape != G.shape:
            raise ValueError(f"G_prev shape {tuple(G_prev.shape)} does not match G shape {tuple(G.shape)}")
        _check_rows("G_prev", G_prev, G.shape[0], G)
        if resolve_backend(G, backend) == "triton":
            return _triton_ops().project_out(G, G_prev)
    return ref.project_out_ref(G, G_prev)


@torch.no_grad()
def adjust_and_scale_backward(
    P: torch.Tensor,
    H: torch.Tensor,
    H_tilde: torch.Tensor,
    grad_tilde: torch.Tensor,
    c: torch.Tensor,
    eta: Scalar,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training cotangents of eqs 1–2 for an upstream cotangent ``P`` of G, fused in one pass.

    u_i = ⟨P_i, ∇G̃_i⟩; returns (dH̃ = −η u_i H_i, d∇G̃ = c_i P_i, dη = −Σ_i u_i ⟨H_i, H̃_i⟩ (0-d)).
    When eq 4 sits between eq 2 and the loss, pass ``project_out(P, G_prev)[0]`` as ``P``.
    """
    if H.dim() != 2 or H_tilde.shape != H.shape:
        raise ValueError(f"H and H_tilde must be 2-D of one shape, got {tuple(H.shape)}, {tuple(H_tilde.shape)}")
    _check_rows("H_tilde", H_tilde, H.shape[0], H)
    _check_rows("grad_tilde", grad_tilde, H.shape[0], H)
    _check_rows("P", P, H.shape[0], H)
    if P.shape != grad_tilde.shape:
        raise ValueError(f"P shape {tuple(P.shape)} does not match grad_tilde shape {tuple(grad_tilde.shape)}")
    if c.shape != (H.shape[0],):
        raise ValueError(f"c must have shape ({H.shape[0]},), got {tuple(c.shape)}")
    if resolve_backend(H, backend) == "triton":
        return _triton_ops().adjust_and_scale_backward(P, H, H_tilde, grad_tilde, c, eta)
    cd = ref.compute_dtype(P, H, H_tilde, grad_tilde, c)
    return ref.adjust_and_scale_backward_ref(P, H, H_tilde, grad_tilde, c, ref.as_scalar_tensor(eta, H, cd))
