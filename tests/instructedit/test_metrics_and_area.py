"""Fluency (n-gram entropy) and the editing-area maths (Gram of low-rank directions, PCA from the Gram)."""
from __future__ import annotations

import math

import pytest
import torch

from easyedit_agrade.tools.instructedit_editing_area import gram_of_directions, pca_from_gram
from easyedit_agrade.models.instructedit.instructedit_eval import fluency


def test_fluency_is_eq8_on_whitespace_words():
    assert fluency("a a a a a a") == 0.0  # one repeated bigram and trigram
    # 4 distinct bigrams, 3 distinct trigrams, all equally frequent
    assert fluency("a b c d e") == pytest.approx((2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)
    assert fluency("") == 0.0
    # whitespace words: "a," and "a" are different words (NLTK's tokenizer would split the comma off)
    assert fluency("a, a, a") == pytest.approx(2 / 3 * 1.0 / 2)


def test_gram_and_pca_match_flattened_directions():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(n, 7, generator=g), torch.randn(n, 5, generator=g)) for n in (1, 3, 2, 4, 2)]
    flat = torch.stack([(u.T @ d).flatten().double() for u, d in factors])
    flat = flat / flat.norm(dim=1, keepdim=True)
    K = gram_of_directions(factors)
    assert torch.allclose(K, flat @ flat.T, atol=1e-10)
    pcs = pca_from_gram(K, k=3)
    centred = flat - flat.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    ref = u[:, :3] * s[:3]
    for j in range(3):  # equal up to the sign of each component
        assert torch.allclose(pcs[:, j].abs(), ref[:, j].abs(), atol=1e-8)
