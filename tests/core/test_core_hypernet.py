"""Hypernetwork: identity at init, normaliser frozen unless training, shape sharing, Adam groups."""
from __future__ import annotations

import torch

from easyedit_agrade.core.hypernet import EditorNetworks, HyperNetwork, RunningNormalizer


def test_normalizer_matches_batch_statistics():
    torch.manual_seed(0)
    a, b = torch.randn(50, 7, dtype=torch.float64) * 3 + 1, torch.randn(30, 7, dtype=torch.float64)
    n = RunningNormalizer(7).double()
    n.update(a)
    n.update(b)
    x = torch.cat([a, b])
    assert torch.allclose(n.mean, x.mean(0))
    assert torch.allclose(n.std(), x.std(0))
    assert torch.allclose(n(x), (x - x.mean(0)) / (x.std(0) + n.eps))


def test_untrained_network_is_normalise_then_identity():
    net = HyperNetwork(5, 3, rank=4, n_blocks=2, n_modules=2, seed=0).double()
    k, v = torch.randn(10, 5, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    kt, vt = net(k, v, 1)
    assert torch.equal(kt, k) and torch.equal(vt, v)  # nothing observed yet: no normalisation
    net.train()
    assert net.observe(k, v)
    kt, vt = net(k, v, 0)
    x = torch.cat([k, v], 1)
    want = (x - x.mean(0)) / (x.std(0) + 1e-6)
    assert torch.allclose(torch.cat([kt, vt], 1), want)


def test_normalizer_frozen_in_eval_and_forward_never_updates():
    net = HyperNetwork(4, 2, rank=2, n_blocks=1, n_modules=1)
    k, v = torch.randn(6, 4), torch.randn(6, 2)
    net.eval()
    assert not net.observe(k, v)
    assert float(net.normalizer.count) == 0
    net.train()
    net(k, v, 0)
    assert float(net.normalizer.count) == 0
    net.observe(k, v)
    assert float(net.normalizer.count) == 6


def test_every_parameter_gets_gradient_after_one_update():
    net = HyperNetwork(4, 3, rank=2, n_blocks=2, n_modules=2, seed=1)
    net.train()
    k, v = torch.randn(8, 4), torch.randn(8, 3)
    net.observe(k, v)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        kt, vt = net(k, v, 1)
        (kt.square().sum() + vt.sin().sum()).backward()
        for name, p in net.named_parameters():
            if name in ("lr", "log_lambda") or (step == 0 and name.split(".")[-1] in ("A", "b1", "scale")):
                continue  # zero-initialised B: A, b1, scale get gradient from step 2 on
            if name.split(".")[-1] in ("scale", "shift"):
                assert float(p.grad[1].abs().sum()) > 0 and float(p.grad[0].abs().sum()) == 0, name
            else:
                assert p.grad is not None and float(p.grad.abs().sum()) > 0, (step, name)
        opt.step()


def test_editor_networks_share_by_shape_and_group_params():
    mods = [("a", 8, 4), ("b", 8, 4), ("c", 6, 4), ("d", 8, 4)]
    nets = EditorNetworks(mods, rank=2, n_blocks=1, lr_init=1e-3, log_lambda_init=0.5)
    assert sorted(nets.nets) == ["6x4", "8x4"]
    assert nets.slot("d").index == 2 and nets.slot("c").index == 0
    assert nets.net("a") is nets.net("b")
    assert abs(float(nets.lr("c").detach()) - 1e-3) < 1e-9 and float(nets.log_lambda("b").detach()) == 0.5
    groups = nets.param_groups(1e-4, 3e-5, 1e-2)
    assert [g["name"] for g in groups] == ["body", "eta", "lambda"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(nets.parameters()))
