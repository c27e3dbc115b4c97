"""The packaged MiniLM embedder, loaded once for every eval test that needs a real one."""

import pytest

from eval.rag import default_embedder_path
from tasks.train.loading import load_embedder


@pytest.fixture(scope="session")
def minilm():
    return load_embedder(default_embedder_path(), "cpu", trust_remote_code=False)
