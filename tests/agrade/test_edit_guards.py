"""Silent no-ops and unbounded edits (issue 16 §4): the executors report ‖ΔW‖/‖W‖ per module and the rows the
outlier guards suppressed, warn when nothing was edited, refuse a ΔW beyond ``max_delta_ratio`` with the model
left untouched, range-check hparams at load (file named), and name the caller's index in tokenisation errors."""
from __future__ import annotations

import warnings

import pytest
import torch

from agrade_helpers import LLAMA_PARAMS, perturb, records, tiny_agrade_archive, tiny_llama
from easyedit_agrade.core.edit_report import DeltaTooLargeError, EditedWeights, last_report
from easyedit_agrade.hparams import HyperParamsError


def _agrade(tmp_path, tok, **over):
    return tiny_agrade_archive(tmp_path, tok, **over)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _requests(n):
    return [r.to_request() for r in records(n)]


def test_report_holds_delta_ratios_and_no_suppressed_rows(tmp_path, tok):
    from easyedit_agrade.models.agrade import apply_agrade_to_model

    model, hp = _agrade(tmp_path, tok, max_row_zscore=None, max_key_norm_ratio=None)
    before = _weights(model)
    _, copy = apply_agrade_to_model(model, tok, _requests(4), hp, return_orig_weights=True)
    report = copy.report
    assert isinstance(copy, EditedWeights) and last_report(model) is report
    assert report.alg_name == "AGRADE" and report.n_requests == 4 and report.chunks == 1
    assert set(report.delta_ratio) == {p.rsplit(".", 1)[0] for p in LLAMA_PARAMS}
    for module, ratio in report.delta_ratio.items():  # ‖ΔW‖/‖W‖ of the applied edit
        w0, w1 = before[module + ".weight"], model.state_dict()[module + ".weight"]
        assert ratio == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-9) and ratio > 0
    assert report.total_rows > 0 and set(report.suppressed_rows.values()) == {0}
    _, empty = apply_agrade_to_model(model, tok, _requests(1), hp)  # no weights asked for: still the report
    assert empty == {} and empty.report.n_requests == 1


def test_every_row_suppressed_warns_and_reports_the_count(tmp_path, tok):
    from easyedit_agrade.models.agrade import apply_agrade_to_model

    model, hp = _agrade(tmp_path, tok, max_row_zscore=1e-9)  # every row is "out of distribution"
    before = _weights(model)
    with pytest.warns(RuntimeWarning, match="suppressed every one of the .* NOT edited"):
        _, copy = apply_agrade_to_model(model, tok, _requests(3), hp, return_orig_weights=True)
    report = copy.report
    assert report.total_rows > 0
    assert report.suppressed_rows == {p.rsplit(".", 1)[0]: report.total_rows for p in LLAMA_PARAMS}
    assert _same(before, _weights(model))  # ΔW = 0
    model2, hp2 = _agrade(tmp_path / "b", tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an ordinary edit warns about nothing
        apply_agrade_to_model(model2, tok, _requests(3), hp2)


def _chunk_ratio(tmp_path, tok, reqs, **over):
    from easyedit_agrade.models.agrade import apply_agrade_to_model

    model, hp = _agrade(tmp_path, tok, max_delta_ratio=None, **over)
    _, copy = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)
    return max(copy.report.delta_ratio.values())


def test_delta_beyond_max_ratio_is_refused_and_the_model_left_untouched(tmp_path, tok):
    """Two chunks: the first within the limit, the second beyond it: the refusal restores the first chunk."""
    from easyedit_agrade.models.agrade import apply_agrade_to_model

    reqs = _requests(4)
    for order in (reqs, reqs[2:] + reqs[:2]):
        first = _chunk_ratio(tmp_path / "one", tok, order[:2])
        both = _chunk_ratio(tmp_path / "two", tok, order, batch_size=2)
        if both > first * 1.001:
            break
    else:
        pytest.fail("no request order whose second chunk has the larger ΔW")
    limit = (first + both) / 2
    model, hp = _agrade(tmp_path / "run", tok, batch_size=2, max_delta_ratio=limit)
    before = _weights(model)
    with pytest.raises(DeltaTooLargeError, match=r"max_delta_ratio=.*model was left unchanged"):
        apply_agrade_to_model(model, tok, order, hp, return_orig_weights=True)
    assert _same(before, _weights(model))


def test_more_requests_than_batch_size_warns_that_chunks_add_up(tmp_path, tok):
    """One call, 3 requests, batch_size 2: two sequential chunks (the second solved on the edited model) and a
    RuntimeWarning naming the batch_size that would make it one solve; exactly batch_size requests: no warning."""
    from easyedit_agrade.models.agrade import apply_agrade_to_model

    model, hp = _agrade(tmp_path, tok, batch_size=2, max_delta_ratio=None)
    with pytest.warns(RuntimeWarning, match=r"3 requests are edited in 2 sequential chunks of batch_size=2.*"
                                            r"batch_size >= 3"):
        _, copy = apply_agrade_to_model(model, tok, _requests(3), hp, return_orig_weights=True)
    assert copy.report.chunks == 2
    model2, hp2 = _agrade(tmp_path / "b", tok, batch_size=2, max_delta_ratio=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, copy2 = apply_agrade_to_model(model2, tok, _requests(2), hp2, return_orig_weights=True)
    assert copy2.report.chunks == 1


def test_instructedit_reports_and_refuses_large_deltas(tmp_path, tok):
    from easyedit_agrade.models.instructedit import InstructEditHyperParams, apply_instructedit_to_model
    from easyedit_agrade.models.instructedit.archive import save_archive
    from easyedit_agrade.models.instructedit.editor import build_networks
    from easyedit_agrade.models.instructedit.instructedit_main import clear_archive_cache

    model = tiny_llama(len(tok))
    cfg = dict(alg_name="InstructEdit", model_name="tiny", inner_params=LLAMA_PARAMS, rank=4, n_blocks=2,
               editor_dtype="float64", use_instruction=False, edit_lr=0.1, archive=str(tmp_path / "i.safetensors"))
    hp = InstructEditHyperParams.from_dict(cfg)
    nets = build_networks(model, hp).double()
    perturb(nets, scale=0.1)
    save_archive(tmp_path / "i.safetensors", nets, model, hp)
    clear_archive_cache()
    before = _weights(model)
    _, copy = apply_instructedit_to_model(model, tok, _requests(2), hp, return_orig_weights=True)
    ratios = copy.report.delta_ratio
    assert set(ratios) == {p.rsplit(".", 1)[0] for p in LLAMA_PARAMS} and min(ratios.values()) > 0
    for k, v in copy.items():
        model.state_dict()[k].copy_(v)
    hp_tight = InstructEditHyperParams.from_dict(dict(cfg, max_delta_ratio=min(ratios.values()) / 2))
    with pytest.raises(DeltaTooLargeError, match="InstructEdit: refusing"):
        apply_instructedit_to_model(model, tok, _requests(2), hp_tight)
    assert _same(before, _weights(model))


_RANGES = [("max_length", 0), ("max_length", 1), ("batch_size", 0), ("max_delta_ratio", 0), ("max_delta_ratio", -1.0)]


@pytest.mark.parametrize("alg,key,value", [("AGRADE", *kv) for kv in _RANGES + [("log_lambda_offset", 1e6),
                                                                                 ("log_lambda_offset", ".nan")]]
                         + [("InstructEdit", *kv) for kv in _RANGES])
def test_out_of_range_hparams_are_refused_naming_the_file_and_key(tmp_path, alg, key, value):
    import yaml

    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.instructedit import InstructEditHyperParams
    from easyedit_agrade.paths import REPO_ROOT

    cls = AGRADEHyperParams if alg == "AGRADE" else InstructEditHyperParams
    with open(REPO_ROOT / f"hparams/{alg}/smollm2-135m.yaml", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**cfg, key: value}) if value != ".nan" else
                    yaml.safe_dump(cfg) + f"{key}: .nan\n", encoding="utf-8")
    with pytest.raises(HyperParamsError, match=rf"{path}.*{key}"):
        cls.from_hparams(path)


def test_tokenisation_error_names_the_callers_index(tmp_path, tok):
    """The executor sorts records by length into micro-batches: an error must still name the request's own
    position, and come before any weight moves."""
    from easyedit_agrade.models.agrade import apply_agrade_to_model

    model, hp = _agrade(tmp_path, tok, max_length=8, cache_batch_size=2)
    reqs = _requests(6)
    reqs[0] = dict(reqs[0], target_new="a very long target that needs far more than eight tokens to spell out")
    before = _weights(model)
    with pytest.raises(ValueError, match=r"\b(record|request) 0\b"):
        apply_agrade_to_model(model, tok, reqs, hp)
    assert _same(before, _weights(model))
