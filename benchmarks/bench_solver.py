"""Benchmark AGRADE's per-module solve: naive MALMEN-style vs ``easyedit_agrade.kernels`` vs the GEMM bound.

One "step" is a predict (eqs 1, 2, 4, 3, 5: ΔW) followed by an update (eq 6 P, the λ gradient, and the
cotangents of eqs 4, 2, 1) for one edited linear module with T tokens, input width Dh, output width Dg.

- naive: explicit Gram HᵀH + e^λI and ``torch.linalg.solve`` (LU) for ΔW; the update rebuilds M and solves
  again for M⁻¹g_θ (what MALMEN does); unfused torch row ops.
- ours: what the editor and the trainer run — eqs 1–2 and 4 through the kernels' dispatcher (fused Triton kernels
  on CUDA), ``kernels.gram`` (symmetric, chunked) + one checked Cholesky reused by ``solve_delta`` and
  ``project_and_lambda_grad``, the dual (Woodbury) form when T < Dh; the update recomputes G with autograd and
  backpropagates the eq 7 surrogate (on CUDA through the fused backward kernel).
- bound: the GEMM-like FLOPs of our method (symmetric Gram counted once, Cholesky/triangular solves, the
  products with H) divided by a torch.mm rate measured here on the case's dominant GEMM shape. Row-wise
  (bandwidth-bound) ops are not counted, so the bound is optimistic.

Times are the best of ``--repeats`` interleaved runs after one warm-up run, in wall time or (``--clock
process``, for a shared CPU, best with ``--threads 1``) in CPU time of this process. "err" is the larger relative error
(Frobenius) of ΔW and P against the naive formulas evaluated in fp64. Example::

    python benchmarks/bench_solver.py            # full table
    python benchmarks/bench_solver.py --quick    # small smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch

from easyedit_agrade import kernels as K
from easyedit_agrade.models.agrade import equations as eq

# (name, Dh, Dg): the edited FFN output projection's input and output widths.
MODELS = [
    ("SmolLM2-135M (embedded)", 1536, 576),
    ("GPT-J 6B / 8", 16384 // 8, 4096 // 8),
    ("LLaMA2 7B / 8", 11008 // 8, 4096 // 8),
]
TOKENS = (256, 2048, 16384)
QUICK_MODELS = [("SmolLM2-135M / 4", 1536 // 4, 576 // 4)]
QUICK_TOKENS = (64, 512)
ETA, LOG_LAMBDA = 1e-2, 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def best_times(fns: list[Callable[[], object]], repeats: int, device: torch.device, clock: str) -> list[float]:
    """Best time of each function on ``clock``; runs are interleaved so that load changes hit all of them."""
    timer = CLOCKS[clock]
    for fn in fns:
        fn()
    _sync(device)
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = timer()
            fn()
            _sync(device)
            best[i] = min(best[i], timer() - start)
    return best


def naive_step(H, Ht, gt, Gp, g, eta, log_lambda):
    """MALMEN-style: explicit M, LU solve in the predict, M rebuilt and solved again in the update."""
    lam = math.exp(log_lambda)
    eye = torch.eye(H.shape[1], device=H.device, dtype=H.dtype)
    c = -eta * (H * Ht).sum(1)
    G = c[:, None] * gt
    G = G - ((G * Gp).sum() / (Gp * Gp).sum()) * Gp
    delta = torch.linalg.solve(H.T @ H + lam * eye, H.T @ G)
    X = torch.linalg.solve(H.T @ H + lam * eye, g)  # update: rebuilt and refactored
    P = H @ X
    lam_grad = -lam * (X * delta).sum()
    Pp = P - ((P * Gp).sum() / (Gp * Gp).sum()) * Gp
    u = (Pp * gt).sum(1)
    d_gt, d_ht, d_eta = c[:, None] * Pp, (-eta * u)[:, None] * H, -(u * (H * Ht).sum(1)).sum()
    return delta, P, lam_grad, d_ht, d_gt, d_eta


def our_step(H, Ht, gt, Gp, g, eta, log_lambda):
    """The editor's predict (no grad) and the trainer's update (G recomputed with autograd, eq 7 backpropagated)."""
    with torch.no_grad():
        G = eq.eq4_project_out(eq.eq1_eq2_adjusted_gradient(H, Ht, gt, eta), Gp)
        fact = eq.eq3_factorize(H, log_lambda)
        delta = eq.eq5_delta(fact, G)
        P, lam_grad = fact.project_and_lambda_grad(g, delta)
    leaves = (Ht.detach().requires_grad_(), gt.detach().requires_grad_(),
              torch.tensor(eta, device=H.device, dtype=H.dtype, requires_grad=True))
    G = eq.eq4_project_out(eq.eq1_eq2_adjusted_gradient(H, *leaves), Gp)
    d_ht, d_gt, d_eta = torch.autograd.grad(eq.eq7_surrogate_loss(P, G), leaves)
    return delta, P, lam_grad, d_ht, d_gt, d_eta


def gemm_flops(T: int, Dh: int, Dg: int, method: str) -> float:
    """FLOPs of our step: symmetric Gram, Cholesky, 2 triangular-solve blocks and the products with H
    (primal: HᵀG, HX; dual: HᵀY, Hg_θ, HᵀP)."""
    n, other = (T, Dh) if method == "dual" else (Dh, T)
    products_with_h = 3 if method == "dual" else 2
    return n * n * other + n**3 / 3 + 2 * (2 * n * n * Dg) + products_with_h * (2 * T * Dh * Dg)


def dominant_gemm(T: int, Dh: int, method: str, chunk: int, device: torch.device):
    """(a @ b, its FLOPs): the fp32 GEMM with the shape of the case's Gram (one chunk of it)."""
    a = torch.randn(T, Dh, device=device) if method == "dual" else torch.randn(Dh, min(T, chunk), device=device)
    b = a.T.contiguous()
    return (lambda: a @ b), 2 * a.shape[0] * a.shape[1] * b.shape[1]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def run_case(name: str, Dh: int, Dg: int, T: int, args, device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(T * 7 + Dh)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device)

    H, Ht, gt, Gp, g = rand(T, Dh), rand(T, Dh), rand(T, Dg), rand(T, Dg), rand(Dh, Dg)
    inputs = (H, Ht, gt, Gp, g, ETA, LOG_LAMBDA)
    method = K.choose_method(T, Dh)
    mm, mm_flops = dominant_gemm(T, Dh, method, 4096, device)
    naive_s, ours_s, mm_s = best_times(
        [lambda: naive_step(*inputs), lambda: our_step(*inputs), mm], args.repeats, device, args.clock
    )
    rate = mm_flops / mm_s
    bound_s = gemm_flops(T, Dh, Dg, method) / rate
    exact = naive_step(*(x.double() if isinstance(x, torch.Tensor) else x for x in inputs))
    naive_out, our_out = naive_step(*inputs), our_step(*inputs)
    return {
        "model": name, "Dh": Dh, "Dg": Dg, "T": T, "method": method,
        "naive_s": naive_s, "ours_s": ours_s, "bound_s": bound_s, "mm_gflops": rate / 1e9,
        "speedup": naive_s / ours_s, "ours_over_bound": ours_s / bound_s,
        "err_naive": max(rel_diff(naive_out[i], exact[i]) for i in (0, 1)),
        "err_ours": max(rel_diff(our_out[i], exact[i]) for i in (0, 1)),
    }


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':<24} {'Dh':>5} {'Dg':>4} {'T':>6} {'method':>6} {'naive s':>8} {'ours s':>8} "
              f"{'bound s':>8} {'mm GF/s':>8} {'naive/ours':>10} {'ours/bound':>10} {'err naive':>9} {'err ours':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<24} {r['Dh']:>5} {r['Dg']:>4} {r['T']:>6} {r['method']:>6} {r['naive_s']:>8.4f} "
              f"{r['ours_s']:>8.4f} {r['bound_s']:>8.4f} {r['mm_gflops']:>8.1f} {r['speedup']:>10.2f} "
              f"{r['ours_over_bound']:>10.2f} {r['err_naive']:>9.1e} {r['err_ours']:>8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    parser.add_argument("--repeats", type=int, help="timed runs per case, best kept (default 3; 10 with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (Triton kernels run on cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or CPU time of this process (robust on a shared CPU; use with --threads 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    args.repeats = args.repeats or (10 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "process" and device.type != "cpu":
        parser.error("--clock process measures CPU time; use it with --device cpu")
    models, tokens = (QUICK_MODELS, QUICK_TOKENS) if args.quick else (MODELS, TOKENS)
    backend = K.resolve_backend(torch.empty(0, device=device))
    print(f"device={device} backend={backend} dtype=float32 threads={torch.get_num_threads()} "
          f"clock={args.clock} repeats={args.repeats} torch={torch.__version__}")
    rows = [run_case(name, Dh, Dg, T, args, device) for name, Dh, Dg in models for T in tokens]
    print_table(rows)
    for r in rows:
        if r["T"] == TOKENS[-1]:
            ok = r["speedup"] >= 1.5 and r["ours_over_bound"] <= 1.5
            print(f"goal at T={r['T']} {r['model']}: naive/ours {r['speedup']:.2f} (>= 1.5), "
                  f"ours/bound {r['ours_over_bound']:.2f} (<= 1.5): {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "backend": backend, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
