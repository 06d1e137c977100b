"""AGRADE's per-module linear algebra: torch reference ops, Triton kernels and the ridge solve.

Public API (imports only torch; Triton is imported when a Triton kernel first runs):

- :func:`resolve_backend` — "triton" or "torch" (argument > ``EASYEDIT_AGRADE_KERNELS`` env var > auto).
- :func:`gram` — HᵀH of eq 3, chunked, fp32 accumulation.
- :func:`adjust_and_scale` — eqs 1–2; :func:`project_out` — eq 4 (both differentiable; on Triton through
  :class:`AdjustAndScale` / :class:`ProjectOut`); :func:`adjust_and_scale_backward` — cotangents of eqs 1–2.
- :func:`factorize` → :class:`RidgeFactorization` — eq 3 factored once for eq 5 (``solve_delta``),
  eq 6 (``project``) and the λ gradient, primal or dual (Woodbury) form.

See ``docs/kernels.md``.
"""
from .dispatch import (
    ENV_VAR,
    AdjustAndScale,
    ProjectOut,
    adjust_and_scale,
    adjust_and_scale_backward,
    gram,
    project_out,
    resolve_backend,
)
from .solve import FactorizationError, RidgeFactorization, choose_method, factorize, factorize_gram

__all__ = [
    "ENV_VAR",
    "AdjustAndScale",
    "FactorizationError",
    "ProjectOut",
    "RidgeFactorization",
    "adjust_and_scale",
    "adjust_and_scale_backward",
    "choose_method",
    "factorize",
    "factorize_gram",
    "gram",
    "project_out",
    "resolve_backend",
]
