"""Fixtures for the evaluation tests: the embedded tokenizer and a tiny fake causal LM with known predictions."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


class ConstantLM(torch.nn.Module):
    """A "language model" that predicts token ``favourite`` at every position (or ``rule(prev_token)``)."""

    def __init__(self, vocab: int, favourite: int | None = None, rule=None):
        super().__init__()
        self.vocab, self.favourite, self.rule = vocab, favourite, rule
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=None, **kwargs):
        self.calls += 1
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.vocab)
        if self.rule is not None:
            nxt = self.rule(input_ids)
            logits.scatter_(-1, nxt.unsqueeze(-1), 10.0)
        else:
            logits[..., self.favourite] = 10.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    from easyedit_agrade.lm import load_tokenizer

    return load_tokenizer(embedded_model_dir)


@pytest.fixture()
def constant_lm(tokenizer):
    def make(favourite=None, rule=None):
        return ConstantLM(len(tokenizer), favourite, rule)

    return make
