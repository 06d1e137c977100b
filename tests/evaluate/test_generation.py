"""Generation-based metrics: known strings give known entropy / repetition / matches; batched greedy decoding equals
decoding each prompt alone."""
from __future__ import annotations

import math

import pytest

from easyedit_agrade.evaluate import generation as G


def test_ngram_entropy_of_known_strings():
    # 4 distinct words: 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit)
    h = G.ngram_entropy("a b c d")
    assert h == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    # a pure repetition has one bigram and one trigram: zero entropy
    assert G.ngram_entropy("India India India India India") == 0.0
    # "x y x y x": bigrams {xy:2, yx:2} -> 1 bit, trigrams {xyx:2, yxy:1} -> H(2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert G.ngram_entropy("x y x y x") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    assert G.ngram_entropy("") == 0.0 and G.ngram_entropy("one") == 0.0


def test_ngram_entropy_matches_easyedit_mean_of_weighted_entropies():
    # EasyEdit/ROME: np.mean([w_n * H_n]) with weights 2/3, 4/3 — the same number as Σ w H / Σ w
    text = "the cat sat on the mat and the cat ran"
    toks = G.words(text)
    hs = []
    for n in (2, 3):
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        freqs = [grams.count(g) / len(grams) for g in set(grams)]
        hs.append(-sum(f * math.log2(f) for f in freqs))
    assert G.ngram_entropy(text) == pytest.approx((2 / 3 * hs[0] + 4 / 3 * hs[1]) / 2)


def test_words_split_punctuation_like_word_tokenize():
    assert G.words("India, India, India.") == ["India", ",", "India", ",", "India", "."]
    # whitespace tokens (InstructEdit's eq 8) can be passed explicitly
    assert G.ngram_entropy("a, a, a,", tokens="a, a, a,".split()) == 0.0
    assert G.ngram_entropy("a, a, a", tokens="a, a, a".split()) == pytest.approx(1 / 3)  # bigrams {a, a,} {a, a}


def test_repetition_rate():
    assert G.repetition_rate("the capital of France is Paris") == 0.0
    # "India , India , India , India ," -> 8 bigrams, 2 distinct
    assert G.repetition_rate("India, India, India, India,") == pytest.approx(1 - 2 / 7)
    assert G.repetition_rate("one") == 0.0


def test_exact_and_prefix_match():
    assert G.exact_match(" Rome.\nThe city is", "Rome")
    assert G.exact_match("the Beatles", "Beatles")  # articles and case are normalised away
    assert not G.exact_match("Rome is the capital", "Rome")
    assert G.prefix_match("Rome is the capital", "Rome")
    assert not G.prefix_match("Romeo and Juliet", "Rome")  # word boundary
    assert not G.prefix_match("Paris", "Rome")
    assert G.exact_match("J. K. Rowling. She wrote", "J. K. Rowling")
    assert not G.exact_match("", "")


def test_token_accuracy_and_summary():
    assert G.token_accuracy([5, 6, 7], [5, 9, 7]) == pytest.approx(2 / 3)
    assert G.token_accuracy([5], [5, 6]) == 0.5  # a short generation misses the rest
    assert math.isnan(G.token_accuracy([1], []))
    rows = [{"exact": 1.0, "repetition": 0.0}, {"exact": 0.0, "repetition": 0.8}, {"exact": float("nan"),
                                                                                    "repetition": 0.6}]
    s = G.summarize(rows)
    assert s["n"] == 3 and s["exact"] == 0.5 and s["degenerate"] == pytest.approx(2 / 3)


def test_bad_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.greedy_generate(None, None, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_prompts"):
        G.greedy_generate(None, None, ["x", "y"], max_prompts=1)
    with pytest.raises(ValueError, match="ns"):
        G.ngram_entropy("a b", ns=(2,), weights=())


def test_batched_greedy_equals_one_by_one(embedded_model):
    model, tok = embedded_model
    prompts = ["The capital of France is", "The Eiffel Tower is located in the city of", "Water is made of",
               "Paris is"]
    side = tok.padding_side
    batched = G.greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert tok.padding_side == side  # restored
    alone = [G.greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert all(g.prompt == p for g, p in zip(batched, prompts))
    out = G.generation_metrics(model, tok, {"rewrite": [("The capital of France is", "Paris")]}, max_new_tokens=6,
                               keep_texts=1)
    assert set(out["rewrite"]) >= {"exact", "prefix", "token_acc", "entropy", "repetition", "degenerate", "n"}
    assert out["rewrite"]["prefix"] == float(G.prefix_match(out["examples"]["rewrite"][0]["generation"], "Paris"))
