"""apply/restore ΔW: layouts (nn.Linear vs Conv1D), bit-exact restore, fp32 hook for bf16, NaN refusal."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from easyedit_agrade.core.weights import apply_deltas, io_sizes, restore_weights


class Conv1D(nn.Module):  # same layout and class name as transformers' GPT-2 Conv1D
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def _model(kind, dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Module()
    m.proj = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    return m.to(dtype)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_apply_matches_x_at_delta_and_restore_is_bit_exact(kind):
    m = _model(kind, torch.float64)
    assert io_sizes(m.proj) == (6, 4)
    before = m.proj.weight.detach().clone()
    x = torch.randn(3, 6, dtype=torch.float64)
    y0 = m.proj(x)
    delta = torch.randn(6, 4, dtype=torch.float64) * 1e-3
    copy = apply_deltas(m, {"proj": delta})
    assert torch.allclose(m.proj(x), y0 + x @ delta, atol=1e-12)
    restore_weights(m, copy)
    assert torch.equal(m.proj.weight, before)


def test_repeated_apply_restores_to_first_original():
    m = _model("linear")
    before = m.proj.weight.detach().clone()
    copy = apply_deltas(m, {"proj": torch.randn(6, 4) * 0.1})
    apply_deltas(m, {"proj": torch.randn(6, 4) * 0.1}, weights_copy=copy)
    restore_weights(m, copy)
    assert torch.equal(m.proj.weight, before)


def test_bf16_uses_fp32_hook_and_restores():
    m = _model("linear", torch.bfloat16)
    before = m.proj.weight.detach().clone()
    x = torch.randn(2, 6).to(torch.bfloat16)
    delta = torch.full((6, 4), 1e-4)  # far below bf16 resolution of the weights
    y0 = m.proj(x)
    copy = apply_deltas(m, {"proj": delta})
    assert torch.equal(m.proj.weight, before)  # weights untouched, the edit lives in an fp32 hook
    y1 = m.proj(x)
    want = (y0.float() + x.float() @ delta).to(torch.bfloat16)
    assert torch.equal(y1, want)
    restore_weights(m, copy)
    assert torch.equal(m.proj(x), y0)


def test_nonfinite_delta_refused():
    m = _model("linear")
    bad = torch.zeros(6, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        apply_deltas(m, {"proj": bad})


def test_wrong_shape_refused():
    m = _model("conv1d")
    with pytest.raises(ValueError):
        apply_deltas(m, {"proj": torch.zeros(4, 6)})


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_delta_hooks_backpropagate_into_what_made_delta_and_are_removed(kind):
    """``delta_hooks`` (InstructEdit's training): output = out + round(x @ ΔW) for ΔW as given, the gradient
    reaches the tensor ΔW was computed from, the weights are never written and the hooks go on exit."""
    from easyedit_agrade.core.weights import delta_hooks

    m = _model(kind)
    w0 = m.proj.weight.detach().clone()
    x = torch.randn(3, 6)
    y0 = m.proj(x)
    source = torch.randn(6, 4, requires_grad=True)
    delta = 2.0 * source  # not a leaf: MEND-style training differentiates through it
    with delta_hooks(m, {"proj": delta}):
        y = m.proj(x)
        assert torch.equal(y, y0 + x @ delta)
        y.sum().backward()
    assert torch.allclose(source.grad, 2.0 * x.sum(0)[:, None].expand(6, 4))
    assert torch.equal(m.proj.weight, w0) and torch.equal(m.proj(x), y0)
    with pytest.raises(ValueError, match="shape"):
        with delta_hooks(m, {"proj": torch.zeros(4, 6)}):
            pass
    assert torch.equal(m.proj(x), y0)  # nothing left behind after the refused shape either
