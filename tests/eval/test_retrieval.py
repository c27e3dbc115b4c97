"""BM25, reciprocal-rank fusion and the hybrid retriever: the tokenizer, a hand-computed fusion,
the saved index, and hybrid beating both of its parts on a corpus where each part fails."""

import os

import numpy as np
import pytest

from eval.rag import build_index
from eval.retrieval import Bm25Index, Retriever, rrf, tokenize
from tests.conftest import REPO

# os.path's time and test functions read alike to a sentence encoder; only the name tells them apart.
DOCS = [
    "os.path.getatime(path) returns the time of last access of path, in seconds since the epoch.",
    "os.path.getmtime(path) returns the time of last modification of path, in seconds since the epoch.",
    "os.path.getctime(path) returns the metadata change time of path, in seconds since the epoch.",
    "os.path.exists(path) returns True if path refers to an existing path; False for broken symbolic links.",
    "os.path.lexists(path) returns True if path refers to an existing path, including broken symbolic links.",
    "os.path.isfile(path) returns True if path is an existing regular file.",
    "os.path.isdir(path) returns True if path is an existing directory.",
    "os.path.islink(path) returns True if path refers to a directory entry that is a symbolic link.",
    "os.path.ismount(path) returns True if path is a mount point.",
    "os.path.realpath(path) returns the canonical path, eliminating any symbolic links.",
    "os.path.abspath(path) returns a normalized absolutized version of path.",
    "os.path.normpath(path) normalizes a path by collapsing redundant separators and up-level references.",
    "os.path.normcase(path) normalizes the case of a pathname; on Windows it converts to lowercase.",
    "shutil.rmtree(path) deletes an entire directory tree; path must point to a directory.",
    "os.remove(path) deletes the file path; a directory raises an error.",
    "time.sleep(secs) suspends execution of the calling thread for the given number of seconds.",
]
# (question, the document that answers it)
IDENTIFIER_QUERIES = [("What does os.path.getatime return?", 0), ("os.path.getatime()", 0),
                      ("What does os.path.getctime return?", 2), ("os.path.getctime()", 2),
                      ("What does os.path.lexists return?", 4), ("What does os.path.ismount return?", 8)]
PARAPHRASE_QUERIES = [("How do I resolve shortcuts to the real location?", 9), ("How can I halt briefly?", 15),
                      ("Which call wipes out one document on disk?", 14), ("Is my disk attached here?", 8),
                      ("Give me the last time a document was altered.", 1)]


@pytest.mark.parametrize("text, tokens", [
    ("queue.PriorityQueue()", ["queue.priorityqueue", "queue", "priorityqueue", "priority", "queue"]),
    ("augmented_assignment_stmt", ["augmented_assignment_stmt", "augmented", "assignment", "stmt"]),
    ("HTTPServer.getLogger", ["httpserver.getlogger", "httpserver", "http", "server", "getlogger", "get", "logger"]),
    ("What is the __init__ of it?", ["is", "__init__", "init"]),  # "is" is a Python keyword: kept
    ("Version 3.12, x = None", ["version", "3.12", "3", "12", "x", "none"]),
    ("", []),
])
def test_tokenizer_keeps_identifiers_whole_and_split(text, tokens):
    assert tokenize(text) == tokens


def test_rrf_hand_computed():
    # k=60: 1 -> 1/61 + 1/62 = .032522; 3 -> 1/63 + 1/61 = .032266; 2 -> 1/62; 4 -> 1/63
    assert rrf([[1, 2, 3], [3, 1, 4]]) == [1, 3, 2, 4]
    # k=1: 7 -> 1/2 = .5; 8 -> 1/3 + 1/2 = .833
    assert rrf([[7, 8], [8]], k=1) == [8, 7]
    # weights 2:1 -> 1: 2/61 + 1/62 = .04892 beats 2: 2/62 + 1/61 = .04865
    assert rrf([[1, 2], [2, 1]], weights=[2.0, 1.0]) == [1, 2]
    assert rrf([[6, 5], [5, 6]]) == [5, 6]  # a tie: same best rank, so the smaller id
    with pytest.raises(ValueError, match="weights"):
        rrf([[1]], weights=[1.0, 1.0])


def test_bm25_ranks_identifiers_and_leaves_out_chunks_without_a_query_term():
    bm25 = Bm25Index.build(DOCS)
    assert bm25.rank("os.path.getctime()", 3)[0] == 2
    assert bm25.rank("halt briefly", 5) == []
    assert bm25.scores("halt briefly").shape == (len(DOCS),)


def test_saved_bm25_index_ranks_identically(tmp_path):
    bm25 = Bm25Index.build(DOCS)
    bm25.save(tmp_path / "bm25")
    loaded = Bm25Index.load(tmp_path / "bm25")
    for question, _ in IDENTIFIER_QUERIES + PARAPHRASE_QUERIES:
        assert loaded.rank(question, len(DOCS)) == bm25.rank(question, len(DOCS))
        assert np.array_equal(loaded.scores(question), bm25.scores(question))


def test_an_index_of_another_tokenizer_is_refused(tmp_path):
    Bm25Index.build(DOCS).save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"tokenizer": "identifiers-v0", "chunks": 16}')
    with pytest.raises(ValueError, match="rebuild the index"):
        Bm25Index.load(tmp_path)


def test_a_mode_without_its_index_is_refused():
    with pytest.raises(ValueError, match="needs the BM25 index"):
        Retriever("hybrid", dense_index=object(), encode=lambda t: t)
    with pytest.raises(ValueError, match="needs the dense index"):
        Retriever("dense", bm25=Bm25Index.build(DOCS))
    with pytest.raises(ValueError, match="expected one of"):
        Retriever("sparse", bm25=Bm25Index.build(DOCS))


def top1_misses(retriever: Retriever, queries) -> list[str]:
    got = retriever.retrieve([q for q, _ in queries], 3)
    assert len(got.latency_s) == len(queries) and all(t >= 0 for t in got.latency_s)
    return [q for (q, gold), ids in zip(queries, got.ids) if ids[:1] != [gold]]


def test_hybrid_beats_dense_and_bm25_where_each_fails(minilm):
    """MiniLM confuses os.path.getatime/getctime with their siblings; BM25 has no word of the
    paraphrases (or a wrong one first). Fused with the paper's k=60, every query is answered."""
    embedder = minilm
    encode = lambda texts: embedder.encode(texts)
    parts = {"dense_index": build_index(encode(DOCS), "flat"), "encode": encode, "bm25": Bm25Index.build(DOCS)}
    queries = IDENTIFIER_QUERIES + PARAPHRASE_QUERIES
    dense, bm25 = top1_misses(Retriever("dense", **parts), queries), top1_misses(Retriever("bm25", **parts), queries)
    assert len(dense) >= 2 and set(dense) <= {q for q, _ in IDENTIFIER_QUERIES}
    assert len(bm25) >= 2 and set(bm25) <= {q for q, _ in PARAPHRASE_QUERIES}
    assert top1_misses(Retriever("hybrid", **parts), queries) == []
    got = Retriever("hybrid", **parts).retrieve(["os.path.getctime()"], 3)
    assert got.query_vectors is not None and got.query_vectors.shape == (1, 384)


def test_the_saved_bm25_index_is_the_same_bytes_under_any_hash_seed(tmp_path):
    """The index artifact is deterministic: bm25s numbers string tokens in set order, which
    follows the process's hash seed, so the vocabulary is ours and sorted."""
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from eval.retrieval import Bm25Index; "
              "Bm25Index.build(['queue.PriorityQueue sorts by priority', 'os.path joins paths', 'a b c', '']"
              ").save(Path(sys.argv[1]))")
    digests = []
    for seed in ("1", "2"):
        folder = tmp_path / seed
        subprocess.run([sys.executable, "-c", script, str(folder)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)})
        digests.append({p.name: p.read_bytes() for p in folder.iterdir()})
    assert digests[0] == digests[1]
