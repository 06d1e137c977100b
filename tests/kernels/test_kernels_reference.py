"""Torch reference ops (eqs 1–4), backend resolution, and fp64 gradient checks of the cotangents."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade import kernels as K
from easyedit_agrade.kernels import reference as R

F64 = torch.float64


def _rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- backend resolution
def test_resolve_backend_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is opt-in, never chosen by auto
    assert K.resolve_backend(torch.zeros(2)) == "torch"


def test_resolve_backend_env_and_argument(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.resolve_backend(t) == "torch"
    monkeypatch.setenv(K.ENV_VAR, "TRITON")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        K.resolve_backend(t)
    assert K.resolve_backend(t, "torch") == "torch"  # the argument overrides the env var
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.resolve_backend(t)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.resolve_backend(t, "numpy")


def test_resolve_backend_triton_interpret_on_cpu(monkeypatch):
    if not K.dispatch.triton_importable():  # checked without importing triton (see test_kernels_triton)
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.resolve_backend(torch.zeros(2), "triton") == "triton"


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, easyedit_agrade.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- Gram (eq 3)
@pytest.mark.parametrize("lower_only", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_gram_matches_fp64_product(lower_only, chunk_size):
    H = _rand(53, 401, seed=0)  # > SYMMETRIC_PANEL columns: several panels
    expected = H.T @ H
    if lower_only:
        expected = expected.tril()
    got = K.gram(H, chunk_size=chunk_size, lower_only=lower_only)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    got32 = K.gram(H.float(), chunk_size=chunk_size, lower_only=lower_only)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-3)


def test_gram_iterable_of_chunks_and_bf16():
    H = _rand(40, 24, seed=1, dtype=torch.float32)
    chunks = (H[i:i + 9] for i in range(0, 40, 9))
    torch.testing.assert_close(K.gram(chunks), K.gram(H), rtol=1e-5, atol=1e-5)
    Hb = H.bfloat16()
    got = K.gram(Hb)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, Hb.double().T.matmul(Hb.double()).float(), rtol=1e-5, atol=1e-4)


def test_gram_errors():
    with pytest.raises(ValueError):
        K.gram(torch.zeros(3))
    with pytest.raises(ValueError):
        K.gram([])
    with pytest.raises(ValueError, match="width"):
        K.gram([torch.zeros(2, 3), torch.zeros(2, 4)])
    assert torch.equal(K.gram(torch.zeros(0, 5)), torch.zeros(5, 5))


# ---------------------------------------------------------------- eqs 1, 2, 4
def test_adjust_and_scale_formula_and_dtypes():
    H, Ht, gt = _rand(9, 6, seed=2), _rand(9, 6, seed=3), _rand(9, 4, seed=4)
    c, G = K.adjust_and_scale(H, Ht, gt, 0.5)
    expected_c = torch.stack([-0.5 * torch.dot(H[i], Ht[i]) for i in range(9)])
    torch.testing.assert_close(c, expected_c, rtol=1e-14, atol=0)
    torch.testing.assert_close(G, expected_c[:, None] * gt, rtol=1e-14, atol=0)
    c32, G32 = K.adjust_and_scale(H.bfloat16(), Ht.bfloat16(), gt.bfloat16(), torch.tensor(0.5))
    assert c32.dtype == G32.dtype == torch.float32


def test_project_out_cases():
    G, Gp = _rand(5, 3, seed=5), _rand(5, 3, seed=6)
    out, alpha = K.project_out(G, Gp)
    assert abs(float((out * Gp).sum())) < 1e-12  # orthogonal to G_prev
    torch.testing.assert_close(alpha, (G * Gp).sum() / (Gp * Gp).sum())
    for prev in (None, torch.zeros_like(G)):
        same, zero = K.project_out(G, prev)
        assert torch.equal(same, G) and float(zero) == 0.0
    with pytest.raises(ValueError, match="does not match"):
        K.project_out(G, Gp[:4])


def test_public_ops_differentiable_and_no_history_under_no_grad():
    H = _rand(6, 4, seed=7)
    Ht = _rand(6, 4, seed=8).requires_grad_()
    gt = _rand(6, 3, seed=9).requires_grad_()
    with torch.no_grad():
        c, G = K.adjust_and_scale(H, Ht, gt, 0.1)
        P, _ = K.project_out(G, gt.detach())
    assert not (c.requires_grad or G.requires_grad or P.requires_grad)
    c2, G2 = K.adjust_and_scale(H, Ht, gt, 0.1)
    assert G2.requires_grad and K.project_out(G2, gt.detach())[0].requires_grad
    torch.testing.assert_close(G, G2.detach())


def test_gram_out_accumulates_pieces_bit_identically():
    """``out=`` adds each piece's Gram in out's dtype: the streamed editor's accumulation, op for op."""
    pieces = [_rand(9, 401, seed=40, dtype=torch.float32), _rand(4, 401, seed=41, dtype=torch.float32)]
    acc = torch.zeros(401, 401, dtype=F64)
    expected = torch.zeros(401, 401, dtype=F64)
    for h in pieces:
        assert K.gram(h, lower_only=True, out=acc) is acc
        expected.add_(R.gram_ref(h, lower_only=True, dtype=F64))
    assert torch.equal(acc, expected)
    H = torch.cat(pieces).double()
    torch.testing.assert_close(acc, torch.tril(H.T @ H), rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="out must be"):
        K.gram(pieces[0], out=torch.zeros(400, 400))


# ---------------------------------------------------------------- fp64 gradient checks
@pytest.mark.parametrize("with_projection", [False, True])
def test_cotangents_equal_autograd(with_projection):
    T, Dh, Dg = 11, 7, 5
    H = _rand(T, Dh, seed=10)
    Ht = _rand(T, Dh, seed=11).requires_grad_()
    gt = _rand(T, Dg, seed=12).requires_grad_()
    eta = torch.tensor(0.37, dtype=F64, requires_grad=True)
    G_prev, upstream = _rand(T, Dg, seed=13), _rand(T, Dg, seed=14)

    c, G = R.adjust_and_scale_ref(H, Ht, gt, eta)
    if with_projection:
        G = R.project_out_ref(G, G_prev)[0]
    loss = (G * upstream).sum()
    expected = torch.autograd.grad(loss, [Ht, gt, eta])

    P = R.project_out_ref(upstream, G_prev)[0] if with_projection else upstream
    for got in (
        R.adjust_and_scale_backward_ref(P, H, Ht, gt, c.detach(), eta.detach()),
        K.adjust_and_scale_backward(P, H, Ht, gt, c.detach(), eta, backend="torch"),
    ):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_cotangents_shape_errors():
    H = _rand(4, 3, seed=15)
    with pytest.raises(ValueError):
        K.adjust_and_scale_backward(_rand(4, 2, seed=16), H, H, _rand(4, 3, seed=17), torch.zeros(4), 1.0)
    with pytest.raises(ValueError):
        K.adjust_and_scale_backward(_rand(4, 2, seed=16), H, H, _rand(4, 2, seed=17), torch.zeros(3), 1.0)


@pytest.mark.parametrize("with_projection", [False, True])
def test_dispatch_ops_gradcheck_reference_backend(with_projection):
    """gradcheck (fp64, finite differences) of eqs 1–2 (+ eq 4) as production calls them on CPU."""
    T, Dh, Dg = 5, 4, 3
    H, G_prev = _rand(T, Dh, seed=20), _rand(T, Dg, seed=21)

    def f(Ht, gt, eta):
        G = K.adjust_and_scale(H, Ht, gt, eta, backend="torch")[1]
        return K.project_out(G, G_prev, backend="torch")[0] if with_projection else G

    inputs = (_rand(T, Dh, seed=22).requires_grad_(), _rand(T, Dg, seed=23).requires_grad_(),
              torch.tensor(0.4, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("with_projection", [False, True])
def test_autograd_functions_gradcheck_and_match_autograd(with_projection):
    """The Triton backend's autograd.Functions (fused backward), run on the reference backend: gradcheck in fp64
    and equal to autograd through the reference ops."""
    T, Dh, Dg = 6, 5, 4
    H, G_prev, upstream = _rand(T, Dh, seed=30), _rand(T, Dg, seed=31), _rand(T, Dg, seed=32)

    def via_functions(Ht, gt, eta):
        G = K.AdjustAndScale.apply(H, Ht, gt, eta, "torch")[1]
        return K.ProjectOut.apply(G, G_prev, "torch")[0] if with_projection else G

    def via_autograd(Ht, gt, eta):
        G = R.adjust_and_scale_ref(H, Ht, gt, eta)[1]
        return R.project_out_ref(G, G_prev)[0] if with_projection else G

    inputs = (_rand(T, Dh, seed=33).requires_grad_(), _rand(T, Dg, seed=34).requires_grad_(),
              torch.tensor(-0.3, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(via_functions, inputs)
    got = torch.autograd.grad((via_functions(*inputs) * upstream).sum(), inputs)
    expected = torch.autograd.grad((via_autograd(*inputs) * upstream).sum(), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_adjust_and_scale_function_refuses_a_differentiable_H():
    H = _rand(3, 2, seed=35).requires_grad_()
    with pytest.raises(ValueError, match="detach H"):
        K.AdjustAndScale.apply(H, _rand(3, 2, seed=36), _rand(3, 2, seed=37), 0.5, "torch")
