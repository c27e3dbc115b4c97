"""ingest: reads the corpus sources, normalises the text, applies the filters.

Reads:   the spec's `corpus` section and the files its sources name (by content).
Writes:  documents/*.jsonl.gz (datatrove JSONL: id, text, metadata.source/where),
         logs/ (datatrove's stats and task logs) and rejects/*.jsonl.gz (every record not kept, with metadata.filter_reason and its raw
         content), so nothing the user gave is silently dropped.
Metrics: documents_in, documents_out, rejected, rejected_by_reason, chars_out, and per source
         the documents read and kept and the characters kept.
Alone:   gristmill run SPEC --only ingest
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

# Only datatrove's step base class is imported here (cheap); its writer and the ingest filter
# (tasks/data/ingest_filter.py) are imported in `build`: they are slow to import, and planning a
# run imports this module without running it.
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_specs.errors import InputError
from data_specs.schema import CorpusSpec, JsonlSource, RunSpec, Source
from tasks.core.artifacts import Documents
from tasks.core.files import link_tree
from tasks.core.fingerprint import file_digest
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.data.engine import run_pipeline, step_counts
from tasks.data.python_docs import corpus_version, write_python_docs
from tasks.data.readers import SourceFile, SourceReader, record_byte_limit, refusal, source_files

# Unicode spaces (NBSP, thin space, ...) become plain spaces; other control characters go.
_SPACES = re.compile(r"[^\S\n\t]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, one newline style, no control characters, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACES.sub(" ", _CONTROL.sub("", text))
    text = _BLANK_RUNS.sub("\n\n", _TRAILING.sub("\n", text))
    return text.strip()


def content_id(text: str) -> str:
    """A stable id for a document that has none: a hash of its normalised text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class Normalize(PipelineStep):
    """Normalises text (see `normalize_text`) and gives id-less documents a content id."""

    name = "gristmill normalize"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if "reject" not in doc.metadata:
                doc.text = normalize_text(doc.text)
                doc.id = doc.id or content_id(doc.text)
            yield doc


def _source_inputs(sources: tuple[Source, ...], spec_path: Path) -> list[tuple[int, Source, list[SourceFile]]]:
    """Every source with its files (python_docs has none until it is generated)."""
    return [(i, src, source_files(spec_path, i, src)) for i, src in enumerate(sources)]


def external_inputs(spec: RunSpec) -> dict[str, str]:
    """Content digests of every source file (names relative to their source folder)."""
    digests = {}
    for i, src, files in _source_inputs(spec.corpus.sources, spec.spec_path):
        if src.kind == "python_docs":
            digests[f"{i}:python_docs"] = corpus_version()
        for f in files:
            why = refusal(f)
            if why:  # rejected when read, never opened: only the link itself is an input
                digests[f.name] = f"refused:{why}:" + (os.readlink(f.path) if f.path.is_symlink() else "")
                continue
            try:
                digests[f.name] = file_digest(f.path)
            except OSError as e:  # rejected when read as unreadable_file; a fixed file changes the key
                digests[f.name] = f"unreadable:{e.errno}"
    return digests


def build(cfg: CorpusSpec, inputs: None, out: Path, ctx: RunContext) -> Metrics:
    """Reads every source through datatrove and writes the kept documents and the rejects."""
    from datatrove.pipeline.writers import JsonlWriter

    from tasks.data.ingest_filter import IngestFilter

    work = ctx.work
    sources = _source_inputs(tuple(s.unwrap() for s in cfg.sources), ctx.spec_path)
    filters = cfg.filters.unwrap()
    limit = record_byte_limit(filters.max_chars)
    readers = []
    for i, src, files in sources:
        if src.kind == "python_docs":
            generated = work / "python_docs.jsonl"
            if not generated.exists():
                write_python_docs(generated)
            files = [SourceFile(generated, f"{i}:python_docs", work)]
            src = JsonlSource(kind="jsonl", path=str(generated), text_field="text", id_field="id")
        readers.append(SourceReader(src, files, i, limit))
    pipeline = [*readers, Normalize(), IngestFilter(filters, work / "rejects"),
                JsonlWriter(str(work / "documents"), output_filename="${rank}.jsonl.gz")]
    stats = run_pipeline(pipeline, "ingest", work, ctx.executor)
    counts = step_counts(stats, len(readers) + 1)
    metrics = {
        "documents_in": counts.get("total", 0),
        "documents_out": counts.get("forwarded", 0),
        "rejected": counts.get("dropped", 0),
        "rejected_by_reason": {k.removeprefix("dropped_"): v for k, v in sorted(counts.items())
                               if k.startswith("dropped_")},
        "chars_out": counts.get("doc_len", 0),
        "sources": [{"source": i, "kind": src.kind, "read": counts.get(f"read_source_{i}", 0),
                     "kept": counts.get(f"kept_source_{i}", 0), "chars": counts.get(f"chars_source_{i}", 0)}
                    for i, src, _ in sources],
    }
    for s in metrics["sources"]:
        if s["kept"] == 0:
            why = "it holds no records" if s["read"] == 0 else f"all {s['read']} records were rejected"
            raise InputError(f"{ctx.spec_path}: corpus.sources.{s['source']} ({s['kind']}): no documents kept: "
                             f"{why} (reasons: {metrics['rejected_by_reason'] or 'none'})")
    for folder in (Documents.FOLDER, "rejects", "logs"):
        (out / folder).mkdir()
        if (work / folder).exists():
            link_tree(work / folder, out / folder)
    return metrics


STAGE = Stage("ingest", build, output=Documents, section="corpus", external_inputs=external_inputs,
              uses_executor=True)
