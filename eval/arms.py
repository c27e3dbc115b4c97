"""The evaluation arms: one interface, the same questions, prompt template and decoding.

| arm            | model                         | context                              |
| finetuned      | after dpo                     | none (closed book)                   |
| rag            | the model fine-tuning began from (pretrain) | top-k retrieved chunks |
| finetuned+rag  | after dpo                     | top-k retrieved chunks               |
| rag-extractive | none: the retrieved sentence closest to the question                 |
| gold           | after dpo                     | the question's source passage (upper bound) |

Retrieval happens once per question; its time is added to every arm that uses it.
Generator arms fit their prompts to the model's context (eval.prompts.fit_message): the
lowest-ranked passages are dropped first, and each Answer says how many passages it kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from eval.generate import generate, prompt_budget, prompt_token_counter
from eval.prompts import FittedMessage, as_chat, fit_message
from eval.questions import Question as EvalQuestion
from eval.rag import Chunk, embed
from eval.retrieval import Retrieval, Retriever
from eval.sentences import SentenceIndex, best_sentence, sentence_texts


@dataclass(frozen=True)
class Answer:
    """An arm's answer to one question."""

    text: str
    latency_s: float
    new_tokens: int = 0
    retrieved: tuple[int, ...] = ()
    passages_kept: int = 0  # passages in the prompt after fitting: the depth the generator saw
    passages_dropped: int = 0  # lowest-ranked passages fitting left out
    first_cut: bool = False  # passage [1] lost its end to fit


def retrieve(embedder, index, questions: Sequence[EvalQuestion], k: int) -> Retrieval:
    """Dense retrieval (eval.retrieval.Retriever has the BM25 and hybrid modes too)."""
    retriever = Retriever("dense", dense_index=index, encode=lambda texts: embed(embedder, texts))
    return retriever.retrieve([q.question for q in questions], k)


class GeneratorArm:
    """A chat model answering with the shared prompt template; `contexts` gives the passages."""

    def __init__(self, name: str, model, tokenizer, contexts: Callable[[int], list[str] | None],
                 retrieved: Callable[[int], tuple[tuple[int, ...], float]], max_new_tokens: int, batch_size: int):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.contexts, self.retrieved = contexts, retrieved
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def fit(self, questions: Sequence[EvalQuestion]) -> list[FittedMessage]:
        """Every question's user message, fitted to the model's context minus max_new_tokens."""
        count = prompt_token_counter(self.tokenizer)
        budget = prompt_budget(self.model, self.max_new_tokens)
        return [fit_message(q.question, self.contexts(i) or [], count, budget) for i, q in enumerate(questions)]

    def answer_many(self, questions: Sequence[EvalQuestion]) -> list[Answer]:
        fitted = self.fit(questions)
        conversations = [as_chat(f.text) for f in fitted]
        outs = generate(self.model, self.tokenizer, conversations, self.max_new_tokens, self.batch_size)
        answers = []
        for i, (g, f) in enumerate(zip(outs, fitted)):
            ids, retrieval_s = self.retrieved(i)
            answers.append(Answer(g.text, g.latency_s + retrieval_s, g.new_tokens, ids, f.kept, f.dropped, f.first_cut))
        return answers

    def answer(self, question: EvalQuestion) -> Answer:
        return self.answer_many([question])[0]


class ExtractiveArm:
    """No generator: the sentence of the retrieved chunks most similar to the question.

    With `sentences` (eval.sentences, embedded once at index time) a question costs one dot
    product per candidate sentence; without, every question re-embeds its chunks' sentences
    (the old path, kept for indexes built before sentence embeddings were stored).
    """

    name = "rag-extractive"

    def __init__(self, embedder, chunks: Sequence[Chunk], retrieval: Retrieval, k: int,
                 sentences: SentenceIndex | None = None):
        self.embedder, self.chunks, self.retrieval, self.k = embedder, chunks, retrieval, k
        self.sentences = sentences

    def answer_many(self, questions: Sequence[EvalQuestion]) -> list[Answer]:
        if self.sentences is None:
            return [self._answer(i, q) for i, q in enumerate(questions)]
        return self._answer_precomputed(questions)

    def _answer(self, i: int, q: EvalQuestion) -> Answer:
        start = time.perf_counter()
        ids = tuple(self.retrieval.ids[i][: self.k])
        sentences = [s for cid in ids for s in sentence_texts(self.chunks[cid].text)]
        if not sentences:
            return Answer("", self.retrieval.latency_s[i], 0, ids, len(ids))
        vectors = embed(self.embedder, [q.question, *sentences])
        best = int(np.argmax(vectors[1:] @ vectors[0]))
        return Answer(sentences[best], time.perf_counter() - start + self.retrieval.latency_s[i], 0, ids, len(ids))

    def _answer_precomputed(self, questions: Sequence[EvalQuestion]) -> list[Answer]:
        start = time.perf_counter()
        vectors = self.retrieval.query_vectors
        if vectors is None:  # a BM25-only retrieval embedded no question: embed them once, here
            vectors = embed(self.embedder, [q.question for q in questions])
        shared = (time.perf_counter() - start) / max(1, len(questions))
        texts = [c.text for c in self.chunks]
        answers = []
        for i in range(len(questions)):
            start = time.perf_counter()
            ids = tuple(self.retrieval.ids[i][: self.k])
            row = best_sentence(self.sentences, vectors[i], ids)
            text = "" if row is None else self.sentences.text(row, texts)
            answers.append(Answer(text, shared + time.perf_counter() - start + self.retrieval.latency_s[i], 0, ids,
                                  len(ids)))
        return answers

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

