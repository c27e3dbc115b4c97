"""The RAG baseline's retrievers: dense (FAISS), sparse (BM25) and their reciprocal-rank fusion.

Dense embeddings (MiniLM) match paraphrases but blur identifiers: `queue.PriorityQueue()` and
`heapq.heappush()` land close together. BM25 (Robertson and Zaragoza 2009) matches identifiers
exactly but misses paraphrases. Hybrid retrieval fuses the two rankings by reciprocal-rank
fusion (RRF, Cormack, Clarke and Buettcher 2009): a chunk's score is sum_r w_r / (k + rank_r),
k = 60 as in the paper, so a chunk that both rankers place fairly high beats one that only
one of them places first.

The BM25 index is built once (by the index stage) and saved with the tokenizer's name, so
eval loads the exact index the chunks were tokenized for; loading one made by another
tokenizer is refused.
"""

from __future__ import annotations

import json
import keyword
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Mode = Literal["dense", "bm25", "hybrid"]
MODES: tuple[Mode, ...] = ("dense", "bm25", "hybrid")
RRF_K = 60  # Cormack et al. 2009: k=60 "mitigates the impact of high rankings by outlier systems"
BM25_K1, BM25_B = 1.5, 0.75  # bm25s's defaults (Lù 2024), Lucene's BM25 variant
CANDIDATES = 100  # chunks each ranker contributes to the fusion

# A run of word characters, dots joining runs: `queue.PriorityQueue`, `__init__`, `3.12`.
_IDENTIFIER = re.compile(r"\w+(?:\.\w+)*")
# The words inside a name: acronyms, capitalised or lower-case runs, digits (snake_case is
# split on "_" first): `HTTPServer` -> HTTP, Server; `getLogger` -> get, Logger.
_SUBWORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# Lucene's English stop words, less Python's keywords ("is", "not", "in", "for", "with", "if",
# "and", "or", "as" name statements and operators in these docs), plus question words: every
# question starts with one and no chunk is about it.
_LUCENE_STOPWORDS = {"a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
                     "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they",
                     "this", "to", "was", "will", "with"}
STOPWORDS = frozenset(_LUCENE_STOPWORDS - set(keyword.kwlist)
                      | {"what", "which", "who", "how", "why", "does", "do", "did"})
TOKENIZER = "identifiers-v2"  # saved with the index; change it whenever tokenize() changes


def _subwords(name: str) -> list[str]:
    """The lower-cased words of a snake_case or camelCase name; [] when it is one plain word."""
    words = [w.lower() for part in name.split("_") for w in _SUBWORD.findall(part)]
    return words if words != [name.lower()] else []


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens for BM25, technical identifiers kept whole and split.

    `queue.PriorityQueue()` gives `queue.priorityqueue`, `queue`, `priorityqueue`, `priority`
    and `queue`, so a question naming the dotted path, the module, the bare class or its
    words all match; `augmented_assignment_stmt` also gives `augmented`, `assignment`, `stmt`.
    Stop words (see STOPWORDS) are dropped when they stand alone, never from a dotted name.
    Splitting names into their words raised BM25's strict recall@1 on the built-in corpus's
    held-out questions from 0.575 to 0.623, training questions 0.518 to 0.570
    (bench/retrieval.py, 96-word chunks).
    """
    tokens: list[str] = []
    for match in _IDENTIFIER.finditer(text):
        names = match.group().split(".")
        if len(names) > 1:
            tokens.append(match.group().lower())
        for name in names:
            tokens.extend(t for t in (name.lower(), *_subwords(name)) if t not in STOPWORDS)
    return tokens


class Bm25Index:
    """BM25 over chunk texts (bm25s, sparse matrices); chunk ids are row positions."""

    def __init__(self, model) -> None:
        self.model = model

    @classmethod
    def build(cls, texts: Sequence[str], k1: float = BM25_K1, b: float = BM25_B) -> Bm25Index:
        """Tokenizes and indexes `texts` (one per chunk, in chunk-id order)."""
        import bm25s

        docs = [tokenize(t) for t in texts]
        # Our own sorted vocabulary: bm25s numbers string tokens in set order, which changes with
        # each process's hash seed, so the saved index would differ from build to build.
        vocab = {token: i for i, token in enumerate(sorted({t for doc in docs for t in doc}))}
        model = bm25s.BM25(k1=k1, b=b)
        model.index(bm25s.tokenization.Tokenized(ids=[[vocab[t] for t in doc] for doc in docs], vocab=vocab),
                    show_progress=False)
        return cls(model)

    def __len__(self) -> int:
        return int(self.model.scores["num_docs"])

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk for `query` (float32, zero where no query term occurs)."""
        ids = self.model.get_tokens_ids(tokenize(query))
        if not ids:
            return np.zeros(len(self), dtype=np.float32)
        return np.asarray(self.model.get_scores_from_ids(ids), dtype=np.float32)

    def rank(self, query: str, depth: int) -> list[int]:
        """Up to `depth` chunk ids, best first; only chunks sharing a term with the query,
        ties broken by chunk id so the order is reproducible."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:depth]
        return [int(i) for i in order if scores[i] > 0]

    def save(self, folder: Path) -> None:
        """The bm25s matrices and vocabulary under `folder`, with the tokenizer's name."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save(str(folder), show_progress=False)
        (folder / "tokenizer.json").write_text(json.dumps({"tokenizer": TOKENIZER, "chunks": len(self)}))

    @classmethod
    def load(cls, folder: Path) -> Bm25Index:
        """The index `save` wrote; one tokenized by another tokenizer is refused (stale)."""
        import bm25s

        meta = json.loads((folder / "tokenizer.json").read_text())
        if meta.get("tokenizer") != TOKENIZER:
            raise ValueError(f"{folder}: BM25 index tokenized by {meta.get('tokenizer')!r}, this code uses "
                             f"{TOKENIZER!r}; rebuild the index")
        return cls(bm25s.BM25.load(str(folder), show_progress=False, verbosity=0))


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K, weights: Sequence[float] | None = None) -> list[int]:
    """Reciprocal-rank fusion: ids by sum of w / (k + rank), rank counted from 1.

    Ties go to the id with the better best rank, then the smaller id (reproducible).
    """
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    score: dict[int, float] = {}
    best: dict[int, int] = {}
    for ranking, w in zip(rankings, weights):
        for rank, cid in enumerate(ranking, start=1):
            score[cid] = score.get(cid, 0.0) + w / (k + rank)
            best[cid] = min(best.get(cid, rank), rank)
    return sorted(score, key=lambda c: (-score[c], best[c], c))


@dataclass
class Retrieval:
    """Top-k chunk ids per question, the seconds each retrieval took, and the question
    embeddings when the retriever made them (reused by the extractive arm)."""

    ids: list[list[int]]
    latency_s: list[float] = field(default_factory=list)
    query_vectors: np.ndarray | None = None  # float32 [questions, dim], L2-normalised


class Retriever:
    """Top-k chunks per question by dense, BM25 or hybrid (RRF of both) ranking.

    `encode` maps texts to L2-normalised float32 rows (the index stage's embedder);
    `dense_index` is the FAISS inner-product index over the same chunks as `bm25`.
    """

    def __init__(self, mode: Mode, *, dense_index=None, encode: Callable[[Sequence[str]], np.ndarray] | None = None,
                 bm25: Bm25Index | None = None, candidates: int = CANDIDATES, rrf_k: int = RRF_K,
                 weights: tuple[float, float] = (1.0, 1.0)) -> None:
        if mode not in MODES:
            raise ValueError(f"retrieval mode {mode!r}: expected one of {MODES}")
        if mode != "bm25" and (dense_index is None or encode is None):
            raise ValueError(f"retrieval mode {mode!r} needs the dense index and the embedder")
        if mode != "dense" and bm25 is None:
            raise ValueError(f"retrieval mode {mode!r} needs the BM25 index")
        self.mode, self.dense_index, self.encode, self.bm25 = mode, dense_index, encode, bm25
        self.candidates, self.rrf_k, self.weights = candidates, rrf_k, weights

    def retrieve(self, questions: Sequence[str], k: int) -> Retrieval:
        """Top-k ids per question. Latency: the batch's embedding and FAISS search divided by
        the number of questions, plus the question's own BM25 scoring and fusion."""
        depth = max(k, self.candidates) if self.mode == "hybrid" else k
        dense: list[list[int]] = [[] for _ in questions]
        vectors, shared = None, 0.0
        if self.mode != "bm25" and questions:
            start = time.perf_counter()
            vectors = self.encode(list(questions))
            _, rows = self.dense_index.search(vectors, min(depth, self.dense_index.ntotal))
            dense = [[int(i) for i in row if i >= 0] for row in rows]
            shared = (time.perf_counter() - start) / len(questions)
        ids, latency = [], []
        for question, ranked in zip(questions, dense):
            start = time.perf_counter()
            if self.mode == "bm25":
                ranked = self.bm25.rank(question, k)
            elif self.mode == "hybrid":
                ranked = rrf([ranked, self.bm25.rank(question, depth)], self.rrf_k, self.weights)
            ids.append(ranked[:k])
            latency.append(shared + time.perf_counter() - start)
        return Retrieval(ids, latency, vectors)
