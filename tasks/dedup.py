"""dedup: exact and MinHash near-duplicate removal, with datatrove's own multi-step pipelines.

Reads:   the ingest artifact's documents/.
Writes:  documents/*.jsonl.gz (the kept documents, datatrove JSONL) and removed.jsonl (one line
         per removed document: its id, the id of the kept document it duplicates, and whether
         the match was exact or near).
Metrics: documents_in, documents_out, exact_duplicates, near_duplicates.
Alone:   gristmill run SPEC --only dedup

Exact dedup is datatrove's three steps (signature, find, filter) on the normalised text.
Near dedup is its four MinHash steps (signature, buckets, cluster, filter); the bands and
rows are chosen so the LSH S-curve's midpoint sits at `near.threshold`. Every step's
intermediate files and logs stay in the per-fingerprint work folder, so a killed dedup
resumes from the steps it finished. Which document of a duplicate set is kept is datatrove's
choice (the first seen for exact, the cluster root for MinHash).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Only datatrove's data model and step base class (cheap) are imported here; its readers, writers
# and dedup steps are imported where a pipeline is built: they are slow to import (datatrove.io
# brings in huggingface_hub), and planning a run imports this module without running it.
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_specs.schema import DedupSpec, ExecutorSpec, NearDedupSpec
from tasks.core.artifacts import Documents
from tasks.core.files import link_tree
from tasks.core.jsonl import json_line, read_jsonl, write_jsonl
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.data.engine import run_pipeline, step_counts

if TYPE_CHECKING:
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

MAX_HASHES = 128  # bands x rows; datatrove's default is 14 x 8 = 112


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows) whose S-curve midpoint (1/b)^(1/r) is closest to `threshold`, preferring
    more hashes (a steeper curve) among those within 0.02 of it."""
    candidates = []
    for rows in range(1, 33):
        bands = max(1, round(threshold ** -rows))
        if bands * rows <= MAX_HASHES:
            midpoint = (1 / bands) ** (1 / rows)
            candidates.append((abs(midpoint - threshold), bands, rows))
    close = [c for c in candidates if c[0] < 0.02]
    _, bands, rows = max(close, key=lambda c: c[1] * c[2]) if close else min(candidates)
    return bands, rows


def minhash_config(near: NearDedupSpec) -> MinhashConfig:
    """datatrove's MinHash settings for a spec's near-dedup section."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    bands, rows = lsh_bands(near.threshold)
    return MinhashConfig(n_grams=near.ngrams, num_buckets=bands, hashes_per_bucket=rows, seed=near.seed)


def document_text(doc: Document) -> str:
    """What exact dedup compares: the normalised text (ingest already normalised it)."""
    return doc.text


def text_hash(doc: Document) -> str | None:
    """Key that links an exact duplicate to the document kept in its place."""
    return hashlib.sha1(doc.text.encode("utf-8")).hexdigest()


def exact_kept_key(doc: Document) -> str | None:
    """Kept documents that had exact duplicates, keyed by text hash."""
    return text_hash(doc) if doc.metadata.get("duplicate_count", 0) > 0 else None


def near_key(doc: Document) -> str | None:
    """Documents in a MinHash cluster, keyed by the cluster id."""
    cluster = doc.metadata.get("minhash_cluster_id", -1)
    return None if cluster == -1 else str(cluster)


class KeyIndex(PipelineStep):
    """Pass-through step that records (key, id) of the documents `key_of` gives a key, so each
    removed duplicate can name the document it duplicates."""

    name = "gristmill key index"
    type = "🫂 - DEDUP"

    def __init__(self, folder: Path, key_of):
        super().__init__()
        self.folder, self.key_of = Path(folder), key_of

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"{rank:05d}.jsonl").open("w", encoding="utf-8") as f:
            for doc in data:
                key = self.key_of(doc)
                if key is not None:
                    f.write(json_line({"key": key, "id": doc.id}))
                yield doc


def _reader(folder: Path) -> JsonlReader:
    from datatrove.pipeline.readers import JsonlReader

    return JsonlReader(str(folder), glob_pattern="*.jsonl.gz", add_file_path=False)


def _writer(folder: Path) -> JsonlWriter:
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz")


def _read_index(folder: Path) -> dict[str, str]:
    index = {}
    for path in sorted(folder.glob("*.jsonl")):
        for row in read_jsonl(path):
            index.setdefault(row["key"], row["id"])
    return index


def _removed(folder: Path, key_of, kept: dict[str, str], kind: str) -> list[dict[str, str]]:
    """One row per removed document: its id and the id of the kept document it duplicates."""
    rows: list[dict[str, str]] = []
    if not any(folder.glob("*.jsonl.gz")):  # nothing was removed, so nothing was written
        return rows
    for doc in _reader(folder).run(None):
        rows.append({"id": doc.id, "duplicate_of": kept.get(key_of(doc), ""), "kind": kind})
    return rows


def exact_dedup(source: Path, work: Path, executor: ExecutorSpec) -> tuple[Path, list[dict[str, str]], int]:
    """datatrove's three exact-dedup steps; returns (kept folder, removed rows, documents in)."""
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )

    config = ExactDedupConfig(content_getter=document_text)
    root = work / "exact"
    stats = run_pipeline([_reader(source), ExactDedupSignature(str(root / "sigs"), config)],
                         "exact-1-signature", work, executor)
    documents_in = step_counts(stats, 0).get("documents", 0)
    run_pipeline([ExactFindDedups(str(root / "sigs"), str(root / "dups"), config)],
                 "exact-2-find", work, executor, tasks=1)
    run_pipeline([_reader(source), ExactDedupFilter(str(root / "dups"), config, exclusion_writer=_writer(root / "removed")),
                  KeyIndex(root / "kept_index", exact_kept_key), _writer(root / "kept")],
                 "exact-3-filter", work, executor)
    removed = _removed(root / "removed", text_hash, _read_index(root / "kept_index"), "exact")
    return root / "kept", removed, documents_in


def near_dedup(cfg: DedupSpec, source: Path, work: Path, executor: ExecutorSpec) -> tuple[Path, list[dict[str, str]], int]:
    """datatrove's four MinHash steps; returns (kept folder, removed rows, documents in)."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    config = minhash_config(cfg.near.unwrap())
    root = work / "minhash"
    stats = run_pipeline([_reader(source), MinhashDedupSignature(str(root / "sigs"), config, language=cfg.language)],
                         "minhash-1-signature", work, executor)
    documents_in = step_counts(stats, 0).get("documents", 0)
    run_pipeline([MinhashDedupBuckets(str(root / "sigs"), str(root / "buckets"), config=config)],
                 "minhash-2-buckets", work, executor, tasks=config.num_buckets)
    run_pipeline([MinhashDedupCluster(str(root / "buckets"), str(root / "clusters"), config=config, save_cluster_id=True)],
                 "minhash-3-cluster", work, executor, tasks=1)
    run_pipeline([_reader(source),
                  MinhashDedupFilter(str(root / "clusters"), exclusion_writer=_writer(root / "removed"), load_cluster_ids=True),
                  KeyIndex(root / "kept_index", near_key), _writer(root / "kept")],
                 "minhash-4-filter", work, executor)
    removed = _removed(root / "removed", near_key, _read_index(root / "kept_index"), "near")
    return root / "kept", removed, documents_in


@dataclass(frozen=True)
class DedupInputs:
    documents: Documents


def build(cfg: DedupSpec, inputs: DedupInputs, out: Path, ctx: RunContext) -> Metrics:
    """Runs the enabled dedup passes in order and writes the survivors and the removed ids."""
    work = ctx.work
    current = inputs.documents.folder
    removed: list[dict[str, str]] = []
    documents_in = None
    if cfg.exact:
        current, rows, n = exact_dedup(current, work, ctx.executor)
        removed += rows
        documents_in = n
    if cfg.near is not None:
        current, rows, n = near_dedup(cfg, current, work, ctx.executor)
        removed += rows
        documents_in = n if documents_in is None else documents_in
    Documents.folder_in(out).mkdir()
    link_tree(current, Documents.folder_in(out))
    if (work / "logs").exists():  # datatrove's per-step stats and task logs
        link_tree(work / "logs", out / "logs")
    write_jsonl(out / "removed.jsonl", removed)
    exact = sum(r["kind"] == "exact" for r in removed)
    near = sum(r["kind"] == "near" for r in removed)
    if documents_in is None:  # neither pass enabled: the documents pass through unchanged
        documents_in = sum(1 for _ in _reader(current).run(None))
    return {"documents_in": documents_in, "documents_out": documents_in - exact - near,
            "exact_duplicates": exact, "near_duplicates": near,
            "minhash": None if cfg.near is None else dict(zip(("bands", "rows"), lsh_bands(cfg.near.threshold)))}


STAGE = Stage("dedup", build, output=Documents, inputs=DedupInputs, section="dedup", uses_executor=True,
              libs=("spacy", "xxhash"))
