"""Metrics against hand-computed cases (intervals and tests: test_stats.py)."""

import pytest

from eval.metrics import contains, exact_match, normalize_answer, rouge_l, token_f1


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
