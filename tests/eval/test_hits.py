"""Strict and lenient retrieval hits, and recall at 1, 5, k and the depth the generator saw."""

import pytest

from eval.hits import lenient_hit, recall, rule_of, strict_hit
from eval.questions import Question
from eval.rag import Chunk

TEXT = "The queue module. Nonetheless, get() returns None when empty. It holds 10 items."


def chunk(cid: int, doc: str, start: int, end: int, text: str | None = None) -> Chunk:
    return Chunk(cid, doc, start, end, TEXT[start:end] if text is None else text)


def test_rules_follow_the_evidence_the_question_carries():
    assert rule_of(Question("a", "q", ("x",), "d", (0, 5))) == "span"
    assert rule_of(Question("b", "q", ("x",), "d")) == "document"
    assert rule_of(Question("c", "q", ("two tokens",))) == "answer"
    assert rule_of(Question("d", "q", ("None",))) == "none"
    assert rule_of(Question("e", "q", ("x",), None, (0, 5))) == "none"  # a span means nothing without its document


def test_span_overlap_is_a_hit_and_touching_is_not():
    q = Question("q", "What does get() return?", ("None",), "d", (30, 60))
    assert strict_hit(q, chunk(0, "d", 25, 35))  # overlaps the span's start
    assert strict_hit(q, chunk(1, "d", 55, 70))  # overlaps its end
    assert not strict_hit(q, chunk(2, "d", 0, 30))  # ends where the span starts: end is exclusive
    assert not strict_hit(q, chunk(3, "d", 60, 80))
    assert not strict_hit(q, chunk(4, "other", 30, 60))  # same offsets, another document


def test_answer_in_the_wrong_document_is_lenient_only():
    q = Question("q", "What does get() return?", ("returns None",), "d")
    wrong = chunk(0, "other", 0, len(TEXT))
    assert lenient_hit(q, wrong) and not strict_hit(q, wrong)
    assert strict_hit(q, chunk(1, "d", 0, len(TEXT)))


def test_span_known_the_answer_string_elsewhere_in_the_document_is_not_a_hit():
    q = Question("q", "How many items?", ("10 items",), "d", (62, 80))
    assert not strict_hit(q, chunk(0, "d", 0, 40, "it holds 10 items"))
    assert lenient_hit(q, chunk(0, "d", 0, 40, "it holds 10 items"))


@pytest.mark.parametrize("answer, text, strict, lenient", [
    ("None", "Nonetheless, it works.", False, True),  # substring, not a word
    ("1", "It holds 10 items.", False, True),
    ("None", "get() returns None.", True, True),
    ("the queue", "A Queue!", True, True),  # SQuAD normalisation: case, punctuation, articles
])
def test_document_rule_matches_whole_words(answer, text, strict, lenient):
    q = Question("q", "?", (answer,), "d")
    c = Chunk(0, "d", 0, len(text), text)
    assert (strict_hit(q, c), lenient_hit(q, c)) == (strict, lenient)


def test_without_a_document_only_answers_of_two_tokens_count():
    c = Chunk(0, "any", 0, len(TEXT), TEXT)
    assert strict_hit(Question("q", "?", ("returns None",)), c)
    assert not strict_hit(Question("q", "?", ("None",)), c)  # one token: in too many chunks to prove anything
    assert not strict_hit(Question("q", "?", ("returns Nonetheless",)), c)


def test_recall_strict_lenient_and_at_the_depth_seen():
    docs = [chunk(0, "d", 0, 17), chunk(1, "other", 0, len(TEXT)), chunk(2, "d", 18, 60)]
    q1 = Question("1", "?", ("None",), "d", (30, 40))  # evidence in chunk 2 only
    q2 = Question("2", "?", ("queue module",), "d", (4, 16))  # evidence in chunk 0
    retrieved = [[1, 2, 0], [0, 1, 2]]
    r = recall([q1, q2], retrieved, docs, k=3, seen=[1, 3])
    assert r.strict == {"recall@1": 0.5, "recall@3": 1.0, "recall@5": 1.0, "recall@seen": 0.5}
    assert r.lenient["recall@1"] == 1.0  # chunk 1 (another document) holds "None": lenient counts it
    assert r.rules == {"span": 2}


def test_recall_refuses_a_seen_list_of_another_length():
    with pytest.raises(ValueError, match="seen"):
        recall([Question("1", "?", ("a b",))], [[0]], [chunk(0, "d", 0, 5)], 1, seen=[1, 2])
