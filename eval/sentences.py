"""Sentence embeddings for the rag-extractive arm, computed once at index time.

The arm answers with the sentence of the top-k chunks closest to the question. Embedding those
sentences per question costs one encoder pass over k chunks' sentences for every question;
here every chunk's sentences are embedded once when the index is built and stored beside it,
and a question costs one dot product per candidate sentence.

Stored as three arrays: `vectors` float32 [sentences, dim] (L2-normalised, so a dot product
is cosine similarity), `spans` int64 [sentences, 2] (character offsets in the chunk's text),
`bounds` int64 [chunks + 1] (chunk c's sentences are rows bounds[c]:bounds[c+1]).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A sentence ends at . ! ? or a line break; the text of a match is stripped of spaces.
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]|\n|$)")
MIN_CHARS = 3  # shorter pieces ("1.", "e.g") are splitting debris, not answers
FILES = ("sentence_vectors.npy", "sentence_spans.npy", "sentence_bounds.npy")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of every sentence of `text`, spaces stripped, in order."""
    spans = []
    for m in _SENTENCE.finditer(text):
        piece = m.group()
        start = m.start() + len(piece) - len(piece.lstrip())
        end = m.end() - (len(piece) - len(piece.rstrip()))
        if end - start >= MIN_CHARS:
            spans.append((start, end))
    return spans


def sentence_texts(text: str) -> list[str]:
    """The sentences of `text` as strings (what split_sentences' offsets point at)."""
    return [text[s:e] for s, e in split_sentences(text)]


@dataclass(frozen=True)
class SentenceIndex:
    """Every chunk's sentences with their embeddings (see the module docstring for shapes)."""

    vectors: np.ndarray
    spans: np.ndarray
    bounds: np.ndarray

    def rows(self, chunk_ids: Sequence[int]) -> np.ndarray:
        """Sentence rows of the chunks, in the chunks' order (a chunk repeated repeats them)."""
        parts = [np.arange(self.bounds[c], self.bounds[c + 1]) for c in chunk_ids]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def chunk_of(self, row: int) -> int:
        """The chunk a sentence row belongs to."""
        return int(np.searchsorted(self.bounds, row, side="right") - 1)

    def text(self, row: int, chunk_texts: Sequence[str]) -> str:
        """The sentence at `row`, cut from its chunk's text."""
        start, end = self.spans[row]
        return chunk_texts[self.chunk_of(row)][start:end]


def build_sentence_index(chunk_texts: Sequence[str], encode: Callable[[Sequence[str]], np.ndarray]) -> SentenceIndex:
    """Splits every chunk into sentences and embeds them in one pass of `encode` (texts ->
    L2-normalised float32 rows). Each distinct sentence is embedded once: overlapping chunks
    and repeated lines share theirs (on the built-in corpus, 96-word chunks overlapping by 24,
    35,972 distinct of 57,717 sentences)."""
    spans: list[tuple[int, int]] = []
    bounds = [0]
    for text in chunk_texts:
        spans.extend(split_sentences(text))
        bounds.append(len(spans))
    texts = [chunk_texts[c][s:e] for c in range(len(chunk_texts)) for s, e in spans[bounds[c]:bounds[c + 1]]]
    distinct = list(dict.fromkeys(texts))
    if distinct:
        row_of = {t: i for i, t in enumerate(distinct)}
        unique = np.asarray(encode(distinct), dtype=np.float32)
        vectors = np.ascontiguousarray(unique[[row_of[t] for t in texts]])
    else:
        vectors = np.zeros((0, 0), np.float32)
    return SentenceIndex(vectors, np.asarray(spans, dtype=np.int64).reshape(-1, 2), np.asarray(bounds, dtype=np.int64))


def best_sentence(index: SentenceIndex, question_vector: np.ndarray, chunk_ids: Sequence[int]) -> int | None:
    """The sentence row of `chunk_ids` most similar to the question (first of ties), None when
    those chunks have no sentence."""
    rows = index.rows(chunk_ids)
    if not len(rows):
        return None
    return int(rows[int(np.argmax(index.vectors[rows] @ question_vector))])


def save_sentence_index(index: SentenceIndex, folder: Path) -> None:
    """The three arrays as .npy files (no pickle), plus their counts for a quick check."""
    for name, array in zip(FILES, (index.vectors, index.spans, index.bounds)):
        np.save(folder / name, array, allow_pickle=False)
    (folder / "sentences.json").write_text(json.dumps({"sentences": len(index.spans), "chunks": len(index.bounds) - 1}))


def load_sentence_index(folder: Path, chunks: int | None = None) -> SentenceIndex:
    """The index save_sentence_index wrote; with `chunks`, refuses one built for another count."""
    vectors, spans, bounds = (np.load(folder / name, allow_pickle=False) for name in FILES)
    if chunks is not None and len(bounds) - 1 != chunks:
        raise ValueError(f"{folder}: sentence index covers {len(bounds) - 1} chunks, the index has {chunks}")
    return SentenceIndex(vectors, spans, bounds)
