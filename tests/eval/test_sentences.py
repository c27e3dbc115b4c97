"""Sentence embeddings made once at index time: offsets, the chunk mapping, the pick, the files,
and the same answers as the old arm that re-embedded per question."""

import numpy as np
import pytest

from eval.arms import ExtractiveArm
from eval.questions import Question
from eval.rag import Chunk
from eval.retrieval import Retrieval
from eval.sentences import (
    best_sentence,
    build_sentence_index,
    load_sentence_index,
    save_sentence_index,
    sentence_texts,
    split_sentences,
)

CHUNKS = ["Tides rise twice a day. The moon pulls the oceans!  Is it the sun too?",
          "e.g",  # no sentence of 3 characters or more
          "Knights move in an L shape.\nBishops move diagonally."]


def one_hot(texts):
    """A stand-in encoder: sentence i of the corpus is unit vector i (dimension 8)."""
    vectors = np.zeros((len(texts), 8), dtype=np.float32)
    vectors[np.arange(len(texts)), np.arange(len(texts))] = 1.0
    return vectors


def test_sentences_are_stripped_offsets_into_the_text():
    text = CHUNKS[0]
    spans = split_sentences(text)
    assert [text[s:e] for s, e in spans] == ["Tides rise twice a day.", "The moon pulls the oceans!", "Is it the sun too?"]
    assert split_sentences("e.g") == [] and sentence_texts(CHUNKS[2]) == ["Knights move in an L shape.",
                                                                       "Bishops move diagonally."]


def test_chunks_map_to_their_sentence_rows():
    index = build_sentence_index(CHUNKS, one_hot)
    assert index.bounds.tolist() == [0, 3, 3, 5]  # chunk 1 has no sentence
    assert index.vectors.dtype == np.float32 and index.vectors.shape == (5, 8)
    assert index.rows([2, 0]).tolist() == [3, 4, 0, 1, 2]  # in the order the chunks are given
    assert [index.chunk_of(r) for r in range(5)] == [0, 0, 0, 2, 2]
    assert index.text(4, CHUNKS) == "Bishops move diagonally."


def test_a_sentence_shared_by_chunks_is_embedded_once():
    seen = []
    index = build_sentence_index(["Same line.\nA.", "Same line.\nOther line."],
                                 lambda texts: seen.extend(texts) or one_hot(texts))
    assert seen == ["Same line.", "Other line."]  # "A." is too short to be a sentence
    assert index.bounds.tolist() == [0, 1, 3]
    assert np.array_equal(index.vectors[0], index.vectors[1]) and not np.array_equal(index.vectors[1], index.vectors[2])


def test_best_sentence_is_the_largest_dot_product_among_the_given_chunks():
    index = build_sentence_index(CHUNKS, one_hot)
    question = np.zeros(8, dtype=np.float32)
    question[[1, 4]] = [0.6, 0.8]
    assert best_sentence(index, question, [0, 2]) == 4
    assert best_sentence(index, question, [0]) == 1  # row 4's chunk was not retrieved
    assert best_sentence(index, question, [1]) is None


def test_save_load_roundtrip_and_stale_refusal(tmp_path):
    index = build_sentence_index(CHUNKS, one_hot)
    save_sentence_index(index, tmp_path)
    loaded = load_sentence_index(tmp_path, chunks=3)
    for name in ("vectors", "spans", "bounds"):
        assert np.array_equal(getattr(loaded, name), getattr(index, name))
    with pytest.raises(ValueError, match="covers 3 chunks"):
        load_sentence_index(tmp_path, chunks=4)


def _re_embedding_answer(embedder, question: str, texts: list[str]) -> str:
    """The old arm: embed the question and every sentence of its chunks, take the closest."""
    sentences = [s for t in texts for s in sentence_texts(t)]
    vectors = embedder.encode([question, *sentences])
    return sentences[int(np.argmax(vectors[1:] @ vectors[0]))]


def test_precomputed_arm_answers_like_the_re_embedding_arm(minilm):
    embedder = minilm
    chunks = [Chunk(i, f"d{i}", 0, len(t), t) for i, t in enumerate(CHUNKS)]
    qs = [Question("1", "What pulls the oceans?", ("the moon",)), Question("2", "How do bishops move?", ("diagonally",)),
          Question("3", "How often do tides rise?", ("twice a day",))]
    retrieval = Retrieval([[0, 2], [2, 0], [1, 0]], [0.0, 0.0, 0.0], embedder.encode([q.question for q in qs]))
    sentences = build_sentence_index(CHUNKS, lambda t: embedder.encode(t))
    new = ExtractiveArm(embedder, chunks, retrieval, k=2, sentences=sentences).answer_many(qs)
    old = [_re_embedding_answer(embedder, q.question, [CHUNKS[c] for c in ids]) for q, ids in zip(qs, retrieval.ids)]
    assert [a.text for a in new] == old == ["The moon pulls the oceans!", "Bishops move diagonally.",
                                            "Tides rise twice a day."]
    assert [a.retrieved for a in new] == [(0, 2), (2, 0), (1, 0)]


def test_sentences_of_unretrieved_chunks_are_never_embedded(minilm):
    """eval without index.sentences: empty texts for the chunks no question retrieved."""
    seen = []
    index = build_sentence_index(["", CHUNKS[1], ""], lambda t: seen.extend(t) or minilm.encode(t))
    assert seen == sentence_texts(CHUNKS[1]) and list(index.rows([0, 2])) == []
