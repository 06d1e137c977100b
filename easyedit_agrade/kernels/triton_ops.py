"""Triton kernels for AGRADE's per-module linear algebra (imported lazily; needs triton).

Each wrapper matches the torch reference of the same name in ``reference`` (without ``_ref``): same
arguments, outputs allocated contiguous in the compute dtype (fp32, fp64 for fp64 inputs). Inputs may have
any strides. Pointer offsets are 64-bit, every tile is masked, so sizes need not be multiples of a block.
Kernels run on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (what the tests do).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import triton
import triton.language as tl

from .reference import Scalar, as_scalar_tensor, compute_dtype

GRAM_BLOCK = 64  # output tile edge of the Gram kernel
GRAM_BLOCK_K = 32  # rows of H consumed per step
ROW_BLOCK = 16  # rows per program of the row-wise kernels
MAX_COL_BLOCK = 128  # column tile of the row-wise kernels


def _col_block(width: int) -> int:
    return min(MAX_COL_BLOCK, max(16, triton.next_power_of_2(max(width, 1))))


@triton.jit
def _gram_kernel(
    h_ptr, out_ptr, T, D,
    stride_ht, stride_hd, stride_om, stride_on,
    LOWER_ONLY: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out += HᵀH for one (BLOCK × BLOCK) tile of the lower triangle; mirrors it unless LOWER_ONLY.

    UPCAST casts half-precision tiles to the accumulator dtype before the dot; the interpreter needs it (its
    dot multiplies bf16 bit patterns as integers). The products are exact in fp32 either way.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n > pid_m:
        return
    rm = (pid_m * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rn = (pid_n * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc_ty = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK, BLOCK), dtype=acc_ty)
    for k0 in range(0, T, BLOCK_K):
        rows = k0 + rk
        row_ok = rows[:, None] < T
        a = tl.load(h_ptr + rows[:, None] * stride_ht + rm[None, :] * stride_hd,
                    mask=row_ok & (rm[None, :] < D), other=0.0)
        b = tl.load(h_ptr + rows[:, None] * stride_ht + rn[None, :] * stride_hd,
                    mask=row_ok & (rn[None, :] < D), other=0.0)
        if UPCAST:
            a = a.to(acc_ty)
            b = b.to(acc_ty)
        # bf16/fp16 products are exact in fp32; fp32 inputs use IEEE fp32 (no TF32 truncation).
        acc = tl.dot(tl.trans(a), b, acc=acc, input_precision="ieee", out_dtype=acc_ty)
    in_bounds = (rm[:, None] < D) & (rn[None, :] < D)
    tile = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    acc += tl.load(tile, mask=in_bounds, other=0.0)
    if LOWER_ONLY:
        acc = tl.where(rn[None, :] <= rm[:, None], acc, 0.0)
    tl.store(tile, acc, mask=in_bounds)
    if not LOWER_ONLY:
        if pid_n != pid_m:
            mirror = out_ptr + rn[:, None] * stride_om + rm[None, :] * stride_on
            tl.store(mirror, tl.trans(acc), mask=(rn[:, None] < D) & (rm[None, :] < D))


@triton.jit
def _adjust_scale_kernel(
    h_ptr, ht_ptr, gt_ptr, eta_ptr, c_ptr, g_ptr, T, DH, DG,
    s_ht, s_hd, s_htt, s_htd, s_gtt, s_gtd, s_gt, s_gd,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Eqs 1–2 for BLOCK_T rows: c_i = −η ⟨H_i, H̃_i⟩, G_i = c_i ∇G̃_i."""
    cd = c_ptr.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < T
    dot = tl.zeros((BLOCK_T,), dtype=cd)
    for d0 in range(0, DH, BLOCK_H):
        cols = (d0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < DH)
        h = tl.load(h_ptr + rows[:, None] * s_ht + cols[None, :] * s_hd, mask=m, other=0.0).to(cd)
        ht = tl.load(ht_ptr + rows[:, None] * s_htt + cols[None, :] * s_htd, mask=m, other=0.0).to(cd)
        dot += tl.sum(h * ht, axis=1)
    c = -tl.load(eta_ptr) * dot
    tl.store(c_ptr + rows, c, mask=row_ok)
    for g0 in range(0, DG, BLOCK_G):
        cols = (g0 + tl.arange(0, BLOCK_G)).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < DG)
        gt = tl.load(gt_ptr + rows[:, None] * s_gtt + cols[None, :] * s_gtd, mask=m, other=0.0).to(cd)
        tl.store(g_ptr + rows[:, None] * s_gt + cols[None, :] * s_gd, c[:, None] * gt, mask=m)


@triton.jit
def _dots_kernel(
    g_ptr, p_ptr, part_ptr, T, D, s_gt, s_gd, s_pt, s_pd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-program partial sums of ⟨G, G_prev⟩ and ⟨G_prev, G_prev⟩ (eq 4), both in one read."""
    cd = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < T
    gp = tl.zeros((BLOCK_T,), dtype=cd)
    pp = tl.zeros((BLOCK_T,), dtype=cd)
    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < D)
        g = tl.load(g_ptr + rows[:, None] * s_gt + cols[None, :] * s_gd, mask=m, other=0.0).to(cd)
        p = tl.load(p_ptr + rows[:, None] * s_pt + cols[None, :] * s_pd, mask=m, other=0.0).to(cd)
        gp += tl.sum(g * p, axis=1)
        pp += tl.sum(p * p, axis=1)
    tl.store(part_ptr + 2 * pid, tl.sum(gp, axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(pp, axis=0))


@triton.jit
def _axpy_kernel(
    g_ptr, p_ptr, alpha_ptr, out_ptr, T, D, s_gt, s_gd, s_pt, s_pd, s_ot, s_od,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = G − alpha · G_prev (eq 4)."""
    cd = out_ptr.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < T
    alpha = tl.load(alpha_ptr)
    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < D)
        g = tl.load(g_ptr + rows[:, None] * s_gt + cols[None, :] * s_gd, mask=m, other=0.0).to(cd)
        p = tl.load(p_ptr + rows[:, None] * s_pt + cols[None, :] * s_pd, mask=m, other=0.0).to(cd)
        tl.store(out_ptr + rows[:, None] * s_ot + cols[None, :] * s_od, g - alpha * p, mask=m)


@triton.jit
def _adjust_scale_bwd_kernel(
    p_ptr, h_ptr, ht_ptr, gt_ptr, c_ptr, eta_ptr, dht_ptr, dgt_ptr, part_ptr, T, DH, DG,
    s_pt, s_pd, s_ht, s_hd, s_htt, s_htd, s_gtt, s_gtd, s_c, s_dht, s_dhd, s_dgt, s_dgd,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Cotangents of eqs 1–2; each input is read once: the Dg pass yields u and d∇G̃, the Dh pass dH̃."""
    cd = dht_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < T
    c = tl.load(c_ptr + rows * s_c, mask=row_ok, other=0.0).to(cd)
    u = tl.zeros((BLOCK_T,), dtype=cd)
    for g0 in range(0, DG, BLOCK_G):
        cols = (g0 + tl.arange(0, BLOCK_G)).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < DG)
        p = tl.load(p_ptr + rows[:, None] * s_pt + cols[None, :] * s_pd, mask=m, other=0.0).to(cd)
        gt = tl.load(gt_ptr + rows[:, None] * s_gtt + cols[None, :] * s_gtd, mask=m, other=0.0).to(cd)
        u += tl.sum(p * gt, axis=1)
        tl.store(dgt_ptr + rows[:, None] * s_dgt + cols[None, :] * s_dgd, c[:, None] * p, mask=m)
    scale = -tl.load(eta_ptr) * u
    dot = tl.zeros((BLOCK_T,), dtype=cd)
    for d0 in range(0, DH, BLOCK_H):
        cols = (d0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < DH)
        h = tl.load(h_ptr + rows[:, None] * s_ht + cols[None, :] * s_hd, mask=m, other=0.0).to(cd)
        ht = tl.load(ht_ptr + rows[:, None] * s_htt + cols[None, :] * s_htd, mask=m, other=0.0).to(cd)
        dot += tl.sum(h * ht, axis=1)
        tl.store(dht_ptr + rows[:, None] * s_dht + cols[None, :] * s_dhd, scale[:, None] * h, mask=m)
    tl.store(part_ptr + pid, -tl.sum(u * dot, axis=0))


def gram(chunks: Iterable[torch.Tensor], *, lower_only: bool = False,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """HᵀH (eq 3 without e^λ I) accumulated over row-chunks, into ``out`` when given (its dtype is the
    accumulator's); see ``reference.gram_ref``."""
    for h in chunks:
        if out is None:
            out = torch.zeros(h.shape[1], h.shape[1], device=h.device, dtype=compute_dtype(h))
        elif h.shape[1] != out.shape[0]:
            raise ValueError(f"row-chunks disagree on the width: {h.shape[1]} vs {out.shape[0]}")
        if h.shape[0] == 0:
            continue
        # half-precision tiles are upcast in registers for an fp32 accumulator; anything else is cast first
        if h.dtype != out.dtype and not (h.dtype in (torch.float16, torch.bfloat16) and out.dtype == torch.float32):
            h = h.to(out.dtype)
        blocks = triton.cdiv(out.shape[0], GRAM_BLOCK)
        _gram_kernel[(blocks, blocks)](
            h, out, h.shape[0], h.shape[1], h.stride(0), h.stride(1), out.stride(0), out.stride(1),
            LOWER_ONLY=lower_only, UPCAST=h.device.type != "cuda", BLOCK=GRAM_BLOCK, BLOCK_K=GRAM_BLOCK_K,
        )
    if out is None:
        raise ValueError("H has no row-chunks; pass a (0, D) tensor for an empty H")
    return out


def adjust_and_scale(
    H: torch.Tensor, H_tilde: torch.Tensor, grad_tilde: torch.Tensor, eta: Scalar
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs 1–2 fused: returns (c (T,), G (T, Dg)); see ``reference.adjust_and_scale_ref``."""
    cd = compute_dtype(H, H_tilde, grad_tilde)
    (T, DH), DG = H.shape, grad_tilde.shape[1]
    eta_t = as_scalar_tensor(eta, H, cd)
    c = torch.empty(T, device=H.device, dtype=cd)
    G = torch.empty(T, DG, device=H.device, dtype=cd)
    if T == 0:
        return c, G
    _adjust_scale_kernel[(triton.cdiv(T, ROW_BLOCK),)](
        H, H_tilde, grad_tilde, eta_t, c, G, T, DH, DG,
        *H.stride(), *H_tilde.stride(), *grad_tilde.stride(), *G.stride(),
        BLOCK_T=ROW_BLOCK, BLOCK_H=_col_block(DH), BLOCK_G=_col_block(DG),
    )
    return c, G


def project_out(G: torch.Tensor, G_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 4 fused (one read for both inner products, one axpy pass); see ``reference.project_out_ref``."""
    cd = compute_dtype(G, G_prev)
    T, D = G.shape
    programs = max(triton.cdiv(T, ROW_BLOCK), 1)
    partials = torch.zeros(programs, 2, device=G.device, dtype=cd)
    out = torch.empty(T, D, device=G.device, dtype=cd)
    block_d = _col_block(D)
    if T > 0:
        _dots_kernel[(programs,)](
            G, G_prev, partials, T, D, *G.stride(), *G_prev.stride(), BLOCK_T=ROW_BLOCK, BLOCK_D=block_d,
        )
    num, den = partials.sum(dim=0)
    alpha = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    if T > 0:
        _axpy_kernel[(programs,)](
            G, G_prev, alpha, out, T, D, *G.stride(), *G_prev.stride(), *out.stride(),
            BLOCK_T=ROW_BLOCK, BLOCK_D=block_d,
        )
    return out, alpha


def adjust_and_scale_backward(
    P: torch.Tensor,
    H: torch.Tensor,
    H_tilde: torch.Tensor,
    grad_tilde: torch.Tensor,
    c: torch.Tensor,
    eta: Scalar,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused cotangents of eqs 1–2; see ``reference.adjust_and_scale_backward_ref``."""
    cd = compute_dtype(P, H, H_tilde, grad_tilde, c)
    (T, DH), DG = H.shape, P.shape[1]
    eta_t = as_scalar_tensor(eta, H, cd)
    d_ht = torch.empty(T, DH, device=H.device, dtype=cd)
    d_gt = torch.empty(T, DG, device=H.device, dtype=cd)
    programs = triton.cdiv(T, ROW_BLOCK)
    partials = torch.zeros(max(programs, 1), device=H.device, dtype=cd)
    if T > 0:
        _adjust_scale_bwd_kernel[(programs,)](
            P, H, H_tilde, grad_tilde, c, eta_t, d_ht, d_gt, partials, T, DH, DG,
            *P.stride(), *H.stride(), *H_tilde.stride(), *grad_tilde.stride(), c.stride(0),
            *d_ht.stride(), *d_gt.stride(),
            BLOCK_T=ROW_BLOCK, BLOCK_H=_col_block(DH), BLOCK_G=_col_block(DG),
        )
    return d_ht, d_gt, partials.sum()
