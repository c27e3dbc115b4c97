"""Leakage between the train pairs and the eval questions: decontamination and the counts the
report gives.

Three keys say that a train pair gives an eval question away:

    question  the same question after normalisation (lower case, no punctuation)
    answer    the same answer after SQuAD normalisation (the scorer's), under any question
    span      evidence overlapping the eval question's in the same document

`qa.decontaminate` removes train pairs that match an eval question on any chosen key. What
remains shared is counted per eval question: its document is read by train pairs (always, with
split_by: question), its span overlaps a train pair's, its answer is a train pair's answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eval.metrics import normalize_answer
from tasks.qagen.common import normalize_question

KEYS = ("question", "answer", "span")


def overlaps(a: Sequence[int] | None, b: Sequence[int] | None) -> bool:
    """True when two [start, end) character spans share a character."""
    return a is not None and b is not None and max(a[0], b[0]) < min(a[1], b[1])


@dataclass
class PairIndex:
    """Questions, answers, spans and documents of a set of pairs, for matching others against."""

    questions: set[str] = field(default_factory=set)
    answers: set[str] = field(default_factory=set)
    spans: dict[str, list[Sequence[int]]] = field(default_factory=lambda: defaultdict(list))
    documents: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, rows: Iterable[dict[str, Any]]) -> PairIndex:
        index = cls()
        for row in rows:
            index.questions.add(normalize_question(row["question"]))
            for answer in row.get("answers") or [row["answer"]]:
                if normalize_answer(answer):
                    index.answers.add(normalize_answer(answer))
            if row.get("doc_id") is not None:
                index.documents.add(str(row["doc_id"]))
                if row.get("span"):
                    index.spans[str(row["doc_id"])].append(row["span"])
        return index

    def match(self, question: str, answer: str, doc_id: str | None, span: Sequence[int] | None,
              keys: Sequence[str] = KEYS) -> str | None:
        """The first key (of `keys`) on which a pair matches this index, or None."""
        if "question" in keys and normalize_question(question) in self.questions:
            return "question"
        if "answer" in keys and normalize_answer(answer) and normalize_answer(answer) in self.answers:
            return "answer"
        if "span" in keys and doc_id is not None and any(overlaps(span, s) for s in self.spans.get(str(doc_id), ())):
            return "span"
        return None


def shared_counts(eval_rows: Sequence[dict[str, Any]], train_rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many eval questions share something with the train pairs: their document, an
    overlapping evidence span, or a normalised answer."""
    train = PairIndex.of(train_rows)
    counts = {"eval_questions": len(eval_rows), "sharing_document": 0, "sharing_span": 0, "sharing_answer": 0}
    for row in eval_rows:
        doc = str(row["doc_id"]) if row.get("doc_id") is not None else None
        counts["sharing_document"] += doc in train.documents
        counts["sharing_span"] += doc is not None and any(overlaps(row.get("span"), s) for s in train.spans.get(doc, ()))
        counts["sharing_answer"] += any(normalize_answer(a) in train.answers
                                        for a in row.get("answers") or [row["answer"]] if normalize_answer(a))
    return counts
