"""What every Q&A generator produces, and the checks every pair goes through."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    """One candidate question-answer pair with its provenance."""

    question: str
    answer: str
    doc_id: str
    span: tuple[int, int] | None  # [start, end) of the evidence in the document's text, when found
    generator: str  # "rule:<pattern>", "model" or "openai"


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_question(q: str) -> str:
    """Lower case, no punctuation, single spaces: two questions that differ only so are one."""
    return " ".join(q.lower().translate(_PUNCT).split())


def locate(answer: str, text: str) -> tuple[int, int] | None:
    """The first verbatim occurrence of `answer` in `text`, as character offsets."""
    start = text.find(answer)
    return None if start < 0 or not answer else (start, start + len(answer))


def reject_reason(pair: Pair, min_chars: int, max_chars: int) -> str | None:
    """Why a pair is not kept (None when it is): the quality filters of every generator."""
    answer = pair.answer.strip()
    if not pair.question.strip():
        return "empty_question"
    if not answer:
        return "empty_answer"
    if len(answer) < min_chars:
        return "answer_too_short"
    if len(answer) > max_chars:
        return "answer_too_long"
    if normalize_question(answer) and normalize_question(answer) in normalize_question(pair.question):
        return "answer_in_question"
    if re.fullmatch(r"[\W_]+", answer):
        return "answer_only_punctuation"
    return None
