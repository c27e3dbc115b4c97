"""Metrics against hand-computed cases; intervals and paired tests on data with a known answer."""

import numpy as np
import pytest

from eval.metrics import contains, empty_golds, exact_match, normalize_answer, rouge_l, token_f1, words_in
from eval.stats import bootstrap_ci, mcnemar, paired_bootstrap


def test_normalisation_is_squads():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"


@pytest.mark.parametrize("pred, golds, em, f1", [
    ("the cat sat", ["cat sat"], 1.0, 1.0),
    ("cat", ["cat sat"], 0.0, 2 * (1 * 0.5) / 1.5),          # p=1, r=1/2 -> 2/3
    ("cat sat on mat", ["cat sat"], 0.0, 2 * 0.5 * 1 / 1.5),  # p=1/2, r=1 -> 2/3
    ("dog", ["cat sat"], 0.0, 0.0),
    ("dog", ["cat", "dog"], 1.0, 1.0),                        # best gold counts
    ("", ["cat"], 0.0, 0.0),
])
def test_exact_match_and_f1(pred, golds, em, f1):
    assert exact_match(pred, golds) == em
    assert token_f1(pred, golds) == pytest.approx(f1)


def test_rouge_l_and_contains():
    # LCS("a b c d", "a c d e") = "a c d" (3): p = 3/4, r = 3/4 -> 0.75 (no articles among these tokens)
    assert rouge_l("x b c d", "x c d e".split(" ") and ["x c d e"]) == pytest.approx(0.75)
    assert rouge_l("nothing here", ["cat"]) == 0.0
    assert contains("I think the answer is Paris, France.", ["paris"]) == 1.0
    assert contains("London", ["paris"]) == 0.0


@pytest.mark.parametrize("pred, golds, expected", [
    ("10", ["1"], 0.0),  # a digit inside a number is not the number
    ("It returns nonetheless.", ["None"], 0.0),  # a word inside a word is not the word
    ("It returns None.", ["none"], 1.0),
    ("Use queue.PriorityQueue().", ["queue.PriorityQueue()"], 1.0),  # both normalise to queuepriorityqueue
    ("Use queue.PriorityQueue().", ["PriorityQueue"], 0.0),  # punctuation is deleted, not spaced
    ("the answer is 1 0", ["1 0"], 1.0),  # several tokens, in order
    ("0 1", ["1 0"], 0.0),
    ("anything", ["The"], 0.0),  # a gold that normalises to nothing matches nothing
])
def test_contains_matches_whole_tokens(pred, golds, expected):
    assert contains(pred, golds) == expected


def test_words_in_is_token_aligned_at_both_ends():
    assert words_in("b c", "a b c d") and words_in("a", "a") and not words_in("b", "ab c")
    assert not words_in("", "a b")


def test_empty_golds_are_named():
    assert empty_golds(["The", "?!", "an", "None", "a b"]) == ["The", "?!", "an"]
    assert empty_golds(["Paris"]) == []


def test_bootstrap_ci_covers_the_true_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(0.6, 0.1, size=400)
    lo, hi = bootstrap_ci(x, resamples=2000, seed=0)
    assert lo < 0.6 < hi and hi - lo < 0.05


def test_paired_bootstrap_finds_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, size=300)
    better = paired_bootstrap(base + 0.1, base, seed=0)
    assert better.diff == pytest.approx(0.1) and better.p_value < 0.01 and better.ci[0] > 0
    noise = paired_bootstrap(base + rng.normal(0, 0.05, 300), base, seed=0)
    assert noise.p_value > 0.05 and noise.ci[0] < 0 < noise.ci[1]


def test_mcnemar_known_values():
    # 10 discordant pairs all favouring a: p = 2 * 0.5**10
    a = [True] * 10 + [True] * 20
    b = [False] * 10 + [True] * 20
    assert mcnemar(a, b) == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar([True, False], [True, False]) == 1.0
    assert mcnemar([True, False], [False, True]) == pytest.approx(1.0)
