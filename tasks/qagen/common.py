"""What every Q&A generator produces, and the checks every pair goes through."""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from dataclasses import dataclass

from eval.metrics import normalize_answer


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
    if not normalize_answer(answer):  # "The", "a": nothing left for the scorer to match
        return "answer_normalises_empty"
    return None


_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def split_chunks(text: str, chunk_chars: int) -> list[str]:
    """Pieces of `text` of at most `chunk_chars` characters, cut between paragraphs when one
    fits, else at a space, else anywhere. Every chunk is a slice of `text`, so an answer copied
    verbatim from a chunk is verbatim in the document too."""
    bounds, pos = [], 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        bounds.append((pos, m.start()))
        pos = m.end()
    bounds.append((pos, len(text)))
    pieces = [p for a, b in bounds for p in _cut(text, a, b, chunk_chars) if text[p[0]:p[1]].strip()]
    chunks: list[str] = []
    start = end = -1
    for a, b in pieces:
        if start >= 0 and b - start <= chunk_chars:
            end = b  # the next paragraph still fits: same chunk
            continue
        if start >= 0:
            chunks.append(text[start:end].strip())
        start, end = a, b
    if start >= 0:
        chunks.append(text[start:end].strip())
    return chunks


def _cut(text: str, start: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
    """Splits text[start:end] into spans of at most `limit` characters, at whitespace."""
    while end - start > limit:
        window = text[start:start + limit + 1]
        cut = max(window.rfind(" "), window.rfind("\n"))
        cut = start + cut if cut > limit // 2 else start + limit  # no space late enough: hard cut
        yield start, cut
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if end > start:
        yield start, end
