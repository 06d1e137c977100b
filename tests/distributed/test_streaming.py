"""Large batches in bounded memory: the streamed path (piece-wise eqs 1–5, Gram and HᵀG accumulated, optional
safetensors spill) gives the in-memory result, and the spill folder is private and removed afterwards."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agrade"))
from agrade_helpers import records, tiny_editor  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    try:
        from easyedit_agrade.lm import load_tokenizer

        return load_tokenizer()
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"embedded tokenizer unavailable: {exc}")


@pytest.mark.parametrize("switches", [{}, {"use_weight_projection": False}, {"use_regularization": False},
                                      {"use_adjustment": False}])
def test_streamed_spilled_equals_in_memory(tok, tmp_path, switches):
    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    mem = tiny_editor(tok, solver="dual", **switches)
    ref = mem.compute(mem.cache(mem.encode(prompts, targets)))
    spill = tiny_editor(tok, solver="auto", cache_spill=True, cache_spill_dir=str(tmp_path), cache_batch_size=2,
                       **switches)
    cache = spill.cache(spill.encode(prompts, targets, micro_batch=2), keep_hidden=False)
    folder = Path(cache.spill_dir)
    assert folder.parent == tmp_path and folder.name.startswith("easyedit-agrade-cache-")
    assert len(list(folder.glob("*.safetensors"))) == 3 * 2  # 3 micro-batches x 2 modules
    assert cache.nbytes() == 0  # nothing resident
    assert spill.use_streamed(cache)
    out = spill.compute(cache, keep_modules=False)
    cache.close()
    assert not folder.exists()
    for name, d in ref.deltas.items():
        torch.testing.assert_close(out.deltas[name], d, rtol=1e-8, atol=1e-10)


def test_edit_deltas_cleans_up_and_two_caches_do_not_share_a_folder(tok, tmp_path):
    ed = tiny_editor(tok, cache_spill=True, cache_spill_dir=str(tmp_path))
    recs = records(4)
    a = ed.cache(ed.encode([r.prompt for r in recs], [r.target_new for r in recs]))
    b = ed.cache(ed.encode([r.prompt for r in recs], [r.target_new for r in recs]))
    assert a.spill_dir != b.spill_dir
    a.close()
    b.close()
    ed.edit_deltas([r.prompt for r in recs], [r.target_new for r in recs])
    assert os.listdir(tmp_path) == []


def test_streamed_primal_used_for_large_T_and_matches_dual(tok):
    """T ≥ Dh picks the primal form, which now streams; it equals the dual/in-memory solve on the same rows."""
    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    dual = tiny_editor(tok, solver="dual")
    primal = tiny_editor(tok, solver="primal")
    c1, c2 = (e.cache(e.encode(prompts, targets)) for e in (dual, primal))
    assert not dual.use_streamed(c1) and primal.use_streamed(c2)
    a, b = dual.compute(c1), primal.compute(c2)
    for name in a.deltas:
        torch.testing.assert_close(b.deltas[name], a.deltas[name], rtol=1e-7, atol=1e-9)
    for ma, mb in zip(a.modules, b.modules):  # the final G of every module (eq 4 applied piece-wise)
        torch.testing.assert_close(mb.G, ma.G, rtol=1e-9, atol=1e-12)


def test_in_memory_cache_bound_names_the_remedy(tok):
    from easyedit_agrade.core.cache import CacheOverflowError, KeyGradCache

    c = KeyGradCache(["m"], max_rows=3)
    c.add("m", torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(CacheOverflowError, match="cache_spill"):
        c.add("m", torch.zeros(2, 4), torch.zeros(2, 5))
    s = KeyGradCache(["m"], max_rows=3, spill=True)
    for _ in range(3):
        s.add("m", torch.ones(2, 4), torch.ones(2, 5))
    assert s.n_rows("m") == 6 and s.get("m")[0].shape == (6, 4)
    folder = s.spill_dir
    del s
    import gc

    gc.collect()
    assert not os.path.exists(folder)  # removed when the cache is garbage collected


@pytest.mark.parametrize("spill", [False, True])
def test_streamed_path_runs_on_the_triton_kernels(tok, tmp_path, monkeypatch, spill):
    """The many-edits (streamed) path through the kernels' dispatcher: on the Triton backend (interpreted on CPU) the
    piece-wise Gram and eqs 1–2 run as Triton kernels, and ΔW equals the torch backend's."""
    from easyedit_agrade.kernels import dispatch

    if not dispatch.triton_importable():
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops = dispatch._triton_ops()
    calls: dict[str, int] = {}
    for op in ("gram", "adjust_and_scale"):
        def counted(*args, _op=op, _fn=getattr(ops, op), **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(ops, op, counted)
    recs = records(6)
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    over = dict(solver="primal", cache_batch_size=2, cache_spill=spill, cache_spill_dir=str(tmp_path))
    results = {}
    for backend in ("torch", "triton"):
        ed = tiny_editor(tok, kernels_backend=backend, **over)
        cache = ed.cache(ed.encode(prompts, targets, micro_batch=2), keep_hidden=False)
        assert ed.use_streamed(cache)
        results[backend] = ed.compute(cache, keep_modules=False).deltas
        cache.close()
        if backend == "torch":
            assert calls == {}
    n_pieces = 3 * len(results["torch"])  # 3 micro-batches x 2 modules
    assert calls == {"gram": n_pieces, "adjust_and_scale": n_pieces}
    for name, d in results["torch"].items():
        torch.testing.assert_close(results["triton"][name], d, rtol=1e-10, atol=1e-12)
