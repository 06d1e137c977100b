"""The evaluator's summaries on a fake LM: locality against the unedited model, Distract-Neighbor, MQuAKE."""
from __future__ import annotations

import pytest

from easyedit_agrade.evaluate.records import DISTRACT_NEIGHBOR, NEIGHBORHOOD, parse_records
from easyedit_agrade.evaluate.suite import Evaluator, distract_prompt

from evaluate_samples import CF, KE, MQ, ZSRE


def _records():
    return parse_records([ZSRE, CF, KE, MQ], source="t")


def test_distract_prompt():
    (z, c, *_), _ = _records()
    assert distract_prompt(c, c.locality[NEIGHBORHOOD][0]) == (
        "The mother tongue of Danielle Darrieux is English. Michel Rocard is a native speaker of")
    assert distract_prompt(z, z.locality[NEIGHBORHOOD][0]).startswith(
        "What artist created Call the Doctor? The X-Files. nq question:")


def test_unedited_model_has_perfect_locality_and_structure(tokenizer, constant_lm):
    recs, cases = _records()
    ev = Evaluator(tokenizer)
    lm = constant_lm(favourite=tokenizer(" the", add_special_tokens=False)["input_ids"][0])
    pre = ev.score(lm, recs, cases)
    s = ev.summarize(recs, cases, pre, pre)
    assert s["LS"] == 1.0 and all(v["acc"] == 1.0 for v in s["locality"].values())
    assert set(s["locality"]) == {NEIGHBORHOOD, DISTRACT_NEIGHBOR, "Other-Attribution"}
    assert set(s["portability"]) == {"One-Hop", "Reasoning"}
    assert s["n"] == {"ES": 5, "GS": 3, "LS": 2}
    assert s["Score"] == pytest.approx(0.0) or s["Score"] is not None
    assert s["mquake"]["n_cases"] == 1 and s["mquake"]["n_edits"] == 2
    per = ev.per_record(recs, pre, pre)
    assert per[0]["post"]["locality"] == {f"{NEIGHBORHOOD}_acc": [1.0], f"{DISTRACT_NEIGHBOR}_acc": [1.0]}
    assert "rewrite_acc" in per[0]["pre"] and f"{NEIGHBORHOOD}_output" in per[0]["pre"]["locality"]


def test_edited_state_changes_locality_and_mquake(tokenizer, constant_lm):
    tok = tokenizer
    recs, cases = _records()
    ev = Evaluator(tok)
    uk = tok(" United", add_special_tokens=False)["input_ids"][0]
    pre = ev.score(constant_lm(favourite=0), recs, cases)
    post = ev.score(constant_lm(favourite=uk), recs, cases)
    s = ev.summarize(recs, cases, post, pre)
    assert s["LS"] == 0.0 and s["Score"] == 0.0  # every locality token changed; harmonic mean is 0, not an error
    # "United Kingdom" is 2 tokens: predicting " United" everywhere gets the first right, the second wrong
    mq = [r for r in recs if r.family == "mquake"]
    assert post[(mq[0].uid, "rewrite", "", 0, 0)].acc == pytest.approx(0.5)
    assert s["mquake"]["edit_wise"] == 0.0 and s["mquake"]["multi_hop"] == 0.0
    assert s["easyedit"]["locality"][f"{NEIGHBORHOOD}_acc"] == 0.0


def test_exact_match_with_aliases(tokenizer, constant_lm):
    """A hop is recalled when any alias matches exactly: the one-token alias " UK" does under a model predicting it."""
    tok = tokenizer
    uk = tok(" UK", add_special_tokens=False)["input_ids"]
    assert len(uk) == 1
    recs, cases = _records()
    ev = Evaluator(tok)
    post = ev.score(constant_lm(favourite=uk[0]), recs, cases)
    hop0 = [post[(cases[0].uid, "mq_hop", "", 0, a)].exact for a in range(2)]
    assert hop0 == [False, True]
    s = ev.summarize(recs, cases, post, post)
    assert s["mquake"]["instance_wise"] == 0.0  # the second hop (Mnangagwa) is not recalled
