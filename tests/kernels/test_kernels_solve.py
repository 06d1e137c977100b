"""Ridge factorisation (eqs 3, 5, 6): primal == dual, accuracy up to cond 1e8, fallbacks, λ gradient."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from easyedit_agrade import kernels as K
from easyedit_agrade.kernels import dispatch

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _with_singular_values(T: int, Dh: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """H = U diag(sigma) Vᵀ (fp64) with random orthonormal U (T × r), V (Dh × r), r = len(sigma)."""
    r = sigma.numel()
    U = torch.linalg.qr(_rand(T, r, seed=seed))[0]
    V = torch.linalg.qr(_rand(Dh, r, seed=seed + 1))[0]
    return (U * sigma) @ V.T


def _ridge(H: torch.Tensor, log_lambda: float) -> torch.Tensor:
    return H.T @ H + math.exp(log_lambda) * torch.eye(H.shape[1], dtype=F64)


def _normal_residual(H: torch.Tensor, log_lambda: float, G: torch.Tensor, delta: torch.Tensor) -> float:
    """‖MΔW − HᵀG‖ / (‖M‖₂‖ΔW‖ + ‖HᵀG‖) in fp64 with the exact M of eq 3 (normwise backward error)."""
    M, rhs, d = _ridge(H, log_lambda), H.T @ G, delta.double()
    return float(torch.linalg.norm(M @ d - rhs) / (torch.linalg.matrix_norm(M, 2) * torch.linalg.norm(d)
                                                  + torch.linalg.norm(rhs)))


@pytest.mark.parametrize("T", [12, 40, 64])
def test_dual_equals_primal(T):
    Dh, Dg, log_lambda = 40, 9, -0.7
    H, G, g = _rand(T, Dh, seed=T), _rand(T, Dg, seed=T + 1), _rand(Dh, Dg, seed=T + 2)
    primal = K.factorize(H, log_lambda, method="primal")
    dual = K.factorize(H, torch.tensor(log_lambda, dtype=F64), method="dual")
    assert K.factorize(H, log_lambda).method == ("dual" if T < Dh else "primal")
    M = _ridge(H, log_lambda)
    expected_delta = torch.linalg.solve(M, H.T @ G)
    for f in (primal, dual):
        torch.testing.assert_close(f.solve_delta(G), expected_delta, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f.project(g), H @ torch.linalg.solve(M, g), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f.solve(g), torch.linalg.solve(M, g), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(
        dual.lambda_grad(g, expected_delta), primal.lambda_grad(g, expected_delta), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (F64, 1e-14)])
@pytest.mark.parametrize("cond", [1e2, 1e5, 1e8])
@pytest.mark.parametrize("method", ["primal", "dual"])
def test_normal_equation_residual_up_to_cond_1e8(method, cond, dtype, tol):
    Dh, Dg = 48, 6
    T = 96 if method == "primal" else 24
    if method == "primal":  # σ² from 1 down to 1/cond, e^λ far below: cond(M) ≈ cond
        sigma = torch.logspace(0, -0.5 * math.log10(cond), Dh, dtype=F64)
        log_lambda = math.log(1e-3 / cond)
    else:  # rank T < Dh: M's small eigenvalues are e^λ itself, cond(M) ≈ (1 + e^λ)/e^λ
        sigma = torch.logspace(0, -1, T, dtype=F64)
        log_lambda = -math.log(cond)
    H64 = _with_singular_values(T, Dh, sigma, seed=int(math.log10(cond)))
    M = _ridge(H64, log_lambda)
    assert 0.5 * cond < float(torch.linalg.cond(M)) < 2 * cond
    H, G = H64.to(dtype), _rand(T, Dg, seed=3, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no jitter needed up to cond 1e8
        f = K.factorize(H, log_lambda, method=method)
        delta = f.solve_delta(G)
    assert delta.dtype == dtype and bool(torch.isfinite(delta).all())
    assert f.info["fallback"] in ("none", "fp64")
    assert _normal_residual(H.double(), log_lambda, G.double(), delta) < tol


def test_factor_computed_once_and_reused(monkeypatch):
    calls = {"gram": 0, "cholesky": 0}
    real_gram, real_chol = dispatch.gram, torch.linalg.cholesky_ex

    def counting_gram(*args, **kwargs):
        calls["gram"] += 1
        return real_gram(*args, **kwargs)

    def counting_chol(*args, **kwargs):
        calls["cholesky"] += 1
        return real_chol(*args, **kwargs)

    monkeypatch.setattr(dispatch, "gram", counting_gram)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting_chol)
    for T in (10, 50):
        calls.update(gram=0, cholesky=0)
        H = _rand(T, 20, seed=T)
        f = K.factorize(H, 0.0)
        g = _rand(20, 4, seed=1)
        delta = f.solve_delta(_rand(T, 4, seed=2))
        f.project_and_lambda_grad(g, delta)
        f.lambda_grad(g, delta)
        f.project(g)
        f.solve(g)
        assert calls == {"gram": 1, "cholesky": 1}


def test_jitter_fallback_warns_on_singular_matrix():
    H = _rand(30, 8, seed=4)
    H[:, 3] = 0.0  # a zero column and e^λ = 0: M has an exact zero pivot in fp32 and fp64
    with pytest.warns(RuntimeWarning, match="jitter"):
        f = K.factorize(H.float(), -1000.0, method="primal")
    assert f.info["fallback"] == "jitter" and f.info["jitter"] > 0
    assert f.info["factor_dtype"] == str(F64)
    G = _rand(30, 3, seed=5, dtype=torch.float32)
    delta = f.solve_delta(G)
    assert bool(torch.isfinite(delta).all())
    assert float(delta[3].abs().max()) == 0.0  # the zero column gets no update


def test_fp64_retry_when_fp32_gram_overflows():
    H = torch.full((4, 3), 1e20) + torch.eye(4, 3) * 1e19  # HᵀH ~ 4e40 overflows fp32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = K.factorize(H, 0.0, method="primal")
    assert f.info["fallback"] == "fp64"
    delta = f.solve_delta(torch.ones(4, 2))
    assert delta.dtype == torch.float32 and bool(torch.isfinite(delta).all())


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_non_finite_input_raises(method):
    H = _rand(6, 9, seed=6)
    H[2, 2] = float("nan")
    with pytest.raises(K.FactorizationError):
        K.factorize(H, 0.0, method=method)
    with pytest.raises(K.FactorizationError):
        K.factorize(H, None, method=method)
    with pytest.raises(ValueError, match="not finite"):
        K.factorize(_rand(6, 9, seed=7), 1e4)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_unregularised_is_minimum_norm_least_squares(method):
    T, Dh, Dg = 14, 20, 5
    H = _rand(T, 6, seed=8) @ _rand(6, Dh, seed=9)  # rank 6: HᵀH and HHᵀ both singular
    G, g = _rand(T, Dg, seed=10), _rand(Dh, Dg, seed=11)
    f = K.factorize(H, None, method=method)
    assert f.info["rank"] == 6
    pinv = torch.linalg.pinv(H)
    torch.testing.assert_close(f.solve_delta(G), pinv @ G, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(f.project(g), pinv.T @ g, rtol=1e-8, atol=1e-10)  # H(HᵀH)⁺ = (H⁺)ᵀ
    torch.testing.assert_close(f.solve(g), pinv @ pinv.T @ g, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="undefined"):
        f.lambda_grad(g, f.solve_delta(G))
    f32 = K.factorize(H.float(), None, method=method)
    assert f32.solve_delta(G.float()).dtype == torch.float32


@pytest.mark.parametrize("T", [9, 30])
def test_lambda_grad_equals_autograd_through_linalg_solve(T):
    Dh, Dg = 16, 5
    H, G, g = _rand(T, Dh, seed=12), _rand(T, Dg, seed=13), _rand(Dh, Dg, seed=14)
    log_lambda = torch.tensor(-0.4, dtype=F64, requires_grad=True)
    M = H.T @ H + torch.exp(log_lambda) * torch.eye(Dh, dtype=F64)
    loss = (g * torch.linalg.solve(M, H.T @ G)).sum()
    (expected,) = torch.autograd.grad(loss, log_lambda)
    for method in ("primal", "dual"):
        f = K.factorize(H, log_lambda, method=method)
        delta = f.solve_delta(G)
        torch.testing.assert_close(f.lambda_grad(g, delta), expected, rtol=1e-10, atol=1e-12)
        P, lam_grad = f.project_and_lambda_grad(g, delta)
        torch.testing.assert_close(lam_grad, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(P, f.project(g), rtol=1e-12, atol=1e-12)


def test_low_precision_and_requires_grad_inputs():
    H = _rand(20, 12, seed=15, dtype=torch.float32).bfloat16().requires_grad_()
    G = _rand(20, 3, seed=16, dtype=torch.float32).requires_grad_()
    with torch.no_grad():
        f = K.factorize(H, torch.tensor(0.0, requires_grad=True), chunk_size=7)
        delta = f.solve_delta(G.bfloat16())
    assert delta.dtype == torch.float32 and not delta.requires_grad
    H64, G64 = H.detach().double(), G.detach().bfloat16().double()
    expected = torch.linalg.solve(_ridge(H64, 0.0), H64.T @ G64)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-4, atol=1e-5)
    assert f.project(torch.zeros(12, 3)).shape == (20, 3)


def test_shape_and_argument_errors():
    f = K.factorize(_rand(10, 6, seed=17), 0.0)
    with pytest.raises(ValueError):
        f.solve_delta(_rand(9, 2, seed=18))
    with pytest.raises(ValueError):
        f.project(_rand(5, 2, seed=19))
    with pytest.raises(ValueError, match="unknown method"):
        K.factorize(_rand(10, 6, seed=17), 0.0, method="woodbury")
    assert K.choose_method(100, 1536) == "dual" and K.choose_method(2048, 1536) == "primal"


@pytest.mark.parametrize("log_lambda", [0.3, None])
def test_factorize_gram_equals_factorize_from_rows(log_lambda):
    """A Gram summed over row shards (as the streamed / data-parallel editor builds it) factors to the same
    solves as the rows themselves; projections use only the local rows."""
    from easyedit_agrade.kernels import factorize, factorize_gram

    g = torch.Generator().manual_seed(3)
    H = torch.randn(40, 12, generator=g, dtype=torch.float64)
    B = torch.randn(12, 5, generator=g, dtype=torch.float64)
    shards = [H[:17], H[17:]]
    gram = sum(s.T @ s for s in shards)
    ref = factorize(H, log_lambda, method="primal")
    fact = factorize_gram(torch.tril(gram), log_lambda, shards[0])
    torch.testing.assert_close(fact.solve(B), ref.solve(B), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fact.project(B), ref.project(B)[:17], rtol=1e-10, atol=1e-12)
    if log_lambda is not None:
        d = ref.solve_delta(torch.randn(40, 5, generator=g, dtype=torch.float64))
        torch.testing.assert_close(fact.lambda_grad(B, d), ref.lambda_grad(B, d), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="square"):
        factorize_gram(torch.zeros(3, 4), 0.0)
