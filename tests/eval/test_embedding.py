"""Embeddings: a text's vector does not depend on its batch-mates, the cache returns exactly what
a fresh encode computes, and the index stage embeds only chunks it has not seen."""

from pathlib import Path

import numpy as np
import pytest

from eval.embedding import MAX_SHARDS, Embedder, EmbeddingCache, EmbeddingSettings, text_key
from tasks.core.artifacts import Index
from tasks.core.runner import execute, plan
from tests.conftest import doc_text, write_jsonl

TEXTS = ["The moon pulls the oceans.", "Bishops move diagonally on the board, as far as they like.",
         "os.path.getatime returns the time of last access", "Tides rise twice a day.",
         "A volcano erupts when magma rises through the crust of the earth."]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_vector_does_not_depend_on_its_batch_mates(minilm, precision):
    embedder = Embedder(minilm.model, EmbeddingSettings(precision, 1))
    together = embedder.encode(TEXTS)
    assert np.array_equal(together[1:4], embedder.encode(TEXTS[1:4]))
    assert np.array_equal(together[2], embedder.encode([TEXTS[2]])[0])
    assert together.dtype == np.float32 and np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-3)


def test_batched_texts_are_encoded_by_length_and_returned_in_their_own_order(minilm):
    """Batches are formed from texts sorted by length (least padding); every row is still the
    vector of the text at its place, within the last bits that padding changes."""
    embedder = Embedder(minilm.model, EmbeddingSettings("fp32", 1))
    texts = TEXTS * 3 + [t.upper() for t in TEXTS]  # 20 texts of mixed lengths, in no length order
    alone = embedder.encode(texts)
    batched = embedder.encode(texts, batch_size=4)
    assert batched.shape == alone.shape and (alone * batched).sum(axis=1).min() > 0.9999
    assert np.array_equal(batched[:5], embedder.encode(texts, batch_size=4)[:5])  # deterministic


def test_bf16_vectors_stay_close_to_fp32(minilm):
    fp32 = Embedder(minilm.model, EmbeddingSettings("fp32", 1)).encode(TEXTS)
    bf16 = Embedder(minilm.model, EmbeddingSettings("bf16", 1)).encode(TEXTS)
    assert not np.array_equal(fp32, bf16) and (fp32 * bf16).sum(axis=1).min() > 0.999


def test_the_cache_encodes_only_new_texts_and_returns_fresh_vectors(minilm, tmp_path):
    seen = []
    embedder = Embedder(minilm.model, EmbeddingSettings())
    counting = Embedder(minilm.model, EmbeddingSettings())
    counting.encode = lambda texts, on_done=None: seen.extend(texts) or embedder.encode(texts, on_done)
    cold, n = EmbeddingCache(tmp_path).embed(counting, TEXTS[:3] + TEXTS[:1])
    assert n == 3 and seen == TEXTS[:3]
    seen.clear()
    warm, n = EmbeddingCache(tmp_path).embed(counting, TEXTS)  # a fresh process: read from the shards
    assert n == 2 and seen == TEXTS[3:]
    assert np.array_equal(warm, embedder.encode(TEXTS)) and np.array_equal(cold, warm[[0, 1, 2, 0]])


def test_a_build_killed_midway_keeps_what_it_embedded(minilm, tmp_path, monkeypatch):
    """Vectors are saved a shard per SAVE_EVERY texts as they are encoded: a build that dies in its
    third piece leaves the first two cached, and the rerun encodes only the rest."""
    monkeypatch.setattr("eval.embedding.SAVE_EVERY", 2)
    embedder = Embedder(minilm.model, EmbeddingSettings())
    calls = []

    def dies_in_the_third_piece(texts, on_done=None):
        calls.append(list(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands for the SIGKILL of the kill trials (tests/reliability/test_kill.py)
        return embedder.encode(texts, on_done)

    dying = Embedder(minilm.model, EmbeddingSettings())
    dying.encode = dies_in_the_third_piece
    texts = TEXTS + [t.upper() for t in TEXTS]
    with pytest.raises(KeyboardInterrupt):
        EmbeddingCache(tmp_path).embed(dying, texts)
    assert calls == [texts[0:2], texts[2:4], texts[4:6]] and len(list(tmp_path.glob("*.npz"))) == 2
    progress = []
    rerun, n = EmbeddingCache(tmp_path).embed(embedder, texts, progress.append)
    assert n == len(texts) - 4 and progress == [2, 4, 6]  # counted over the texts this run encodes
    assert np.array_equal(rerun, embedder.encode(texts))


def test_shards_merge_and_broken_ones_are_ignored(minilm, tmp_path):
    embedder = Embedder(minilm.model, EmbeddingSettings())
    for i in range(MAX_SHARDS + 2):
        EmbeddingCache(tmp_path).embed(embedder, [f"text number {i}"])
        assert len(list(tmp_path.glob("*.npz"))) <= MAX_SHARDS
    (tmp_path / "zz-broken.npz").write_bytes(b"not a zip")  # e.g. a disk that filled up
    (tmp_path / ".half.tmp.npz").write_bytes(b"PK")  # a killed writer's leftover: not a shard
    cache = EmbeddingCache(tmp_path)
    assert len(cache.load()) == MAX_SHARDS + 2 and cache.missing(["text number 3", "new"]) == ["new"]


def test_a_key_ending_in_a_nul_byte_is_found_again(minilm, tmp_path):
    text = next(f"text {i}" for i in range(10_000) if text_key(f"text {i}").endswith(b"\0"))
    embedder = Embedder(minilm.model, EmbeddingSettings())
    EmbeddingCache(tmp_path).embed(embedder, [text])
    assert EmbeddingCache(tmp_path).missing([text]) == []


def test_settings_per_device():
    assert EmbeddingSettings.for_device("bf16", "cpu") == EmbeddingSettings("bf16", 1)
    assert EmbeddingSettings.for_device("fp32", "cuda").batch_size > 1


def test_an_incremental_index_equals_a_cold_one(project, tmp_path):
    """Five documents change: the rebuild embeds only their chunks, and its files are byte for
    byte those of a build in a fresh store (no cache)."""
    docs = [{"id": f"d{i}", "text": doc_text(i, words=60)} for i in range(12)]
    sections = {"dedup": {"exact": True, "near": None}, "index": {"chunk_words": 32, "overlap": 8, "precision": "fp32"}}

    def build(factory, rows):
        write_jsonl(factory.root / "data" / "docs.jsonl", rows)
        spec = factory.load(**sections)
        steps = {r.name: r for r in plan(spec, factory.store)}
        for name in ("ingest", "dedup"):
            execute(steps[name], spec, factory.store)
        return execute(steps["index"], spec, factory.store).record

    first = build(project, docs)
    assert first.metrics["reused"] == 0 and first.metrics["embedded"] == first.metrics["chunks"]
    changed = docs[:7] + [{"id": f"n{i}", "text": doc_text(100 + i, words=60)} for i in range(5)]
    second = build(project, changed)
    assert second.metrics["embedded"] == 5 * 3 and second.metrics["reused"] == second.metrics["chunks"] - 15

    fresh = type(project)(tmp_path / "fresh")
    cold = build(fresh, changed)
    assert cold.metrics["embedded"] == cold.metrics["chunks"] and cold.fingerprint == second.fingerprint
    for name in (Index.FAISS, Index.CHUNKS, Index.EMBEDDING):
        assert (Path(project.store.location("index", second.fingerprint)) / name).read_bytes() == \
               (Path(fresh.store.location("index", cold.fingerprint)) / name).read_bytes(), name
