"""Retrieval quality and build rate: dense (MiniLM + FAISS), BM25 and hybrid (RRF) side by side.

On the deduped built-in corpus and its generated Q&A pairs, for each chunking (python_docs.yaml's
96/24 words and tiny.yaml's 64/16): strict recall@1/@5 (eval.hits) of every mode, on the held-out
questions and on the training questions (more of them, paraphrases included), and the index
build rate in chunks/s (dense: embed + FAISS; BM25: tokenize + index; hybrid: both). Hybrid is
shown for each --fusion (RRF k : dense weight, BM25's weight being 1): by default the paper's
60:1 and 5:0.5, the best mean gain over BM25 on the *training* questions of both chunkings
in a grid of k in {1, 2, 5, 10, 20, 60} x dense weight in {0.25, 0.33, 0.5, 0.75, 1}. The last
line per question set and fusion is hybrid recall@1 - max(dense, bm25) recall@1 (goal >= +0.03).

Then the rag-extractive arm on --extractive-questions questions (k=3, 96/24 chunks): seconds per
question re-embedding every retrieved sentence per question (the old arm) against one dot
product with sentence vectors embedded once (eval.sentences), and that one-time cost.

Make the store first (ingest + dedup + qa, a few minutes on 2 cores):
    HF_HUB_OFFLINE=1 .venv/bin/gristmill run data_specs/python_docs.yaml --until qa --store /tmp/retr-store
    HF_HUB_OFFLINE=1 .venv/bin/python bench/retrieval.py --store /tmp/retr-store
or name the folders: --docs STORE/dedup/FP/documents --qa STORE/qa/FP
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

from machine import describe  # bench/machine.py

from eval.arms import ExtractiveArm
from eval.embedding import Embedder, EmbeddingSettings
from eval.hits import recall
from eval.questions import Question
from eval.rag import build_index, chunk_documents, default_embedder_path
from eval.retrieval import Bm25Index, Retriever
from eval.sentences import build_sentence_index, split_sentences
from tasks.core.keys import native_bf16
from tasks.train.loading import load_embedder

CHUNKINGS = ((96, 24), (64, 16))  # python_docs.yaml, tiny.yaml


def only_folder(pattern: str, store: Path) -> Path:
    """The one folder of the store matching `pattern` (several builds would be ambiguous)."""
    found = sorted(store.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{store}: expected one {pattern}, found {len(found)}; name it with --docs/--qa")
    return found[0]


def read_documents(folder: Path) -> list[dict]:
    """Datatrove JSONL (id, text, metadata), gzipped, every file of the folder in name order."""
    docs = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs.extend(json.loads(line) for line in f if line.strip())
    return docs


def read_questions(path: Path) -> list[Question]:
    """The qa stage's rows (id, question, answer(s), doc_id, span)."""
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Question(r["id"], r["question"], tuple(r.get("answers") or [r["answer"]]), r.get("doc_id"),
                     tuple(r["span"]) if r.get("span") else None) for r in rows]


def row(name: str, mode: str, r, chunks_per_s: float, ms: float) -> str:
    return (f"{name:<16}{mode:<16}{r.strict['recall@1']:>7.3f}{r.strict['recall@5']:>7.3f}"
            f"{r.lenient['recall@1']:>8.3f}{r.lenient['recall@5']:>8.3f}{chunks_per_s:>16.1f}{ms:>13.2f}")


def bench_chunking(docs, question_sets, embedder, words: int, overlap: int, fusions) -> tuple:
    """Builds both indexes over one chunking and prints every mode's recall and rate."""
    chunks = chunk_documents(docs, words, overlap)
    texts = [c.text for c in chunks]
    start = time.perf_counter()
    dense_index = build_index(embedder.encode(texts), "flat")
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    bm25 = Bm25Index.build(texts)
    bm25_s = time.perf_counter() - start
    rate = {"dense": len(chunks) / dense_s, "bm25": len(chunks) / bm25_s, "hybrid": len(chunks) / (dense_s + bm25_s)}
    print(f"\nchunking {words}/{overlap} words: {len(chunks)} chunks of {len(docs)} documents")
    print(f"{'questions':<16}{'mode':<16}{'R@1':>7}{'R@5':>7}{'lenR@1':>8}{'lenR@5':>8}"
          f"{'build chunks/s':>16}{'ms/question':>13}")
    encode = embedder.encode
    for name, qs in question_sets.items():
        questions, at1, gains = [q.question for q in qs], {}, []
        for mode in ("dense", "bm25"):
            got = Retriever(mode, dense_index=dense_index, encode=encode, bm25=bm25).retrieve(questions, 5)
            r = recall(qs, got.ids, chunks, 5)
            at1[mode] = r.strict["recall@1"]
            print(row(name, mode, r, rate[mode], 1000 * sum(got.latency_s) / len(qs)))
        for rrf_k, weight in fusions:
            got = Retriever("hybrid", dense_index=dense_index, encode=encode, bm25=bm25, rrf_k=rrf_k,
                            weights=(weight, 1.0)).retrieve(questions, 5)
            r = recall(qs, got.ids, chunks, 5)
            print(row(name, f"hybrid {rrf_k}:{weight:g}", r, rate["hybrid"], 1000 * sum(got.latency_s) / len(qs)))
            gains.append(f"{rrf_k}:{weight:g} {r.strict['recall@1'] - max(at1.values()):+.3f}")
        print(f"{name:<16}hybrid R@1 - max(dense, bm25) R@1: {', '.join(gains)} (goal >= +0.030)")
    return chunks, dense_index, bm25


def re_embedding_answer(embedder: Embedder, question: str, texts: list[str]) -> str:
    """The arm before precomputed sentences: embed the question and its chunks' sentences, take the closest."""
    sentences = [t[a:b] for t in texts for a, b in split_sentences(t)]
    vectors = embedder.encode([question, *sentences])
    return sentences[int((vectors[1:] @ vectors[0]).argmax())] if sentences else ""


def bench_extractive(qs: list[Question], chunks, dense_index, bm25, embedder, k: int = 3) -> None:
    """Seconds per question of the extractive arm, re-embedding vs precomputed sentences."""
    encode = embedder.encode
    retrieval = Retriever("hybrid", dense_index=dense_index, encode=encode, bm25=bm25).retrieve(
        [q.question for q in qs], k)
    retrieval.latency_s = [0.0] * len(qs)  # the arm's own time only
    start = time.perf_counter()
    old = [re_embedding_answer(embedder, q.question, [chunks[c].text for c in ids]) for q, ids in zip(qs, retrieval.ids)]
    old_s = time.perf_counter() - start
    start = time.perf_counter()
    sentences = build_sentence_index([c.text for c in chunks], encode)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    new = ExtractiveArm(embedder, chunks, retrieval, k, sentences=sentences).answer_many(qs)
    new_s = time.perf_counter() - start
    retrieval.query_vectors = None  # as after BM25-only retrieval: the arm embeds the questions itself
    start = time.perf_counter()
    ExtractiveArm(embedder, chunks, retrieval, k, sentences=sentences).answer_many(qs)
    embed_s = time.perf_counter() - start
    same = sum(a == b.text for a, b in zip(old, new))
    print(f"\nrag-extractive, {len(qs)} questions, k={k}: re-embedding {1000 * old_s / len(qs):.1f} ms/question; "
          f"precomputed {1000 * new_s / len(qs):.2f} ms/question with the retriever's question vectors "
          f"(speedup x{old_s / new_s:.0f}), {1000 * embed_s / len(qs):.2f} ms/question embedding the questions too "
          f"(speedup x{old_s / embed_s:.0f}); same answer for {same}/{len(qs)}")
    texts = [c.text for c in chunks]
    distinct = len({sentences.text(row, texts) for row in range(len(sentences.spans))})
    print(f"one-time sentence index: {len(sentences.spans)} sentences ({distinct} distinct, each embedded once) of "
          f"{len(chunks)} chunks in {build_s:.1f} s ({distinct / build_s:.0f} embedded/s), "
          f"{sentences.vectors.nbytes / 2**20:.1f} MiB float32; "
          f"break-even after {build_s / max(old_s / len(qs) - new_s / len(qs), 1e-9):.0f} questions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="a store with one dedup and one qa build")
    parser.add_argument("--docs", type=Path, help="the dedup artifact's documents/ folder")
    parser.add_argument("--qa", type=Path, help="the qa artifact's folder (train.jsonl, eval.jsonl)")
    parser.add_argument("--fusion", action="append", metavar="K:W",
                        help="hybrid's RRF k and dense weight (BM25's is 1); repeatable; default 60:1 and 5:0.5")
    parser.add_argument("--extractive-questions", type=int, default=200,
                        help="questions (eval, then train) timed through the extractive arm; 0 skips it")
    args = parser.parse_args()
    if not (args.store or (args.docs and args.qa)):
        parser.error("give --store, or --docs and --qa")
    docs_dir = args.docs or only_folder("dedup/*/documents", args.store)
    qa_dir = args.qa or only_folder("qa/*", args.store)
    print(describe())
    print(f"documents: {docs_dir}\nquestions: {qa_dir}")
    docs = read_documents(docs_dir)
    sets = {f"{split} ({len(qs)})": qs for split in ("eval", "train") if (qs := read_questions(qa_dir / f"{split}.jsonl"))}
    model = load_embedder(default_embedder_path(), "cpu", trust_remote_code=False)
    embedder = Embedder(model, EmbeddingSettings.for_device("bf16" if native_bf16("cpu") else "fp32", "cpu"))
    fusions = [(int(k), float(w)) for k, w in (f.split(":") for f in args.fusion or ["60:1", "5:0.5"])]
    built = {}
    for words, overlap in CHUNKINGS:
        built[words] = bench_chunking(docs, sets, embedder, words, overlap, fusions)
    if args.extractive_questions:
        pool = [q for qs in sets.values() for q in qs][: args.extractive_questions]
        bench_extractive(pool, *built[CHUNKINGS[0][0]], embedder)
    print("\n" + describe())


if __name__ == "__main__":
    main()
