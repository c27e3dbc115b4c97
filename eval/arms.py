"""The evaluation arms: one interface, the same questions, prompt template and decoding.

| arm            | model                         | context                              |
| finetuned      | after dpo                     | none (closed book)                   |
| rag            | the model fine-tuning began from (pretrain) | top-k retrieved chunks |
| finetuned+rag  | after dpo                     | top-k retrieved chunks               |
| rag-extractive | none: the retrieved sentence closest to the question                 |
| gold           | after dpo                     | the question's source passage (upper bound) |

Retrieval happens once per question; its time is added to every arm that uses it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from eval.generate import generate
from eval.prompts import chat
from eval.questions import Question as EvalQuestion
from eval.rag import Chunk, embed

_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]|\n|$)")


@dataclass(frozen=True)
class Answer:
    """An arm's answer to one question."""

    text: str
    latency_s: float
    new_tokens: int = 0
    retrieved: tuple[int, ...] = ()


@dataclass
class Retrieval:
    """Top-k chunk ids per question, and the seconds each retrieval took."""

    ids: list[list[int]]
    latency_s: list[float] = field(default_factory=list)


def retrieve(embedder, index, questions: Sequence[EvalQuestion], k: int) -> Retrieval:
    """Embeds every question and searches the index (timed per question, amortised)."""
    start = time.perf_counter()
    vectors = embed(embedder, [q.question for q in questions])
    _, ids = index.search(vectors, k)
    per = (time.perf_counter() - start) / max(1, len(questions))
    return Retrieval([[int(i) for i in row if i >= 0] for row in ids], [per] * len(questions))


class GeneratorArm:
    """A chat model answering with the shared prompt template; `contexts` gives the passages."""

    def __init__(self, name: str, model, tokenizer, contexts: Callable[[int], list[str] | None],
                 retrieved: Callable[[int], tuple[tuple[int, ...], float]], max_new_tokens: int, batch_size: int):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.contexts, self.retrieved = contexts, retrieved
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def answer_many(self, questions: Sequence[EvalQuestion]) -> list[Answer]:
        conversations = [chat(q.question, self.contexts(i)) for i, q in enumerate(questions)]
        outs = generate(self.model, self.tokenizer, conversations, self.max_new_tokens, self.batch_size)
        answers = []
        for i, g in enumerate(outs):
            ids, retrieval_s = self.retrieved(i)
            answers.append(Answer(g.text, g.latency_s + retrieval_s, g.new_tokens, ids))
        return answers

    def answer(self, question: EvalQuestion) -> Answer:
        return self.answer_many([question])[0]


class ExtractiveArm:
    """No generator: the sentence of the retrieved chunks most similar to the question."""

    name = "rag-extractive"

    def __init__(self, embedder, chunks: Sequence[Chunk], retrieval: Retrieval, k: int):
        self.embedder, self.chunks, self.retrieval, self.k = embedder, chunks, retrieval, k

    def answer_many(self, questions: Sequence[EvalQuestion]) -> list[Answer]:
        return [self._answer(i, q) for i, q in enumerate(questions)]

    def _answer(self, i: int, q: EvalQuestion) -> Answer:
        start = time.perf_counter()
        ids = tuple(self.retrieval.ids[i][: self.k])
        sentences = [s.strip() for cid in ids for s in _SENTENCE.findall(self.chunks[cid].text) if len(s.strip()) > 2]
        if not sentences:
            return Answer("", self.retrieval.latency_s[i], 0, ids)
        vectors = embed(self.embedder, [q.question, *sentences])
        best = int(np.argmax(vectors[1:] @ vectors[0]))
        return Answer(sentences[best], time.perf_counter() - start + self.retrieval.latency_s[i], 0, ids)

    def answer(self, question: EvalQuestion) -> Answer:
        return self.answer_many([question])[0]


def source_passage(q: EvalQuestion, chunks_by_doc: dict[str, list[Chunk]]) -> Chunk | None:
    """The chunk that best covers the question's evidence (or its document's first chunk)."""
    chunks = chunks_by_doc.get(q.doc_id or "", [])
    if not chunks:
        return None
    if q.span is None:
        return chunks[0]
    start, end = q.span
    return max(chunks, key=lambda c: min(c.end, end) - max(c.start, start))


def is_hit(q: EvalQuestion, chunk: Chunk, normalize: Callable[[str], str]) -> bool:
    """A retrieved chunk counts when it holds a gold answer or is the question's source passage."""
    text = normalize(chunk.text)
    if any(normalize(a) and normalize(a) in text for a in q.answers):
        return True
    return bool(q.doc_id == chunk.doc_id and q.span and chunk.start <= q.span[0] and q.span[1] <= chunk.end)
