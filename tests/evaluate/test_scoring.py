"""Teacher-forced scoring: hand-computed cases on a fake LM, multi-token targets, padding side, batching."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.core.tokenize import encode_prompt_target
from easyedit_agrade.evaluate.scoring import plan_batches, score_pairs


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_hand_computed_accuracy_with_multi_token_targets(tokenizer, constant_lm):
    tok = tokenizer
    paris = _ids(tok, " Paris")
    assert len(paris) == 1, "the test assumes ' Paris' is one token"
    london = _ids(tok, " London")
    lm = constant_lm(favourite=paris[0])  # always predicts " Paris"
    prompts = ["The capital of France is", "Two capitals:", "Cities:"]
    targets = ["Paris", "Paris Paris London", "London"]
    s1, s2, s3 = score_pairs(lm, tok, prompts, targets)
    assert s1.target == paris and s1.pred == paris and s1.acc == 1.0 and s1.exact
    assert s2.target == paris + paris + london and s2.n_tokens == 3
    assert s2.acc == pytest.approx(2 / 3) and not s2.exact  # hand-computed: 2 of 3 target tokens
    assert s3.acc == 0.0 and not s3.exact
    assert s1.logprob < 0 and s2.logprob < s1.logprob


def test_one_forward_per_batch(tokenizer, constant_lm):
    lm = constant_lm(favourite=0)
    prompts = [f"Question number {i} is" for i in range(10)]
    targets = ["an answer"] * 10
    score_pairs(lm, tokenizer, prompts, targets, batch_tokens=10_000)
    assert lm.calls == 1
    lm.calls = 0
    score_pairs(lm, tokenizer, prompts, targets, batch_tokens=1)
    assert lm.calls == 10


def test_plan_batches_respects_budget():
    lengths = [5, 50, 6, 7, 49, 5]
    batches = plan_batches(lengths, batch_tokens=100, max_batch=64)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 100
    assert plan_batches([3] * 10, batch_tokens=1000, max_batch=4)[0] == [0, 1, 2, 3]


PAIRS = [
    ("The capital of France is", "Paris"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("nq question: who sang nice day for a white wedding", "Billy Idol"),
    ("What is the chemical symbol for gold? Answer:", "Au, which comes from the Latin aurum"),
]


@pytest.mark.slow
def test_left_and_right_padding_agree_and_match_unbatched(embedded_model):
    model, tok = embedded_model
    prompts, targets = zip(*PAIRS)
    left = score_pairs(model, tok, prompts, targets, padding_side="left")
    right = score_pairs(model, tok, prompts, targets, padding_side="right")
    alone = [score_pairs(model, tok, [p], [t])[0] for p, t in PAIRS]
    for a, b, c in zip(left, right, alone):
        assert a.target == b.target == c.target
        assert a.pred == b.pred == c.pred
        assert a.acc == b.acc == c.acc
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3) and a.logprob == pytest.approx(c.logprob, abs=1e-3)
    assert any(s.n_tokens > 3 for s in left)
    # and they agree with a plain, unpadded forward pass of the same tokens
    for (p, t), s in zip(PAIRS, left):
        batch = encode_prompt_target(tok, [p], [t])
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids).logits[0]
        mask = batch.predict_mask[0]
        assert logits.argmax(-1)[mask].tolist() == s.pred
        assert batch.shifted_labels[0][mask].tolist() == s.target
