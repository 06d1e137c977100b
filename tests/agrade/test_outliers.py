"""Massive-activation rows (attention-sink tokens) carry no edit signal: the check itself, its agreement between the
in-memory and the streamed solve, and the edit on the embedded model that it fixes."""
from __future__ import annotations

import pytest
import torch

from agrade_helpers import LLAMA_PARAMS, records, tiny_editor
from easyedit_agrade.core.hypernet import RunningNormalizer
from easyedit_agrade.models.agrade.outliers import (massive_rows, out_of_distribution_rows, row_norm_median,
                                                    row_zscores, suppress_massive_rows)


def _rows(n=7, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(n, d, generator=g, dtype=torch.float64)
    return H / H.norm(dim=1, keepdim=True) * (1.0 + 0.1 * torch.arange(n, dtype=torch.float64))[:, None]


def test_massive_rows_and_suppression():
    H = _rows()
    assert massive_rows(H, 4.0) is None  # ordinary rows: nothing flagged, G untouched
    G = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert suppress_massive_rows(G, H, 4.0) is G
    H[3] *= 12.0  # one attention-sink-like row
    mask = massive_rows(H, 4.0)
    assert mask is not None and mask.tolist() == [i == 3 for i in range(7)]
    assert massive_rows(H, None) is None  # the check can be turned off
    assert massive_rows(H, 4.0, reference=100.0) is None  # an explicit reference (e.g. over all pieces) is used
    out = suppress_massive_rows(G, H, 4.0)
    assert torch.equal(out[3], torch.zeros(5, dtype=torch.float64))
    keep = [i for i in range(7) if i != 3]
    assert torch.equal(out[keep], G[keep])
    out.sum().backward()  # differentiable in the kept rows (the trainer backpropagates through G)
    assert torch.equal(G.grad[3], torch.zeros(5, dtype=torch.float64)) and bool((G.grad[keep] == 1).all())
    assert row_norm_median([H[:3], H[3:]]) == row_norm_median(H)
    assert row_norm_median(torch.zeros(0, 12)) is None


def test_out_of_distribution_rows_by_zscore():
    g = torch.Generator().manual_seed(0)
    k, v = 6, 4
    norm = RunningNormalizer(k + v).to(torch.float64)
    H, grad = torch.randn(9, k, generator=g, dtype=torch.float64), torch.randn(9, v, generator=g, dtype=torch.float64)
    assert out_of_distribution_rows(norm, H, grad, 5.0) is None  # no statistics yet: the check cannot judge
    norm.update(torch.cat([torch.randn(500, k, generator=g, dtype=torch.float64) * 3 + 1,
                           torch.randn(500, v, generator=g, dtype=torch.float64) * 0.1], 1))
    zk, zg = row_zscores(norm, H * 3 + 1, grad * 0.1)
    assert bool((zk < 2.5).all()) and bool((zg < 2.5).all())  # rows like the observed ones: z ~ 1
    assert out_of_distribution_rows(norm, H * 3 + 1, grad * 0.1, 5.0) is None
    # ordinary key, gradient 10x the usual size (row 2); huge key, ordinary gradient (row 5)
    grad2, H2 = grad * 0.1, H * 3 + 1
    grad2[2] *= 10.0
    H2[5] = H2[5] * 10.0
    mask = out_of_distribution_rows(norm, H2, grad2, 5.0)
    assert mask is not None and mask.tolist() == [i in (2, 5) for i in range(9)]
    assert out_of_distribution_rows(norm, H2, grad2, None) is None  # off
    assert out_of_distribution_rows(norm, H2, grad2, 1e6) is None  # nothing that far out


def test_zscore_guard_applies_when_editing_not_while_training(tok):
    """With a frozen normaliser (eval) a row far outside the normaliser's statistics gets G = 0; in training mode
    (statistics still moving) the same row keeps its G; ``max_row_zscore: null`` turns the check off."""
    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    name = LLAMA_PARAMS[1].rsplit(".", 1)[0]
    ed = tiny_editor(tok, solver="dual", max_key_norm_ratio=None)
    cache = ed.cache(ed.encode(prompts, targets, micro_batch=2))
    H, grad = cache.get(name)
    net = ed.nets.net(name)
    with torch.no_grad():
        net.normalizer.update(torch.cat([H, grad], 1).to(net.normalizer.mean.dtype))
    grad = grad.clone()
    grad[1] *= 1e3  # one target position with an output gradient far outside what the network saw
    with torch.no_grad():
        G_eval = ed.adjusted_gradient(name, H, grad)
        ed.nets.train()
        G_train = ed.adjusted_gradient(name, H, grad)
        ed.nets.eval()
        ed.hparams.max_row_zscore = None
        G_off = ed.adjusted_gradient(name, H, grad)
    assert torch.equal(G_eval[1], torch.zeros_like(G_eval[1]))
    assert bool(G_eval.abs().sum(1)[[i for i in range(len(G_eval)) if i != 1]].gt(0).all())
    assert bool(G_train[1].abs().sum() > 0) and torch.equal(G_off, G_train)
    torch.testing.assert_close(G_eval[2:], G_off[2:])


def _blow_up_one_row(cache, name, factor=50.0):
    """Scale one cached key row of ``name`` (in its second piece) like a massive activation."""
    cache.keys[name][1][0] *= factor


def test_massive_row_gets_no_signal_and_streamed_agrees_with_in_memory(tok):
    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    name = LLAMA_PARAMS[1].rsplit(".", 1)[0]
    results = {}
    for label, over in (("mem", dict(solver="dual")), ("streamed", dict(solver="primal")),
                        ("off", dict(solver="dual", max_key_norm_ratio=None))):
        ed = tiny_editor(tok, **over)
        cache = ed.cache(ed.encode(prompts, targets, micro_batch=2))
        _blow_up_one_row(cache, name)
        assert ed.use_streamed(cache) == (label == "streamed")
        results[label] = ed.compute(cache, keep_modules=(label == "mem"))
        if label == "mem":  # eqs 1-2 give that row G = 0 (eq 4 then projects the whole G as usual)
            H, grad = cache.get(name)
            row = cache.keys[name][0].shape[0]
            with torch.no_grad():
                G = ed.adjusted_gradient(name, H, grad)
            assert torch.equal(G[row], torch.zeros_like(G[row])) and int(G.abs().sum(1).gt(0).sum()) == len(G) - 1
    mem = results["mem"]
    for n, d in mem.deltas.items():  # the streamed path compares with the median over all pieces, not per piece
        torch.testing.assert_close(results["streamed"].deltas[n], d, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(results["off"].deltas[name], mem.deltas[name])  # the check did something


@pytest.mark.slow
def test_sink_token_edit_does_not_wreck_the_embedded_model(embedded_model):
    """The bench record that sent AGRADE's N=16 run to ES/GS/LS 0 (WikiText perplexity 39 -> ~10^10): the lone space
    before '1279' is an attention sink of SmolLM2 (input row norm 606 at layer 28, median 50). Before the check its
    ΔW at layer 28 had norm ~1150 against a weight norm of ~190."""
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_main import _networks_for
    from easyedit_agrade.models.agrade.archive import ArchiveMismatchError, ArchiveNotFoundError
    from easyedit_agrade.models.agrade.editor import AGRADEEditor
    from easyedit_agrade.paths import REPO_ROOT

    model, tok = embedded_model
    hp = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams/AGRADE/smollm2-135m"))
    try:
        nets, _ = _networks_for(model, hp)
    except (ArchiveNotFoundError, ArchiveMismatchError) as exc:
        pytest.skip(f"no shipped AGRADE archive for the embedded model: {exc}")
    torch.set_num_threads(1)
    ed = AGRADEEditor(model, tok, hp, nets)
    res = ed.edit_deltas(["When was Ayyubid dynasty abolished?"], ["1279"])
    weights = dict(model.named_parameters())
    for name, delta in res.deltas.items():
        ratio = float(delta.norm() / weights[f"{name}.weight"].detach().norm())
        assert ratio < 0.25, f"{name}: ‖ΔW‖/‖W‖ = {ratio:.2f}"
    assert float(res.deltas["model.layers.27.mlp.down_proj"].norm()) > 0  # the edit itself is still made


@pytest.mark.slow
def test_out_of_distribution_gradient_row_does_not_wreck_the_embedded_model(embedded_model):
    """A benchmark edit whose bad row the norm check cannot see: "When was Welsh Proms launched? → 1999". The row
    at the lone space before the digits (predicting "1") has an ordinary key norm but an output gradient with RMS
    z-score ≈ 6–7 under the archive's normaliser (CounterFact rows: < 3.8). Without the z-score guard this one edit
    sent WikiText-2 perplexity from ~31 to ~10⁷ with the shipped archive; with it the perplexity stays within 1.5x
    and the edit is still made."""
    from easyedit_agrade.core.weights import apply_deltas, restore_weights
    from easyedit_agrade.evaluate.general import wikitext_windows
    from easyedit_agrade.evaluate.scoring import perplexity
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_main import _networks_for
    from easyedit_agrade.models.agrade.archive import ArchiveMismatchError, ArchiveNotFoundError
    from easyedit_agrade.models.agrade.editor import AGRADEEditor
    from easyedit_agrade.paths import REPO_ROOT, data_file

    model, tok = embedded_model
    hp = AGRADEHyperParams.from_hparams(str(REPO_ROOT / "hparams/AGRADE/smollm2-135m"))
    try:
        nets, _ = _networks_for(model, hp)
        wiki = data_file("wikitext/wiki.test.tokens")
    except (ArchiveNotFoundError, ArchiveMismatchError, FileNotFoundError) as exc:
        pytest.skip(f"needs the shipped AGRADE archive and ../shared/data/wikitext: {exc}")
    torch.set_num_threads(1)
    windows = wikitext_windows(tok, wiki, n_windows=1, window=128)
    before = perplexity(model, windows)
    ed = AGRADEEditor(model, tok, hp, nets)
    mbs = ed.encode(["When was Welsh Proms launched?"], ["1999"])
    cache = ed.cache(mbs, keep_hidden=False)
    name = "model.layers.27.mlp.down_proj"
    flagged = out_of_distribution_rows(nets.net(name).normalizer, *cache.get(name), hp.max_row_zscore)
    assert flagged is not None and int(flagged.sum()) == 1  # exactly the lone-space row
    res = ed.compute(cache, keep_modules=False)
    copy: dict = {}
    apply_deltas(model, res.deltas, weights_copy=copy)
    try:
        after = perplexity(model, windows)
    finally:
        restore_weights(model, copy)
    assert after < 1.5 * before, f"WikiText perplexity {before:.1f} -> {after:.1f}"
    assert float(res.deltas[name].norm()) > 0


def test_log_lambda_offset_strengthens_the_ridge_when_editing_only(tok):
    """``log_lambda_offset: c`` edits exactly like a network whose every log λ is larger by c, and never enters
    a training step (the learned λ stays what training sees)."""
    from easyedit_agrade.distributed.collective import Collective
    from easyedit_agrade.hparams import HyperParamsError
    from easyedit_agrade.models.agrade import AGRADEHyperParams

    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    ed = tiny_editor(tok, solver="dual")
    cache = ed.cache(ed.encode(prompts, targets, micro_batch=3))
    base = ed.compute(cache, keep_modules=False).deltas
    ed.hparams.log_lambda_offset = 3.0
    offset = ed.compute(cache, keep_modules=False).deltas
    streamed = ed.compute_streamed(cache, Collective(), keep_modules=False).deltas
    ed.nets.train()
    in_training = ed.compute(cache, keep_modules=False).deltas
    ed.nets.eval()
    ed.hparams.log_lambda_offset = 0.0
    with torch.no_grad():
        for net in ed.nets.nets.values():
            net.log_lambda.add_(3.0)
    shifted = ed.compute(cache, keep_modules=False).deltas
    for name in base:
        torch.testing.assert_close(offset[name], shifted[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(streamed[name], shifted[name], rtol=1e-8, atol=1e-10)
        assert torch.equal(in_training[name], base[name])
        assert float(offset[name].norm()) < float(base[name].norm())  # a stronger ridge shrinks ΔW
    with pytest.raises(HyperParamsError, match="log_lambda_offset"):
        AGRADEHyperParams.from_dict(dict(ed.hparams.to_dict(), log_lambda_offset=float("nan")))
