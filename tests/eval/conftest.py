"""The packaged MiniLM embedder, loaded once for every eval test that needs a real one, with
the settings the index stage uses on a CPU without native bf16 (fp32, one text at a time)."""

import pytest

from eval.embedding import Embedder, EmbeddingSettings
from eval.rag import default_embedder_path
from tasks.train.loading import load_embedder


@pytest.fixture(scope="session")
def minilm():
    return Embedder(load_embedder(default_embedder_path(), "cpu", trust_remote_code=False), EmbeddingSettings())
