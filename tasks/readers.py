"""Corpus readers: datatrove steps that turn source files into Documents.

A record that cannot become a document (malformed JSON, no text field, bad bytes, a
symlink leading outside its folder) is not dropped here: it flows on as a Document marked
with `metadata["reject"] = reason`, and the ingest filter drops it with that reason into
the rejects file, where its raw content is kept. Files are sharded across datatrove ranks
(file i goes to rank i % world_size), so any executor can run a reader.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_specs.spec import HFDatasetSource, JsonlSource, ParquetSource, RunSpec, Source, TextSource
from tasks.errors import InputError

# Raw content kept in the rejects file per record, in characters: enough to find and fix
# the record, bounded so one 100 MB line cannot blow up the rejects file.
RAW_KEEP_CHARS = 100_000
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: where it is, and the name documents and rejects cite."""

    path: Path
    name: str  # "<source index>:<path relative to the source root>"
    root: Path  # the folder the source's glob starts from


def _glob_root(pattern: Path) -> Path:
    """The longest leading folder of a glob pattern that has no wildcard in it."""
    parts = pattern.parts
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return Path(*parts[:i])
    return pattern.parent if not pattern.is_dir() else pattern


def source_files(spec: RunSpec, index: int, source: Source) -> list[SourceFile]:
    """The files a source names, sorted; an `InputError` names the source when there are none."""
    if source.kind == "python_docs":
        return []
    pattern = spec.resolve(source.path)
    root = _glob_root(pattern)
    if isinstance(source, TextSource) and pattern.is_dir():
        paths = [p for p in pattern.rglob("*") if p.name.endswith(source.extensions)]
    elif isinstance(source, HFDatasetSource):
        if not pattern.is_dir():
            raise InputError(f"{spec.spec_path}: corpus.sources.{index} ({source.kind}): {pattern} is not a folder")
        paths = list(pattern.rglob("*"))
    else:
        paths = [Path(p) for p in glob.glob(str(pattern), recursive=True)]
    # Symlinks are kept in the list (and rejected when read) so they are counted, not lost.
    files = sorted(p for p in paths if p.is_file() or p.is_symlink())
    if not files:
        raise InputError(
            f"{spec.spec_path}: corpus.sources.{index} ({source.kind}): no file matches {source.path!r} "
            f"(looked in {pattern})"
        )
    return [SourceFile(p, f"{index}:{p.relative_to(root).as_posix()}", root) for p in files]


def _reject(name: str, where: str, reason: str, raw: str) -> Document:
    """A record that could not be read, carried to the rejects file with its reason."""
    return Document(text=raw[:RAW_KEEP_CHARS], id=f"{name}:{where}",
                    metadata={"source": name, "where": where, "reject": reason})


def _from_record(record: Any, name: str, where: str, text_field: str, id_field: str | None) -> Document:
    """A Document from one parsed record (a dict), or a marked reject."""
    if not isinstance(record, dict):
        return _reject(name, where, "not_an_object", json.dumps(record, default=str)[:RAW_KEEP_CHARS])
    text = record.get(text_field)
    if text is None:
        return _reject(name, where, "missing_text_field", json.dumps(record, default=str)[:RAW_KEEP_CHARS])
    if not isinstance(text, str):
        return _reject(name, where, "text_not_a_string", json.dumps(record, default=str)[:RAW_KEEP_CHARS])
    doc_id = record.get(id_field) if id_field else None
    # An empty id means "derive one from the content" (done after normalisation).
    return Document(text=text, id="" if doc_id is None else str(doc_id), metadata={"source": name, "where": where})


def read_jsonl(file: SourceFile, source: JsonlSource) -> Iterator[Document]:
    """One document per line; blank lines are skipped, bad lines become rejects."""
    opener = gzip.open if file.path.suffix == ".gz" else open
    with opener(file.path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _reject(file.name, where, "invalid_utf8",
                              f"byte {e.start}: " + raw.decode("utf-8", "backslashreplace"))
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                yield _reject(file.name, where, "malformed_json", f"{e}: {line}")
                continue
            yield _from_record(record, file.name, where, source.text_field, source.id_field)


def read_parquet(file: SourceFile, source: ParquetSource) -> Iterator[Document]:
    """One document per row."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file.path)
    except Exception as e:  # pyarrow raises several types for a broken file
        yield _reject(file.name, "file", "unreadable_parquet", f"{type(e).__name__}: {e}")
        return
    columns = table.schema_arrow.names
    if source.text_field not in columns:
        yield _reject(file.name, "file", "missing_text_field", f"columns: {columns}")
        return
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield _from_record(record, file.name, f"row {row}", source.text_field, source.id_field)


def read_text_file(file: SourceFile, source: TextSource) -> Iterator[Document]:
    """The whole file is one document; its id is its path within the source folder."""
    real = file.path.resolve()
    if file.path.is_symlink() and not real.is_relative_to(file.root.resolve()):
        yield _reject(file.name, "file", "symlink_outside_source", f"{file.path} -> {real}")
        return
    if not real.is_file():
        yield _reject(file.name, "file", "not_a_file", str(real))
        return
    raw = real.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield _reject(file.name, "file", "invalid_utf8", f"byte {e.start}: " + raw.decode("utf-8", "backslashreplace"))
        return
    yield Document(text=text, id=file.name.split(":", 1)[1], metadata={"source": file.name, "where": "file"})


def read_hf_dataset(folder: Path, name: str, source: HFDatasetSource) -> Iterator[Document]:
    """Rows of a folder written by `save_to_disk` (a Dataset, or one split of a DatasetDict)."""
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises several types for a foreign folder
        yield _reject(name, "folder", "unreadable_dataset", f"{type(e).__name__}: {e}")
        return
    if isinstance(data, datasets.DatasetDict):
        if source.split is None or source.split not in data:
            yield _reject(name, "folder", "unknown_split", f"split {source.split!r}; the folder has {list(data)}")
            return
        data = data[source.split]
    for row, record in enumerate(data, start=1):
        yield _from_record(record, name, f"row {row}", source.text_field, source.id_field)


class SourceReader(PipelineStep):
    """Reads the files of one corpus source (after any documents already in the pipeline)."""

    name = "gristmill source reader"
    type = "📖 - READER"

    def __init__(self, source: Source, files: list[SourceFile], index: int):
        super().__init__()
        self.source, self.files, self.index = source, files, index

    def _documents(self, rank: int, world_size: int) -> Iterator[Document]:
        if isinstance(self.source, HFDatasetSource):
            if rank == 0:  # a dataset folder is one unit: the first rank reads all of it
                yield from read_hf_dataset(self.files[0].root, f"{self.index}:{self.source.path}", self.source)
            return
        readers = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text_file}
        for file in self.files[rank::world_size]:
            try:
                yield from readers[self.source.kind](file, self.source)
            except OSError as e:
                yield _reject(file.name, "file", "unreadable_file", f"{type(e).__name__}: {e}")

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        for doc in self._documents(rank, world_size):
            self.stat_update("read")
            yield doc
