"""Fitting prompts to a token budget: lowest-ranked passages go first, passage [1] and the
question always stay; generation refuses an over-long prompt instead of cutting its start."""

import pytest

from eval.prompts import INSTRUCTION, PromptTooLong, fit_message, user_message

QUESTION = "What does heappush do?"
PASSAGES = ["one " * 10, "two " * 10, "three " * 10]


def words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def header_and_question() -> int:
    return words(user_message(QUESTION, [""]))  # instruction, "[1]", "Question:" and the question


def test_everything_fits_nothing_changes():
    fitted = fit_message(QUESTION, PASSAGES, words, budget=1000)
    assert fitted.text == user_message(QUESTION, PASSAGES)
    assert (fitted.kept, fitted.dropped, fitted.first_cut) == (3, 0, False)
    assert fitted.tokens == words(fitted.text)


def test_lowest_ranked_passages_are_dropped_first():
    budget = header_and_question() + 1 + 20  # "[2]" and both first passages, not the third
    fitted = fit_message(QUESTION, PASSAGES, words, budget)
    assert (fitted.kept, fitted.dropped, fitted.first_cut) == (2, 1, False)
    assert fitted.text == user_message(QUESTION, PASSAGES[:2])
    assert "[1] one" in fitted.text and "[2] two" in fitted.text and "three" not in fitted.text
    assert fitted.tokens <= budget


def test_first_passage_too_long_loses_its_end_not_its_start():
    first = " ".join(f"w{i}" for i in range(50))
    budget = header_and_question() + 7
    fitted = fit_message(QUESTION, [first, "second passage"], words, budget)
    assert (fitted.kept, fitted.dropped, fitted.first_cut) == (1, 1, True)
    assert fitted.text.startswith(INSTRUCTION + "\n\n[1] w0 w1 w2 w3 w4 w5 w6\n\n")
    assert "w7" not in fitted.text and "second" not in fitted.text
    assert fitted.text.endswith("Question: " + QUESTION)
    assert fitted.tokens == budget


def test_closed_book_is_the_bare_question():
    fitted = fit_message(QUESTION, [], words, budget=10)
    assert (fitted.text, fitted.kept, fitted.dropped, fitted.first_cut) == (QUESTION, 0, 0, False)


def test_no_room_for_the_question_is_an_error_not_a_silent_cut():
    with pytest.raises(PromptTooLong, match="no room for passage"):
        fit_message(QUESTION, PASSAGES, words, budget=header_and_question() - 1)
    with pytest.raises(PromptTooLong, match="question alone"):
        fit_message(QUESTION, [], words, budget=2)


def test_a_count_that_is_not_monotone_still_gets_a_fitting_message():
    """BPE counts can shrink when a word is added (merges); the result must still fit."""
    first = " ".join(f"w{i}" for i in range(40))
    odd = lambda text: words(text) + (3 if words(text) % 2 else 0)
    budget = header_and_question() + 15
    fitted = fit_message(QUESTION, [first], odd, budget)
    assert fitted.first_cut and odd(fitted.text) <= budget and fitted.text.endswith(QUESTION)
