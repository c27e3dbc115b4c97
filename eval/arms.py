"""The evaluation arms: what each one is (one registry), and the two ways they answer.

The same questions, prompt template, greedy decoding and scorer for every arm. The 2x2 is
generator x retrieval; the references sit beside it and never win:

| arm            | generator                 | context                        | role      |
| finetuned      | the fine-tuned model      | none (closed book)             | answer    |
| finetuned+rag  | the fine-tuned model      | the top-k retrieved passages   | answer    |
| rag            | the rag generator         | the top-k retrieved passages   | answer    |
| reader         | the rag generator         | none (closed book)             | control   |
| gold           | the rag generator         | the question's source passage  | reference |
| rag-extractive | none                      | the retrieved sentence closest to the question | reference |

The rag generator is `eval.rag_generator`: the reader stage's model (instruction-tuned only on
grounded examples, from the same checkpoint and recipe as the fine-tuned model), the
`pretrain.from` checkpoint, or a model folder. Retrieval happens once per question; its time
is added to every arm that uses it. Generator arms fit their prompts to the model's context
(eval.prompts.fit_message): the lowest-ranked passages are dropped first, and each Answer
says how many passages it kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from eval.embedding import Embedder
from eval.generate import generate, prompt_budget, prompt_token_counter
from eval.prompts import FittedMessage, as_chat, fit_message
from eval.questions import Question as EvalQuestion
from eval.rag import Chunk
from eval.retrieval import Retrieval
from eval.sentences import SentenceIndex, best_sentence


@dataclass(frozen=True)
class Arm:
    """What an arm is: who answers, with what context, and whether it can win the verdict."""

    name: str
    generator: Literal["finetuned", "rag"] | None  # None: no generator
    context: Literal["none", "retrieved", "source"]
    role: Literal["answer", "control", "reference"]  # only "answer" arms enter the verdict


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("finetuned", "finetuned", "none", "answer"),
    Arm("finetuned+rag", "finetuned", "retrieved", "answer"),
    Arm("rag", "rag", "retrieved", "answer"),
    Arm("reader", "rag", "none", "control"),
    Arm("gold", "rag", "source", "reference"),
    Arm("rag-extractive", None, "retrieved", "reference"),
)}
CONTEXTS = {"none": "none (closed book)", "retrieved": "the top-k retrieved passages",
            "source": "the question's source passage"}


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

    def answer_many(self, questions: Sequence[EvalQuestion], on_batch: Callable[[int], None] | None = None) -> list[Answer]:
        """Every question's answer, in order; `on_batch` hears how many are done (progress)."""
        fitted = self.fit(questions)
        conversations = [as_chat(f.text) for f in fitted]
        outs = generate(self.model, self.tokenizer, conversations, self.max_new_tokens, self.batch_size, on_batch)
        answers = []
        for i, (g, f) in enumerate(zip(outs, fitted)):
            ids, retrieval_s = self.retrieved(i)
            answers.append(Answer(g.text, g.latency_s + retrieval_s, g.new_tokens, ids, f.kept, f.dropped, f.first_cut))
        return answers

class ExtractiveArm:
    """No generator: the sentence of the retrieved chunks most similar to the question, by a dot
    product with sentence vectors embedded once (eval.sentences): at index time, or by eval for
    the chunks it retrieved. Nothing is embedded per question."""

    name = "rag-extractive"

    def __init__(self, embedder: Embedder, chunks: Sequence[Chunk], retrieval: Retrieval, k: int, sentences: SentenceIndex):
        self.embedder, self.chunks, self.retrieval, self.k = embedder, chunks, retrieval, k
        self.sentences = sentences

    def answer_many(self, questions: Sequence[EvalQuestion]) -> list[Answer]:
        start = time.perf_counter()
        vectors = self.retrieval.query_vectors
        if vectors is None:  # a BM25-only retrieval embedded no question: embed them once, here
            vectors = self.embedder.encode([q.question for q in questions])
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
