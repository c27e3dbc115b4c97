"""Eval throughput: our index stage vs a bare sentence-transformers + FAISS script on the same
chunks, and questions/s per arm on an existing store.

1. Index build: the built-in corpus chunked as the index stage does; ours is the index stage
   through tasks/runner.py (fingerprint, embed, FAISS, write, publish); bare is the same model's
   `encode` + `faiss.IndexFlatIP.add` + `faiss.write_index` in a plain script. Interleaved, best
   of --repeats. Last line ratio=X.XX (bare seconds / ours seconds = ours/bare throughput).
2. With --store and --spec naming a finished run: questions/s of each arm, read from that
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

from data_specs.loader import load_spec
from eval.rag import chunk_documents, default_embedder_path
from tasks.core.artifacts import iter_documents
from tasks.core.runner import execute, plan
from tasks.core.store import ArtifactStore


def bare_index(texts: list[str], out: Path) -> float:
    """Seconds for the plain script: load, encode normalised, IndexFlatIP, write."""
    import faiss
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    model = SentenceTransformer(str(default_embedder_path()), device="cpu")
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(out / "bare.faiss"))
    return time.perf_counter() - start


def ours_index(spec_path: Path, store_root: Path) -> float:
    """Seconds for the index stage (data stages are built first, outside the timing)."""
    spec = load_spec(spec_path)
    store = ArtifactStore(store_root)
    rows = {r.name: r for r in plan(spec, store)}
    for name in ("ingest", "dedup"):
        execute(rows[name], spec, store)
    start = time.perf_counter()
    execute(rows["index"], spec, store, force=True)
    return time.perf_counter() - start


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
    parser.add_argument("--repeats", type=int, default=1, help="timed builds of each side (best is kept; ~2 min each on 2 CPU cores)")
    parser.add_argument("--spec", help="a spec with a finished eval, for the per-arm rates")
    parser.add_argument("--store", help="the store of that spec's run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump({"name": "bench-eval", "corpus": {"sources": [{"kind": "python_docs"}]},
                                             "dedup": {"exact": True, "near": None}}))
        ours, bare = [], []
        for r in range(args.repeats):
            ours.append(ours_index(spec_path, tmp / "store"))
            spec = load_spec(spec_path)
            dedup = [p for p in plan(spec, ArtifactStore(tmp / "store")) if p.name == "dedup"][0]
            chunks = chunk_documents(iter_documents(Path(dedup.path) / "documents"), spec.index.chunk_words,
                                     spec.index.overlap)
            bare.append(bare_index([c.text for c in chunks], tmp))
            print(f"run {r + 1}: ours {ours[-1]:.2f} s, bare {bare[-1]:.2f} s ({len(chunks)} chunks)")
    if args.spec and args.store:
        arm_rates(args.spec, args.store)
    print(f"index build best: ours {min(ours):.2f} s, bare {min(bare):.2f} s")
    print(f"ratio={min(bare) / min(ours):.2f}")


if __name__ == "__main__":
    main()
