"""Metrics against hand-computed cases (intervals and tests: test_stats.py)."""

import pytest

from eval.metrics import contains, empty_golds, exact_match, normalize_answer, rouge_l, token_f1, words_in


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

