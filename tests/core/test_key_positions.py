"""``key_positions: target+subject``: the subject's last token is found from character offsets (padding and
truncation respected) and the micro-batches' key mask is the predict positions plus it. The cached rows there
are checked against autograd in ``test_core_cache.py``; AGRADE's use of them in ``tests/agrade``."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.core.editor_base import encode_micro_batches
from easyedit_agrade.core.tokenize import encode_prompt_target

from tests.agrade.agrade_helpers import tok  # noqa: F401 (fixture)

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Danielle Darrieux, a native speaker of",
           "The official religion of Edwin of Northumbria is"]
SUBJECTS = ["Danielle Darrieux", "Danielle Darrieux", "Edwin of Northumbria"]
TARGETS = ["English", "Russian", "Islam"]


def _subject_token_text(tok, batch, b):
    (pos,) = batch.subject_mask[b].nonzero()[:, 0].tolist()
    return pos, tok.decode(batch.input_ids[b, : pos + 1])


@pytest.mark.parametrize("side", ["right", "left"])
def test_subject_mask_marks_the_last_subject_token(tok, side):
    batch = encode_prompt_target(tok, PROMPTS, TARGETS, padding_side=side, subjects=SUBJECTS)
    for b, (prompt, subject) in enumerate(zip(PROMPTS, SUBJECTS)):
        pos, upto = _subject_token_text(tok, batch, b)
        # the text up to and including the marked token ends exactly where the subject ends in the prompt
        end = prompt.find(subject) + len(subject)
        assert upto.strip().endswith(prompt[:end].strip()[-6:]), (upto, prompt[:end])
        assert not batch.target_mask[b, pos] and batch.attention_mask[b, pos] == 1
    assert batch.subject_mask.sum() == len(PROMPTS)


def test_subject_absent_none_or_truncated_gives_no_subject_token(tok):
    batch = encode_prompt_target(tok, PROMPTS, TARGETS, subjects=["Nobody Here", None, SUBJECTS[2]])
    assert batch.subject_mask[:2].sum() == 0 and batch.subject_mask[2].sum() == 1
    long_prompt = "Edwin of Northumbria " + "was a king who ruled a kingdom in the north " * 3 + "and his religion is"
    cut = encode_prompt_target(tok, [long_prompt], ["Islam"], max_length=12, subjects=["Edwin of Northumbria"])
    assert cut.input_ids.shape[1] == 12 and cut.subject_mask.sum() == 0
    with pytest.raises(ValueError, match="2 subjects for 3 prompts"):
        encode_prompt_target(tok, PROMPTS, TARGETS, subjects=SUBJECTS[:2])


def test_micro_batches_key_mask_is_predict_plus_subject(tok):
    plain = encode_micro_batches(tok, PROMPTS, TARGETS, max_length=None, micro_batch=2)
    same = encode_micro_batches(tok, PROMPTS, TARGETS, max_length=None, micro_batch=2, subjects=SUBJECTS)
    assert all(mb.key_mask is None for mb in plain + same)  # subjects alone change nothing
    with_subj = encode_micro_batches(tok, PROMPTS, TARGETS, max_length=None, micro_batch=2, subjects=SUBJECTS,
                                     key_positions="target+subject")
    for mb, ref in zip(with_subj, plain):
        assert torch.equal(mb.input_ids, ref.input_ids) and torch.equal(mb.predict_mask, ref.predict_mask)
        extra = mb.key_mask & ~mb.predict_mask
        assert torch.equal(mb.key_mask & mb.predict_mask, mb.predict_mask)
        assert extra.sum(1).tolist() == [1] * mb.input_ids.shape[0]
    with pytest.raises(ValueError, match="key_positions"):
        encode_micro_batches(tok, PROMPTS, TARGETS, max_length=None, micro_batch=2, key_positions="subject")
