"""Every Triton kernel against the torch reference: on CUDA when present, else on CPU with TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when ``triton`` itself and ``triton_ops`` are imported (its ``@jit`` functions are
decorated then), so this module sets the variable before importing them and restores it afterwards; the
autouse fixture sets it again per test because ``resolve_backend`` checks it. If another test imported
triton earlier without the variable, the cases here cannot run in this process: they are skipped and one
test reruns this file in a subprocess instead. Sizes are tiny: the interpreter runs tiles through numpy.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from easyedit_agrade import kernels as K
    from easyedit_agrade.kernels import reference as R

    TO = importlib.import_module("easyedit_agrade.kernels.triton_ops")
    if DEVICE == "cpu" and not isinstance(TO._gram_kernel, InterpretedFunction):
        TO = importlib.reload(TO)
finally:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS

IN_PROCESS = DEVICE == "cuda" or isinstance(triton.language.standard.sum, InterpretedFunction)
in_process = pytest.mark.skipif(
    not IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1; see test_rerun_in_subprocess"
)


@pytest.mark.skipif(IN_PROCESS, reason="the cases run in this process")
def test_rerun_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return x.to(dtype=dtype, device=DEVICE)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous: every other column of a wider buffer, transposed storage."""
    wide = torch.zeros(x.shape[1] * 2, x.shape[0], dtype=x.dtype, device=x.device)
    wide[::2] = x.T
    out = wide[::2].T
    assert not out.is_contiguous() and torch.equal(out, x)
    return out


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Relative to the largest magnitude of the reference (accumulation order differs)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert bool(torch.isfinite(expected).all())
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


RTOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-5}
CASES = {  # name: (T, Dh, Dg, make) — odd sizes, not multiples of the tiles (16 rows, 64/128 columns)
    "random": (37, 131, 45, lambda x: x),
    "zero_rows": (33, 70, 19, lambda x: x.index_fill(0, torch.arange(0, x.shape[0], 3, device=x.device), 0.0)),
    "huge": (21, 67, 17, lambda x: x),  # scaled per role in _inputs
    "strided": (29, 75, 23, _strided),
    "one_row": (1, 5, 3, lambda x: x),
    "empty": (0, 9, 4, lambda x: x),
}


def _inputs(case: str, dtype: torch.dtype):
    """(H, H̃, ∇G̃, P); "huge" is as large as fp32 allows for every output (up to ~1e35) to stay finite."""
    T, Dh, Dg, make = CASES[case]
    hs, gs = (1e10, 1e6) if case == "huge" else (1.0, 1.0)
    H = make(_rand(T, Dh, seed=1, dtype=dtype, scale=hs))
    Ht = make(_rand(T, Dh, seed=2, dtype=dtype, scale=hs))
    gt = make(_rand(T, Dg, seed=3, dtype=dtype, scale=gs))
    P = make(_rand(T, Dg, seed=4, dtype=dtype, scale=gs))
    return H, Ht, gt, P


@in_process
@pytest.mark.parametrize("lower_only", [False, True])
@pytest.mark.parametrize("case", ["random", "zero_rows", "huge", "strided", "empty"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gram_kernel(case, dtype, lower_only):
    H = _inputs(case, dtype)[0]
    expected = R.gram_ref(H, lower_only=lower_only)
    _close(TO.gram([H], lower_only=lower_only), expected, RTOL[dtype])
    _close(K.gram(H, lower_only=lower_only, backend="triton"), expected, RTOL[dtype])


@in_process
def test_gram_kernel_row_chunks_accumulate():
    H = _rand(45, 70, seed=5)
    chunks = [H[:16], H[16:17], H[17:]]
    _close(K.gram(iter(chunks), backend="triton", lower_only=True), R.gram_ref(H, lower_only=True), 2e-5)


@in_process
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adjust_and_scale_kernel(case, dtype):
    H, Ht, gt, _ = _inputs(case, dtype)
    eta = torch.tensor(0.3, dtype=torch.float64)
    c_ref, G_ref = R.adjust_and_scale_ref(H, Ht, gt, 0.3)
    c, G = K.adjust_and_scale(H, Ht, gt, eta, backend="triton")
    _close(c, c_ref, RTOL[dtype])
    _close(G, G_ref, RTOL[dtype])


@in_process
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_out_kernel(case, dtype):
    _, _, G, G_prev = _inputs(case, dtype)
    out_ref, alpha_ref = R.project_out_ref(G, G_prev)
    out, alpha = TO.project_out(G, G_prev)
    _close(alpha, alpha_ref, RTOL[dtype])
    _close(out, out_ref, RTOL[dtype])


@in_process
def test_project_out_kernel_zero_previous_and_dispatch():
    G = _rand(19, 33, seed=6)
    out, alpha = K.project_out(G, torch.zeros_like(G), backend="triton")
    assert float(alpha) == 0.0 and torch.equal(out, G)
    out, _ = K.project_out(G, _rand(19, 33, seed=7), backend="triton")
    assert abs(float((out.double() * _rand(19, 33, seed=7, dtype=torch.float64)).sum())) < 1e-4


@in_process
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adjust_and_scale_backward_kernel(case, dtype):
    H, Ht, gt, P = _inputs(case, dtype)
    c = _rand(2 * H.shape[0], seed=8)[::2] if case == "strided" else _rand(H.shape[0], seed=8)
    expected = R.adjust_and_scale_backward_ref(P, H, Ht, gt, c, 0.7)
    got = K.adjust_and_scale_backward(P, H, Ht, gt, c, 0.7, backend="triton")
    for g, e in zip(got, expected):
        _close(g, e, RTOL[dtype])


@in_process
def test_factorize_with_triton_gram():
    H, G = _rand(80, 70, seed=9), _rand(80, 6, seed=10)
    for T in (80, 30):  # primal, then dual (Gram of Hᵀ: strided rows)
        f_triton = K.factorize(H[:T], -1.0, backend="triton")
        f_torch = K.factorize(H[:T], -1.0, backend="torch")
        _close(f_triton.solve_delta(G[:T]), f_torch.solve_delta(G[:T]), 1e-4)


@in_process
def test_gram_kernel_accumulates_into_out():
    """The streamed editor's Gram: fp32 pieces summed into an fp64 accumulator (``out=``)."""
    pieces = [_rand(21, 70, seed=11), _rand(0, 70, seed=12), _rand(9, 70, seed=13, dtype=torch.bfloat16)]
    got = torch.zeros(70, 70, dtype=torch.float64, device=DEVICE)
    expected = torch.zeros(70, 70, dtype=torch.float64, device=DEVICE)
    for h in pieces:
        assert K.gram(h, lower_only=True, out=got, backend="triton") is got
        K.gram(h, lower_only=True, out=expected, backend="torch")
    _close(got, expected, 1e-12)


@in_process
@pytest.mark.parametrize("with_projection", [False, True])
def test_triton_autograd_gradcheck(with_projection):
    """Eqs 1–2 (+ eq 4) on the Triton backend as the trainer differentiates them (AdjustAndScale / ProjectOut,
    fused backward kernels): fp64 gradcheck against finite differences, and equal to autograd of the reference."""
    T, Dh, Dg = 7, 5, 4
    H, G_prev = _rand(T, Dh, seed=20, dtype=torch.float64), _rand(T, Dg, seed=21, dtype=torch.float64)

    def f(Ht, gt, eta, backend="triton"):
        G = K.adjust_and_scale(H, Ht, gt, eta, backend=backend)[1]
        return K.project_out(G, G_prev, backend=backend)[0] if with_projection else G

    inputs = (_rand(T, Dh, seed=22, dtype=torch.float64).requires_grad_(),
              _rand(T, Dg, seed=23, dtype=torch.float64).requires_grad_(),
              torch.tensor(0.4, dtype=torch.float64, device=DEVICE, requires_grad=True))
    out = f(*inputs)
    assert type(out.grad_fn).__name__.startswith("ProjectOut" if with_projection else "AdjustAndScale")
    assert torch.autograd.gradcheck(f, inputs)
    upstream = _rand(T, Dg, seed=24, dtype=torch.float64)
    got = torch.autograd.grad((f(*inputs) * upstream).sum(), inputs)
    expected = torch.autograd.grad((f(*inputs, backend="torch") * upstream).sum(), inputs)
    for g, e in zip(got, expected):
        _close(g, e, 1e-12)
