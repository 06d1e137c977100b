"""The CUDA->CPU layer is scoped, maps device arguments, and is a no-op when CUDA exists."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.integration.cpu_compat import cuda_on_cpu

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@needs_no_cuda
def test_maps_cuda_arguments_inside_the_context():
    lin = torch.nn.Linear(3, 2)
    with cuda_on_cpu() as active:
        assert active
        a = torch.zeros(2, device="cuda:0")
        b = torch.ones(2).to("cuda")
        c = torch.ones(2).to(torch.device("cuda", 0), torch.float64)
        d = torch.ones(2).cuda()
        e = torch.tensor([1.0], device=torch.device("cuda:1"))
        lin.to("cuda:0")
        lin.cuda()
        batch = {"x": torch.ones(1)}
        moved = {k: v.to(f"cuda:{0}") for k, v in batch.items()}
    for t in (a, b, c, d, e, lin.weight, moved["x"]):
        assert t.device.type == "cpu"
    assert c.dtype == torch.float64


@needs_no_cuda
def test_scoped_not_global():
    with cuda_on_cpu():
        pass
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    with cuda_on_cpu(enabled=False) as active:
        assert not active
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")


def test_noop_when_cuda_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with cuda_on_cpu() as active:
        assert active is False
        from torch.overrides import _get_current_function_mode_stack

        from easyedit_agrade.integration.cpu_compat import CudaToCpuMode

        assert not any(isinstance(m, CudaToCpuMode) for m in _get_current_function_mode_stack())


def test_other_arguments_untouched():
    x = torch.arange(6.0).reshape(2, 3)
    with cuda_on_cpu(enabled=True):
        y = torch.einsum("ij->ji", x)
        z = torch.nn.functional.cross_entropy(torch.randn(2, 3), torch.tensor([0, 2]), reduction="sum")
    assert torch.equal(y, x.T)
    assert z.ndim == 0
