"""Retrieval on a toy corpus with the shipped MiniLM: the right chunk comes first."""

import numpy as np
import pytest

from data_specs.errors import InputError
from eval.arms import EvalQuestion
from eval.hits import recall
from eval.rag import build_index, chunk_documents
from eval.retrieval import Retriever
from tasks.train.loading import load_embedder

DOCS = [
    {"id": "bread", "text": "To bake bread, mix flour, water, yeast and salt, knead the dough and bake it at 230 degrees."},
    {"id": "tides", "text": "Ocean tides are caused by the gravitational pull of the moon and the sun on the water."},
    {"id": "chess", "text": "In chess, the knight moves in an L shape: two squares one way and one square sideways."},
    {"id": "volcano", "text": "A volcano erupts when magma from deep inside the earth rises through the crust."},
]


@pytest.fixture(scope="module")
def embedder(minilm):
    return minilm


def test_chunks_are_word_windows_with_offsets():
    text = " ".join(f"w{i}" for i in range(10))
    chunks = chunk_documents([{"id": "d", "text": text}], words=4, overlap=1)
    assert [c.text for c in chunks] == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert all(text[c.start:c.end] == c.text for c in chunks)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_recall_on_a_toy_corpus(embedder, kind):
    chunks = chunk_documents(DOCS, words=64, overlap=8)
    index = build_index(embedder.encode([c.text for c in chunks]), kind)
    qs = [EvalQuestion("1", "How does a knight move in chess?", ("L shape",), "chess"),
          EvalQuestion("2", "What causes ocean tides?", ("gravitational pull of the moon",), "tides"),
          EvalQuestion("3", "Why does a volcano erupt?", ("magma",), "volcano")]
    retrieval = Retriever("dense", dense_index=index, encode=lambda t: embedder.encode(t)).retrieve(
        [q.question for q in qs], 2)
    assert [chunks[ids[0]].doc_id for ids in retrieval.ids] == ["chess", "tides", "volcano"]
    assert recall(qs, retrieval.ids, chunks, 2).strict == {"recall@1": 1.0, "recall@2": 1.0, "recall@5": 1.0}


def test_embeddings_are_normalised(embedder):
    v = embedder.encode(["hello", "world"])
    assert v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_embedder_that_is_not_a_model(tmp_path):
    with pytest.raises(InputError, match="is not a sentence-transformers model"):
        load_embedder(tmp_path, "cpu", trust_remote_code=False, field="index.embedder")
