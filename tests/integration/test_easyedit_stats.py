"""EasyEdit's ROME/MEMIT key statistics from the local corpus, one cache with AGRADE's C₀: written in EasyEdit's own
format at the path EasyEdit reads, loaded by EasyEdit's own ``layer_stats`` without a download, keyed and reused,
equal to what EasyEdit's statistics pipeline computes on the same text, and a missing corpus is a clear error."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from easyedit_agrade.core import preserved_stats
from easyedit_agrade.integration import easyedit_stats as S

LAYERS = [3, 4]
N_TOKENS, WINDOW = 512, 256


def memit_like_hparams(**kw):
    base = dict(layers=list(LAYERS), rewrite_module_tmp="model.layers.{}.mlp.down_proj", mom2_dtype="float32",
                mom2_n_samples=100000, mom2_dataset="wikipedia", stats_dir="./data/stats", device=0)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture()
def no_download(monkeypatch, easyeditor_module):
    ls = importlib.import_module("easyeditor.models.rome.layer_stats")

    def refuse(*a, **k):
        raise AssertionError("EasyEdit tried to download a dataset")

    monkeypatch.setattr(ls, "load_dataset", refuse)
    return ls


def test_export_is_loaded_by_easyedit_layer_stats_without_download(embedded_model, shared_data, tmp_path, no_download):
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu

    model, tok = embedded_model
    hp = memit_like_hparams()
    preserved_stats.clear_second_moment_cache()
    src = S.export_mom2(model, tok, hp, n_tokens=N_TOKENS, window=WINDOW, stats_dir=tmp_path / "ee",
                        preserved_root=tmp_path / "c0", progress=False)
    assert src.n_tokens == N_TOKENS and src.corpus == "wiki.valid.tokens"
    assert hp.stats_dir.startswith(str(tmp_path / "ee")) and hp.mom2_dataset == "wikitext"
    assert hp.mom2_n_samples == N_TOKENS  # the key in EasyEdit's file name is the token count
    ours = preserved_stats.preserved_second_moments(model, tok, [hp.rewrite_module_tmp.format(i) for i in LAYERS],
                                                    corpus="wikitext/wiki.valid.tokens", n_tokens=N_TOKENS,
                                                    window=WINDOW, root=tmp_path / "c0", progress=False)
    for layer in LAYERS:
        name = hp.rewrite_module_tmp.format(layer)
        f = S.easyedit_stats_file(hp.stats_dir, model, name, precision="float32", sample_size=N_TOKENS)
        assert f.is_file()
        with cuda_on_cpu():
            stat = no_download.layer_stats(model, tok, name, hp.stats_dir, hp.mom2_dataset, to_collect=["mom2"],
                                           sample_size=hp.mom2_n_samples, precision=hp.mom2_dtype, hparams=hp)
        assert int(stat.mom2.count) == N_TOKENS
        torch.testing.assert_close(stat.mom2.moment().float(), ours[name].cpu(), rtol=1e-5, atol=1e-6)
    # another token count is another file (EasyEdit's tally also refuses a changed sample_size)
    hp2 = memit_like_hparams()
    S.export_mom2(model, tok, hp2, n_tokens=2 * N_TOKENS, window=WINDOW, stats_dir=tmp_path / "ee",
                  preserved_root=tmp_path / "c0", progress=False)
    assert hp2.stats_dir == hp.stats_dir and hp2.mom2_n_samples == 2 * N_TOKENS
    n_dirs = len(S.easyedit_model_dirs(model))  # one copy per EasyEdit generation's folder naming
    assert len(list((tmp_path / "ee").rglob("*.npz"))) == 2 * len(LAYERS) * n_dirs


def test_export_reuses_both_caches(embedded_model, shared_data, tmp_path, monkeypatch, easyeditor_module):
    model, tok = embedded_model
    preserved_stats.clear_second_moment_cache()
    hp = memit_like_hparams()
    S.export_mom2(model, tok, hp, n_tokens=N_TOKENS, window=WINDOW, stats_dir=tmp_path / "ee",
                  preserved_root=tmp_path / "c0", progress=False)
    root = Path(hp.stats_dir)  # keyed by the weights, the corpus and the window below the given folder
    assert root.parent.parent == tmp_path / "ee"
    dirs = S.easyedit_model_dirs(model)  # the PyPI wheel's model folder first, then upstream's (if it differs)
    files = sorted((root / dirs[0]).rglob("*.npz"))
    stamps = [f.stat().st_mtime_ns for f in files]
    c0_files = sorted((tmp_path / "c0").rglob("*.safetensors"))
    assert len(files) == len(LAYERS) and len(c0_files) == 1  # one AGRADE-format store holds every layer
    for other in dirs[1:]:  # the same bytes where the other EasyEdit generation's layer_stats looks
        mirrored = sorted((root / other).rglob("*.npz"))
        assert [f.name for f in mirrored] == [f.name for f in files]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(mirrored, files))

    def boom(*a, **k):
        raise AssertionError("statistics recomputed")

    monkeypatch.setattr(preserved_stats, "key_second_moments", boom)
    preserved_stats.clear_second_moment_cache()
    S.export_mom2(model, tok, memit_like_hparams(), n_tokens=N_TOKENS, window=WINDOW, stats_dir=tmp_path / "ee",
                  preserved_root=tmp_path / "c0", progress=False)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # a new EasyEdit key (another precision) is filled from the shared C₀ file, not recomputed
    S.export_mom2(model, tok, memit_like_hparams(mom2_dtype="float64"), n_tokens=N_TOKENS, window=WINDOW,
                  stats_dir=tmp_path / "ee", preserved_root=tmp_path / "c0", progress=False)
    assert len(sorted((root / dirs[0]).rglob("*float64*.npz"))) == len(LAYERS)


def test_missing_corpus_is_a_clear_error_and_writes_nothing(embedded_model, tmp_path, easyeditor_module):
    model, tok = embedded_model
    hp = memit_like_hparams()
    with pytest.raises(FileNotFoundError, match="no-such-corpus.txt"):
        S.export_mom2(model, tok, hp, corpus=tmp_path / "no-such-corpus.txt", stats_dir=tmp_path / "ee",
                      preserved_root=tmp_path / "c0", progress=False)
    assert not (tmp_path / "ee").exists() and not (tmp_path / "c0").exists()
    assert hp.stats_dir == "./data/stats" and hp.mom2_n_samples == 100000  # hparams untouched
    with pytest.raises(ValueError, match="perplexity"):
        S.export_mom2(model, tok, hp, corpus="wikitext/wiki.test.tokens", stats_dir=tmp_path / "ee",
                      preserved_root=tmp_path / "c0", progress=False)


def test_easyedit_statistics_pipeline_agrees_with_ours(embedded_model, monkeypatch, tmp_path, easyeditor_module):
    """EasyEdit's own layer_stats (TokenizedDataset, length collation, Trace on the layer input, SecondMoment),
    fed a few local texts instead of its download, gives the same E[k kᵀ] as our streamer on the same tokens."""
    from easyedit_agrade.integration.cpu_compat import cuda_on_cpu

    model, tok = embedded_model
    ls = importlib.import_module("easyeditor.models.rome.layer_stats")
    texts = ["The Eiffel Tower is in Paris, the capital of France.", "Water boils at one hundred degrees.",
             "Robert Boulter is an English film , television and theatre actor ."]
    monkeypatch.setattr(ls, "load_dataset", lambda *a, **k: {"train": [{"text": t} for t in texts]})
    name = "model.layers.4.mlp.down_proj"
    hp = SimpleNamespace(device=0)
    with cuda_on_cpu():
        stat = ls.layer_stats(model, tok, name, str(tmp_path), "wikitext", to_collect=["mom2"],
                              sample_size=len(texts), precision="float64", hparams=hp,
                              progress=lambda it, total=None: it)
    total, count = None, 0
    for t in texts:
        ids = torch.tensor([tok.encode(t)])
        c, n = preserved_stats.key_second_moments(model, [name], ids, progress=False)
        total = c[name] * n if total is None else total + c[name] * n
        count += n
    assert int(stat.mom2.count) == count
    # fp32 activations of a padded batch vs one text at a time differ in the last bits
    torch.testing.assert_close(stat.mom2.moment(), total / count, rtol=1e-4, atol=1e-5)
