"""Multi-task data: seeded balancing proportions, readers' errors naming the field, shared-data splits."""
from __future__ import annotations

from collections import Counter

import pytest

from easyedit_agrade.dataset.readers import RecordFormatError
from easyedit_agrade.models.instructedit.instructedit_hparams import InstructEditTrainingHyperParams
from easyedit_agrade.hparams import HyperParamsError
from easyedit_agrade.models.instructedit.multitask import (MultiTaskSampler, TaskRecord, load_split,
                                                           parse_convsent, parse_counterfact, parse_wikirecent,
                                                           parse_zsre)


def _task(name, n):
    return [TaskRecord(name, f"{name} {i}", "t", index=i) for i in range(n)]


def _counts(sampler, steps=3000):
    return Counter(r.task for s in range(steps) for r, _ in sampler.draw(s, 1))


def test_balanced_vs_natural_proportions():
    tasks = {"counterfact": _task("counterfact", 1000), "wikirecent": _task("wikirecent", 100),
             "convsent": _task("convsent", 400)}
    bal = MultiTaskSampler(tasks, balance=True, seed=0)
    c = _counts(bal)
    assert all(abs(c[t] / 3000 - 1 / 3) < 0.04 for t in tasks), c
    nat = MultiTaskSampler(tasks, balance=False, seed=0)
    c = _counts(nat)
    for t, n in (("counterfact", 1000), ("wikirecent", 100), ("convsent", 400)):
        assert abs(c[t] / 3000 - n / 1500) < 0.04, c
    w = MultiTaskSampler(tasks, balance=True, task_weights={"counterfact": 2, "wikirecent": 1, "convsent": 1}, seed=0)
    assert w.proportions()["counterfact"] == pytest.approx(0.5)


def test_draws_are_seeded_pure_functions_of_step():
    tasks = {"counterfact": _task("counterfact", 50), "convsent": _task("convsent", 50)}
    a, b = MultiTaskSampler(tasks, seed=3), MultiTaskSampler(tasks, seed=3)
    assert [(r.prompt, i) for r, i in a.draw(17, 4)] == [(r.prompt, i) for r, i in b.draw(17, 4)]
    assert [r.prompt for r, _ in a.draw(17, 4)] != [r.prompt for r, _ in MultiTaskSampler(tasks, seed=4).draw(17, 4)]
    with pytest.raises(ValueError, match=r"unknown task"):
        MultiTaskSampler(tasks, task_weights={"zsre": 1.0})
    with pytest.raises(ValueError, match=r"task 'wikirecent' has no training records"):
        MultiTaskSampler({"counterfact": _task("counterfact", 5), "wikirecent": []})


def test_missing_fields_are_named():
    cf = {"prompt": "p", "target_new": "t", "rephrase_prompt": "r", "locality_prompt": "l",
          "locality_ground_truth": "g"}
    bad = dict(cf)
    del bad["rephrase_prompt"]
    with pytest.raises(RecordFormatError, match=r"record 1: missing field 'rephrase_prompt'"):
        parse_counterfact([cf, bad], "cf.json")
    with pytest.raises(RecordFormatError, match=r"missing field 'neg'"):
        parse_convsent([{"ent": "X", "pos": ["good"]}], "c.json")
    with pytest.raises(RecordFormatError, match=r"missing field 'alt'"):
        parse_zsre([{"src": "q", "rephrase": "r", "loc": "l", "loc_ans": "a"}], "z.json")
    with pytest.raises(RecordFormatError, match=r"missing field 'locality'"):
        parse_wikirecent([{"prompt": "p", "target_new": "t"}], "r.json")
    with pytest.raises(RecordFormatError, match=r"field 'target_new' is empty"):
        parse_wikirecent([{"prompt": "p", "target_new": "", "locality": {}}], "r.json")


def test_convsent_records():
    raw = [{"ent": "A", "pos": ["a+1", "a+2"], "neg": ["a-1"]}, {"ent": "B", "pos": ["b+"], "neg": ["b-1", "b-2"]}]
    recs = parse_convsent(raw, seed=0)
    for r in recs:
        assert r.label in ("positive", "negative") and r.target_new == r.responses[0]
        assert r.prompt == f"What do you think of {r.subject}?"
    assert recs[0].other_topic == "B" and recs[0].locality_prompt == "What do you think of B?"


def test_training_hparams_reject_held_out_task():
    base = dict(model_name="m", inner_params=["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(HyperParamsError, match=r"held-out"):
        InstructEditTrainingHyperParams.from_dict(dict(base, tasks=["counterfact", "zsre"]))
    with pytest.raises(HyperParamsError, match=r"tasks must be"):
        InstructEditTrainingHyperParams.from_dict(dict(base, tasks=["medicine"]))


def test_shared_splits(shared_data):
    assert len(load_split("counterfact", "test")) == 1919
    tr, te = load_split("wikirecent", "train"), load_split("wikirecent", "test")
    assert len(tr) == 470 and len(te) == 100 and not {r.index for r in tr} & {r.index for r in te}
    assert len(load_split("convsent", "train")) == 799 and len(load_split("convsent", "test")) == 800
    z = load_split("zsre", "test")
    assert len(z) == 722 and all(r.portability for r in z[:20])
    with pytest.raises(ValueError, match=r"held out"):
        load_split("zsre", "train")
