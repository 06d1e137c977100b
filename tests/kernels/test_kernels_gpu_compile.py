"""Compile every Triton kernel for an NVIDIA H100 target (sm_90) without a GPU.

The interpreter tests check the numerics but not that the kernels lower to PTX; this does, with the ptxas
bundled in the triton wheel. It runs in a subprocess because kernels imported under TRITON_INTERPRET=1
(see test_kernels_triton) are interpreted and cannot be compiled.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Not importorskip: importing triton here (without TRITON_INTERPRET) would spoil test_kernels_triton's import.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CODE = textwrap.dedent(
    """
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from easyedit_agrade.kernels import triton_ops as T

    def signature(fn, pointer_type, constexprs):
        names = inspect.signature(fn.fn).parameters
        return {n: "constexpr" if n in constexprs else pointer_type if n.endswith("_ptr") else "i32" for n in names}

    gram = dict(LOWER_ONLY=True, UPCAST=False, BLOCK=T.GRAM_BLOCK, BLOCK_K=T.GRAM_BLOCK_K)
    rows = dict(BLOCK_T=T.ROW_BLOCK, BLOCK_H=T.MAX_COL_BLOCK, BLOCK_G=T.MAX_COL_BLOCK)
    cols = dict(BLOCK_T=T.ROW_BLOCK, BLOCK_D=T.MAX_COL_BLOCK)
    jobs = [
        (T._gram_kernel, "*fp32", gram), (T._gram_kernel, "*fp64", dict(gram, LOWER_ONLY=False)),
        (T._adjust_scale_kernel, "*fp32", rows), (T._dots_kernel, "*fp32", cols),
        (T._axpy_kernel, "*fp32", cols), (T._adjust_scale_bwd_kernel, "*fp32", rows),
    ]
    for fn, pointer_type, constexprs in jobs:
        src = ASTSource(fn=fn, signature=signature(fn, pointer_type, constexprs), constexprs=constexprs)
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print("compiled", len(jobs))
    """
)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", CODE], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    if "ImportError" in done.stderr and "ASTSource" in done.stderr:
        pytest.skip("this triton version has no triton.compiler.ASTSource")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled 6" in done.stdout
