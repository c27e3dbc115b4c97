"""Corpus readers: datatrove steps that turn source files into Documents.

A record that cannot become a document (malformed JSON, no text field, bad bytes, a
symlink leading outside its folder, a record larger than the limit) is not dropped here: it
flows on as a Document marked with `metadata["reject"] = reason`, and the ingest filter drops
it with that reason into the rejects file, where its raw content is kept (cut at
RAW_KEEP_CHARS). Files are sharded across datatrove ranks (file i goes to rank i %
world_size), so any executor can run a reader.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_specs.errors import InputError
from data_specs.schema import HFDatasetSource, JsonlSource, ParquetSource, Source, TextSource
from data_specs.views import resolve_path

# Raw content kept in the rejects file per record, in characters: enough to find and fix
# the record, bounded so one 100 MB line cannot blow up the rejects file.
RAW_KEEP_CHARS = 100_000
GLOB_CHARS = set("*?[")
BOM = b"\xef\xbb\xbf"


def record_byte_limit(max_chars: int) -> int:
    """Bytes read of one record (a JSONL line, a text file) before it is rejected unparsed.

    A kept text has at most `max_chars` characters, which JSON spells in at most 12 bytes each
    (an escaped surrogate pair); 16x plus 8 MiB for the other fields leaves room, and keeps a
    100 MB line (or a 10 GB one) from being held in memory: it costs the limit, not its size."""
    return 16 * max_chars + 8 * 2**20


def printable(text: str) -> str:
    """`text` as valid Unicode: bytes that are not UTF-8 (in a file name) shown as \\xNN."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name decoding produced
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: where it is, and the name documents and rejects cite."""

    path: Path
    name: str  # "<source index>:<path relative to the source root>", valid Unicode
    root: Path  # the folder the source's glob starts from


def _glob_root(pattern: Path) -> Path:
    """The longest leading folder of a glob pattern that has no wildcard in it."""
    parts = pattern.parts
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return Path(*parts[:i])
    return pattern.parent if not pattern.is_dir() else pattern


def source_files(spec_path: Path, index: int, source: Source) -> list[SourceFile]:
    """The files a source names (its path is relative to the spec file's folder), sorted; an
    `InputError` names the source when there are none."""
    if source.kind == "python_docs":
        return []
    where = f"{spec_path}: corpus.sources.{index} ({source.kind})"
    pattern = resolve_path(source.path, spec_path.parent)
    try:
        root = _glob_root(pattern)
        if isinstance(source, TextSource) and pattern.is_dir():
            paths = [p for p in pattern.rglob("*") if p.name.endswith(source.extensions)]
        elif isinstance(source, HFDatasetSource):
            if not pattern.is_dir():
                raise InputError(f"{where}: {pattern} is not a folder")
            paths = list(pattern.rglob("*"))
        else:
            paths = [Path(p) for p in glob.glob(str(pattern), recursive=True)]
        # Symlinks are kept in the list (and rejected when read) so they are counted, not lost.
        files = sorted(p for p in paths if p.is_file() or p.is_symlink())
    except (OSError, ValueError) as e:  # a name too long for the filesystem, a folder we may not list
        raise InputError(f"{where}: cannot list {source.path!r} ({type(e).__name__}: {e})") from None
    if not files:
        raise InputError(f"{where}: no file matches {source.path!r} (looked in {pattern})")
    return [SourceFile(p, f"{index}:{printable(p.relative_to(root).as_posix())}", root) for p in files]


def refusal(file: SourceFile) -> str | None:
    """Why a listed file is not read (None: it is read): it leads outside its source folder
    (a symlink, or a file below a symlinked folder), or it is not a regular file (a FIFO
    would block the reader forever)."""
    try:
        real = file.path.resolve()
        inside = real.is_relative_to(file.root.resolve())
        regular = real.is_file()
    except (OSError, RuntimeError):  # a symlink loop
        return "symlink_loop"
    if not inside:
        return "symlink_outside_source"
    return None if regular else "not_a_file"


def _reject(name: str, where: str, reason: str, raw: str) -> Document:
    """A record that could not be read, carried to the rejects file with its reason."""
    return Document(text=raw[:RAW_KEEP_CHARS], id=f"{name}:{where}",
                    metadata={"source": name, "where": where, "reject": reason})


def _dump(record: Any) -> str:
    """A parsed record as ASCII JSON for the rejects file (lone surrogates escaped)."""
    try:
        return json.dumps(record, default=str)[:RAW_KEEP_CHARS]
    except (RecursionError, ValueError, TypeError) as e:  # nested too deeply, an int beyond 4300 digits
        return f"<{type(record).__name__} that cannot be written back as JSON: {type(e).__name__}>"


def _encodable(text: str) -> bool:
    """False for text with a lone surrogate (JSON's "\\ud800"): it has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _from_record(record: Any, name: str, where: str, text_field: str, id_field: str | None) -> Document:
    """A Document from one parsed record (a dict), or a marked reject."""
    if not isinstance(record, dict):
        return _reject(name, where, "not_an_object", _dump(record))
    text = record.get(text_field)
    if text is None:
        return _reject(name, where, "missing_text_field", _dump(record))
    if not isinstance(text, str):
        return _reject(name, where, "text_not_a_string", _dump(record))
    doc_id = record.get(id_field) if id_field else None
    if isinstance(doc_id, (dict, list, tuple)):
        return _reject(name, where, "id_not_a_scalar", _dump(record))
    # An empty id means "derive one from the content" (done after normalisation).
    doc_id = "" if doc_id is None else str(doc_id)
    if not (_encodable(text) and _encodable(doc_id)):
        return _reject(name, where, "invalid_unicode", "lone surrogate: " + _dump(record))
    return Document(text=text, id=doc_id, metadata={"source": name, "where": where})


def _lines(f: BinaryIO, limit: int) -> Iterator[tuple[bytes, bool]]:
    """(line, whole) for each line of `f`; a line longer than `limit` bytes comes cut, with
    whole=False, and the rest of it is skipped in 1 MiB steps, never held in memory."""
    while raw := f.readline(limit + 1):
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := f.readline(2**20)) and not rest.endswith(b"\n"):
                pass
            yield raw[:limit], False
        else:
            yield raw, True


def _jsonl_record(raw: bytes, whole: bool, name: str, where: str, source: JsonlSource) -> Document:
    """One JSONL line as a Document or a marked reject."""
    if not whole:
        return _reject(name, where, "record_too_large", f"longer than {len(raw)} bytes; it starts: "
                       + raw[:RAW_KEEP_CHARS].decode("utf-8", "backslashreplace"))
    try:
        line = raw.removeprefix(BOM).decode("utf-8")  # a BOM: a file saved by an editor, or concatenated
    except UnicodeDecodeError as e:
        return _reject(name, where, "invalid_utf8", f"byte {e.start}: " + raw.decode("utf-8", "backslashreplace"))
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an int beyond 4300 digits
        return _reject(name, where, "malformed_json", f"{e}: {line[:RAW_KEEP_CHARS]}")
    return _from_record(record, name, where, source.text_field, source.id_field)


def read_jsonl(file: SourceFile, source: JsonlSource, limit: int) -> Iterator[Document]:
    """One document per line; blank lines are skipped, bad lines become rejects. A damaged
    gzip stream keeps the lines before the damage and is one reject where it breaks."""
    opener = gzip.open if file.path.suffix == ".gz" else open
    n = 0
    with opener(file.path, "rb") as f:
        lines = _lines(f, limit)
        while True:
            try:
                item = next(lines, None)
            except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, or corrupt
                yield _reject(file.name, f"line {n + 1}", "unreadable_file", f"{type(e).__name__}: {e}")
                return
            if item is None:
                return
            n += 1
            if item[0].strip():
                yield _jsonl_record(*item, file.name, f"line {n}", source)


def read_parquet(file: SourceFile, source: ParquetSource, limit: int) -> Iterator[Document]:
    """One document per row; a damaged file is one reject where it breaks (pyarrow reads
    row groups as they come, so rows before the damage are kept)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file.path)
        columns = table.schema_arrow.names
    except Exception as e:  # pyarrow raises several types for a broken file
        yield _reject(file.name, "file", "unreadable_parquet", f"{type(e).__name__}: {e}")
        return
    if source.text_field not in columns:
        yield _reject(file.name, "file", "missing_text_field", f"columns: {columns}")
        return
    row = 0
    batches = table.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            records = None if batch is None else batch.to_pylist()
        except Exception as e:  # a damaged page or invalid UTF-8 in a string column
            yield _reject(file.name, f"row {row + 1}", "unreadable_parquet", f"{type(e).__name__}: {e}")
            return
        if records is None:
            return
        for record in records:
            row += 1
            yield _from_record(record, file.name, f"row {row}", source.text_field, source.id_field)


def read_text_file(file: SourceFile, source: TextSource, limit: int) -> Iterator[Document]:
    """The whole file is one document; its id is its path within the source folder."""
    size = file.path.stat().st_size
    if size > limit:
        yield _reject(file.name, "file", "record_too_large", f"{size} bytes (at most {limit})")
        return
    raw = file.path.read_bytes()
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

    def __init__(self, source: Source, files: list[SourceFile], index: int, max_record_bytes: int):
        super().__init__()
        self.source, self.files, self.index = source, files, index
        self.max_record_bytes = max_record_bytes

    def _documents(self, rank: int, world_size: int) -> Iterator[Document]:
        if isinstance(self.source, HFDatasetSource):
            if rank == 0:  # a dataset folder is one unit: the first rank reads all of it
                yield from read_hf_dataset(self.files[0].root, f"{self.index}:{self.source.path}", self.source)
            return
        readers = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text_file}
        for file in self.files[rank::world_size]:
            why = refusal(file)
            if why:
                link = f" -> {os.readlink(file.path)}" if file.path.is_symlink() else ""
                yield _reject(file.name, "file", why, printable(f"{file.path}{link}"))
                continue
            try:
                yield from readers[self.source.kind](file, self.source, self.max_record_bytes)
            except OSError as e:  # permission denied, a file removed while the stage runs
                yield _reject(file.name, "file", "unreadable_file", printable(f"{type(e).__name__}: {e}"))

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        for doc in self._documents(rank, world_size):
            self.stat_update("read")
            yield doc
