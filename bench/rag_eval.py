"""Index build: our index stage vs a bare sentence-transformers + FAISS script on the same
chunks, cold and after 5 documents changed; and questions/s per arm on an existing store.

1. Cold: the built-in corpus (deduped, written to a JSONL corpus) chunked as the index stage
   does; ours is the index stage through tasks/runner.py (fingerprint, embed, FAISS, BM25, write,
   publish) on an empty store; bare is a plain script: load the same model, `encode` with
   sentence-transformers' defaults, `IndexFlatIP.add`, `write_index`.
2. Incremental: 5 documents get a new first sentence (every chunk of theirs changes), and the
   corpus is ingested again; ours rebuilds the index stage (its embedding cache holds the other
   chunks), bare embeds everything again, as a script without a cache does.
   Lines ratio_cold=X.XX and ratio_incremental=X.XX: bare seconds / ours seconds.
3. With --store and --spec naming a finished run: questions/s of each arm, read from that
   run's eval answers (latency per question, the same for every arm's measure).

    .venv/bin/python bench/rag_eval.py
    .venv/bin/python bench/rag_eval.py --spec data_specs/python_docs.yaml --store .gristmill
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from statistics import mean

import yaml
from machine import describe  # bench/machine.py

from data_specs.loader import load_spec
from eval.rag import chunk_documents, default_embedder_path
from tasks.core.artifacts import iter_documents
from tasks.core.runner import execute, plan
from tasks.core.store import ArtifactStore


def bare_index(texts: list[str], out: Path) -> float:
    """Seconds for the plain script: load, encode normalised (library defaults), IndexFlatIP, write."""
    import faiss
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    model = SentenceTransformer(str(default_embedder_path()), device="cpu")
    vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(out / "bare.faiss"))
    return time.perf_counter() - start


def ours_index(spec_path: Path, store_root: Path) -> tuple[float, dict, list[str]]:
    """Seconds for the index stage (ingest and dedup are built first, outside the timing), its
    metrics, and the chunks it indexed."""
    spec = load_spec(spec_path)
    store = ArtifactStore(store_root)
    rows = {r.name: r for r in plan(spec, store)}
    for name in ("ingest", "dedup"):
        execute(rows[name], spec, store)
    start = time.perf_counter()
    result = execute(rows["index"], spec, store)
    seconds = time.perf_counter() - start
    docs = iter_documents(Path(store.location("dedup", rows["dedup"].fingerprint)) / "documents")
    chunks = chunk_documents(docs, spec.index.chunk_words, spec.index.overlap)
    return seconds, result.record.metrics, [c.text for c in chunks]


def write_corpus(spec_path: Path, store_root: Path, out: Path) -> list[dict]:
    """The built-in corpus after ingest and dedup, as JSONL rows (id, text)."""
    spec = load_spec(spec_path)
    store = ArtifactStore(store_root)
    rows = {r.name: r for r in plan(spec, store)}
    for name in ("ingest", "dedup"):
        execute(rows[name], spec, store)
    docs = [{"id": d["id"], "text": d["text"]}
            for d in iter_documents(Path(store.location("dedup", rows["dedup"].fingerprint)) / "documents")]
    out.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return docs


def arm_rates(spec_path: str, store: str) -> None:
    """Questions/s per arm from a finished eval's answers.jsonl."""
    spec = load_spec(spec_path)
    row = [r for r in plan(spec, ArtifactStore(store)) if r.name == "eval"][0]
    if not row.cached:
        print(f"no finished eval for {spec_path} in {store}; skipping the per-arm rates")
        return
    rows = [json.loads(l) for l in (Path(row.path) / "answers.jsonl").read_text().splitlines()]
    for arm in rows[0]["arms"]:
        latency = mean(r["arms"][arm]["latency_s"] for r in rows)
        print(f"arm {arm:<15} {1 / latency:8.1f} questions/s (mean latency {latency * 1000:.0f} ms, {len(rows)} questions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changed", type=int, default=5, help="documents changed for the incremental build")
    parser.add_argument("--spec", help="a spec with a finished eval, for the per-arm rates")
    parser.add_argument("--store", help="the store of that spec's run")
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builtin = tmp / "builtin.yaml"
        builtin.write_text(yaml.safe_dump({"name": "bench-eval", "corpus": {"sources": [{"kind": "python_docs"}]}}))
        corpus = tmp / "corpus.jsonl"
        docs = write_corpus(builtin, tmp / "builtin-store", corpus)
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump({"name": "bench-eval", "corpus": {"sources": [
            {"kind": "jsonl", "path": str(corpus), "id_field": "id"}]}, "dedup": {"exact": True, "near": None}}))
        ours, metrics, texts = ours_index(spec_path, tmp / "store")
        bare = bare_index(texts, tmp)
        print(f"cold: ours {ours:.2f} s ({metrics['embedded']} chunks embedded, precision {metrics['precision']}), "
              f"bare {bare:.2f} s ({len(texts)} chunks)")
        for doc in docs[:: max(1, len(docs) // args.changed)][: args.changed]:
            doc["text"] = "This page was revised for the nightly build. " + doc["text"]
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        ours_inc, metrics_inc, texts_inc = ours_index(spec_path, tmp / "store")
        bare_inc = bare_index(texts_inc, tmp)
        print(f"incremental ({args.changed} documents changed): ours {ours_inc:.2f} s ({metrics_inc['embedded']} "
              f"chunks embedded, {metrics_inc['reused']} reused), bare {bare_inc:.2f} s ({len(texts_inc)} chunks)")
    if args.spec and args.store:
        arm_rates(args.spec, args.store)
    print(describe())
    print(f"ratio_cold={bare / ours:.2f}")
    print(f"ratio_incremental={bare_inc / ours_inc:.2f}")


if __name__ == "__main__":
    main()
