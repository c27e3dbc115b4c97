"""Retrieval hits and recall: when does a retrieved chunk count as the evidence for a question?

Strict (the reported `retrieval` metrics): the most specific evidence the question carries
decides, one rule per question:

| rule     | the question has             | a chunk is a hit when                                     |
| span     | doc_id and the evidence span | same document and its character range overlaps the span  |
| document | doc_id only                  | same document and it holds a gold answer as whole tokens  |
| answer   | neither                      | it holds a gold answer of >= 2 tokens as whole tokens     |
| none     | neither, one-token answers   | never: a one-token answer ("None", "10") is in too many chunks to prove anything |

Lenient (`retrieval_lenient`, the rule before this module): a gold answer anywhere in the chunk
as a substring ("None" in "Nonetheless"), or a chunk that contains the whole span. It rewards
a chunk of the wrong document that happens to hold the answer string.

Answers are compared on SQuAD-normalised text (eval.metrics.normalize_answer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Literal, Protocol

from eval.metrics import normalize_answer, words_in

Rule = Literal["span", "document", "answer", "none"]
MIN_ANSWER_TOKENS = 2  # without a document, a one-token answer matches by chance too often


class Judged(Protocol):
    """What a hit needs of a question (eval.questions.Question has it)."""

    @property
    def answers(self) -> tuple[str, ...]: ...
    @property
    def doc_id(self) -> str | None: ...
    @property
    def span(self) -> tuple[int, int] | None: ...


class Passage(Protocol):
    """What a hit needs of a chunk (eval.rag.Chunk has it): offsets are characters, end exclusive."""

    @property
    def doc_id(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def text(self) -> str: ...


def rule_of(q: Judged) -> Rule:
    """The strict rule that judges `q` (see the module's table)."""
    if q.doc_id and q.span:
        return "span"
    if q.doc_id:
        return "document"
    if any(len(normalize_answer(a).split()) >= MIN_ANSWER_TOKENS for a in q.answers):
        return "answer"
    return "none"


def _holds_answer(q: Judged, chunk: Passage, min_tokens: int = 1) -> bool:
    text = normalize_answer(chunk.text)
    golds = (normalize_answer(a) for a in q.answers)
    return any(len(g.split()) >= min_tokens and words_in(g, text) for g in golds)


def strict_hit(q: Judged, chunk: Passage) -> bool:
    """The chunk is the question's evidence by the most specific rule the question allows."""
    rule = rule_of(q)
    if rule == "span":
        start, end = q.span  # type: ignore[misc]  # rule "span" means a span is there
        return chunk.doc_id == q.doc_id and chunk.start < end and start < chunk.end
    if rule == "document":
        return chunk.doc_id == q.doc_id and _holds_answer(q, chunk)
    if rule == "answer":
        return _holds_answer(q, chunk, MIN_ANSWER_TOKENS)
    return False


def lenient_hit(q: Judged, chunk: Passage) -> bool:
    """The old rule: a gold answer as a substring anywhere, or the whole span inside the chunk."""
    text = normalize_answer(chunk.text)
    if any(normalize_answer(a) and normalize_answer(a) in text for a in q.answers):
        return True
    return bool(q.doc_id == chunk.doc_id and q.span and chunk.start <= q.span[0] and q.span[1] <= chunk.end)


def first_hit(q: Judged, ids: Sequence[int], chunks: Sequence[Passage],
              hit: Callable[[Judged, Passage], bool] = strict_hit) -> int | None:
    """Rank (from 1) of the first retrieved chunk that is a hit, None when none is."""
    return next((rank for rank, c in enumerate(ids, start=1) if hit(q, chunks[c])), None)


@dataclass(frozen=True)
class Recall:
    """Shares of questions with a hit among their first n retrieved chunks (0..1)."""

    strict: dict[str, float]
    lenient: dict[str, float]
    rules: dict[str, int]  # questions judged by each strict rule


def _shares(ranks: Sequence[int | None], depths: Sequence[int], seen: Sequence[int] | None) -> dict[str, float]:
    found = lambda n, r: r is not None and r <= n
    out = {f"recall@{n}": mean(found(n, r) for r in ranks) if ranks else 0.0 for n in depths}
    if seen is not None:
        out["recall@seen"] = mean(found(n, r) for n, r in zip(seen, ranks)) if ranks else 0.0
    return out


def recall(questions: Sequence[Judged], retrieved: Sequence[Sequence[int]], chunks: Sequence[Passage], k: int,
           seen: Sequence[int] | None = None) -> Recall:
    """recall@1, @5 and @k, strict and lenient; with `seen` (passages each question's prompt
    kept after fitting), also recall@seen: was the evidence among what the generator read?"""
    if seen is not None and len(seen) != len(questions):
        raise ValueError(f"seen has {len(seen)} entries for {len(questions)} questions")
    depths = sorted({1, 5, k})
    strict = [first_hit(q, ids, chunks) for q, ids in zip(questions, retrieved)]
    lenient = [first_hit(q, ids, chunks, lenient_hit) for q, ids in zip(questions, retrieved)]
    return Recall(_shares(strict, depths, seen), _shares(lenient, depths, seen),
                  dict(Counter(rule_of(q) for q in questions)))
