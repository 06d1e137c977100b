"""Backend choice (Triton or torch) and the public row-wise / Gram ops.

Rule: ``backend`` argument > ``EASYEDIT_AGRADE_KERNELS`` env var (``auto``|``torch``|``triton``) > ``auto``.
``auto`` picks Triton for CUDA tensors when the ``triton`` package is importable, torch otherwise. Forcing
``triton`` where it cannot run raises a ``RuntimeError``; CPU tensors are allowed only with
``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests). Triton is imported only when it runs.

Autograd: :func:`adjust_and_scale` (eqs 1–2) and :func:`project_out` (eq 4) are differentiable on both backends —
the torch backend through autograd of the reference ops, the Triton backend through :class:`AdjustAndScale` and
:class:`ProjectOut` (``torch.autograd.Function``\ s whose backward is :func:`adjust_and_scale_backward` /
the eq 4 projection of the cotangent). :func:`gram` and :func:`adjust_and_scale_backward` run under
``torch.no_grad()``.
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
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Gram matrix HᵀH of eq 3 (add e^λ I yourself or use ``factorize``), streamed over T.

    ``H`` is a (T, D) tensor or an iterable of (t, D) row-chunks (H need not be resident). Accumulates in
    fp32 (fp64 for fp64 input); extra memory O(D² + chunk·D). ``lower_only`` leaves the strict upper
    triangle zero (enough for Cholesky). ``out`` (D × D): add HᵀH to it in place and return it, accumulating
    in ``out``'s dtype — for Grams summed over cached pieces (start from zeros; pass the same ``lower_only``
    every time). The torch backend casts and multiplies ``chunk_size`` rows at a time; the Triton kernel
    streams a tensor's rows itself and casts tiles in registers.
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
    if out is not None and (out.dim() != 2 or out.shape != (first.shape[1], first.shape[1])
                            or out.device != first.device):
        raise ValueError(f"out must be ({first.shape[1]}, {first.shape[1]}) on {first.device}, "
                         f"got {tuple(out.shape)} on {out.device}")
    if resolve_backend(first, backend) == "triton":
        return _triton_ops().gram(whole, lower_only=lower_only, out=out)
    if out is None:
        return ref.gram_ref(source, chunk_size=chunk_size, lower_only=lower_only)
    return out.add_(ref.gram_ref(source, chunk_size=chunk_size, lower_only=lower_only, dtype=out.dtype))


def _check_adjust_inputs(H: torch.Tensor, H_tilde: torch.Tensor, grad_tilde: torch.Tensor) -> None:
    if H.dim() != 2:
        raise ValueError(f"H must be 2-D (T, Dh), got shape {tuple(H.shape)}")
    if H_tilde.shape != H.shape:
        raise ValueError(f"H_tilde shape {tuple(H_tilde.shape)} does not match H shape {tuple(H.shape)}")
    _check_rows("H_tilde", H_tilde, H.shape[0], H)
    _check_rows("grad_tilde", grad_tilde, H.shape[0], H)


def _wants_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def adjust_and_scale(
    H: torch.Tensor,
    H_tilde: torch.Tensor,
    grad_tilde: torch.Tensor,
    eta: Scalar,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs 1–2 fused: c_i = −η Σ_j H_ij H̃_ij (eq 1), G = c ⊙ ∇G̃ (eq 2). Returns (c (T,), G (T, Dg)).

    G is differentiable in H̃, ∇G̃ and η (H is data). On the Triton backend that goes through
    :class:`AdjustAndScale` (c then carries no gradient, and H must not require one)."""
    _check_adjust_inputs(H, H_tilde, grad_tilde)
    if isinstance(eta, torch.Tensor) and eta.numel() != 1:
        raise ValueError(f"eta must be a scalar, got a tensor of shape {tuple(eta.shape)}")
    chosen = resolve_backend(H, backend)
    if chosen == "torch":
        return ref.adjust_and_scale_ref(H, H_tilde, grad_tilde, eta)
    if _wants_grad(H, H_tilde, grad_tilde, eta):
        return AdjustAndScale.apply(H, H_tilde, grad_tilde, eta, chosen)
    with torch.no_grad():
        return _triton_ops().adjust_and_scale(H, H_tilde, grad_tilde, eta)


def project_out(
    G: torch.Tensor, G_prev: torch.Tensor | None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 4: G − (⟨G, G_prev⟩ / ⟨G_prev, G_prev⟩) G_prev. Returns (G_projected, alpha (0-d)).

    G_prev None or ⟨G_prev, G_prev⟩ = 0 gives G (in the compute dtype) and alpha = 0; mismatched shapes
    raise ``ValueError``. Differentiable in G (G_prev is treated as a constant); the eq 4 cotangent is the same
    projection applied to the upstream cotangent, which is what :class:`ProjectOut` does on the Triton backend.
    """
    if G.dim() != 2:
        raise ValueError(f"G must be 2-D (T, Dg), got shape {tuple(G.shape)}")
    if G_prev is not None:
        if G_prev.shape != G.shape:
            raise ValueError(f"G_prev shape {tuple(G_prev.shape)} does not match G shape {tuple(G.shape)}")
        _check_rows("G_prev", G_prev, G.shape[0], G)
        chosen = resolve_backend(G, backend)
        if chosen == "triton":
            if _wants_grad(G):
                return ProjectOut.apply(G, G_prev, chosen)
            with torch.no_grad():
                return _triton_ops().project_out(G, G_prev.detach())
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


def _like(grad: torch.Tensor, x) -> torch.Tensor | None:
    """``grad`` in ``x``'s shape and dtype, or None when ``x`` takes no gradient."""
    if not isinstance(x, torch.Tensor) or not x.requires_grad:
        return None
    return grad.reshape(x.shape).to(x.dtype)


class AdjustAndScale(torch.autograd.Function):
    """Eqs 1–2 with the fused backward: forward :func:`adjust_and_scale`, backward :func:`adjust_and_scale_backward`
    on the given backend (what the Triton backend uses when training). ``apply(H, H_tilde, grad_tilde, eta,
    backend)`` → (c, G); only G is differentiable, in H̃, ∇G̃ and η (H is data and must not require grad)."""

    @staticmethod
    def forward(ctx, H, H_tilde, grad_tilde, eta, backend):
        if ctx.needs_input_grad[0]:
            raise ValueError("AdjustAndScale differentiates in H_tilde, grad_tilde and eta only; detach H")
        with torch.no_grad():
            if resolve_backend(H, backend) == "triton":
                c, G = _triton_ops().adjust_and_scale(H, H_tilde, grad_tilde, eta)
            else:
                c, G = ref.adjust_and_scale_ref(H, H_tilde, grad_tilde, eta)
        ctx.save_for_backward(H, H_tilde, grad_tilde, c)
        ctx.eta, ctx.backend = eta, backend
        ctx.mark_non_differentiable(c)
        return c, G

    @staticmethod
    def backward(ctx, _dc, dG):
        H, H_tilde, grad_tilde, c = ctx.saved_tensors
        eta = ctx.eta.detach() if isinstance(ctx.eta, torch.Tensor) else ctx.eta
        d_ht, d_gt, d_eta = adjust_and_scale_backward(dG, H, H_tilde, grad_tilde, c, eta, ctx.backend)
        return None, _like(d_ht, H_tilde), _like(d_gt, grad_tilde), _like(d_eta, ctx.eta), None


class ProjectOut(torch.autograd.Function):
    """Eq 4 with its self-adjoint backward: forward :func:`project_out`, backward the same projection of the
    upstream cotangent (on the given backend). ``apply(G, G_prev, backend)`` → (G_projected, alpha); only
    G_projected is differentiable, in G (G_prev is a constant)."""

    @staticmethod
    def forward(ctx, G, G_prev, backend):
        with torch.no_grad():
            if resolve_backend(G, backend) == "triton":
                out, alpha = _triton_ops().project_out(G, G_prev)
            else:
                out, alpha = ref.project_out_ref(G, G_prev)
        ctx.save_for_backward(G_prev)
        ctx.backend, ctx.g_dtype = backend, G.dtype
        ctx.mark_non_differentiable(alpha)
        return out, alpha

    @staticmethod
    def backward(ctx, d_out, _d_alpha):
        (G_prev,) = ctx.saved_tensors
        with torch.no_grad():
            if resolve_backend(d_out, ctx.backend) == "triton":
                d_G, _ = _triton_ops().project_out(d_out, G_prev)
            else:
                d_G, _ = ref.project_out_ref(d_out, G_prev)
        return d_G.to(ctx.g_dtype), None, None
